"""One AMQP 1.0 connection: Apache Qpid Proton's protocol engine, driven sans-I/O.

Proton's ``Transport``/``Connection`` pair does the AMQP 1.0 framing, the SASL layer, sessions,
links, flow control and the type codec; it never touches a socket. This class feeds it the
bytes a :class:`Stream` reads, hands the bytes it produces back to the stream, and turns its
events into calls of the link handlers in :mod:`gateway.amqp.links`. Everything runs on the
event loop; the engine is touched only between awaits.

Security (docs "Back ends over AMQP"): SASL is required, with the mechanisms the Azure
clients use before claims-based security (``MSSBCBS``, ``ANONYMOUS``: :mod:`gateway.amqp.sasl`,
done ahead of the engine); until a ``$cbs`` put-token has been accepted, only
the ``$cbs`` node can be attached, and a connection that presents no valid token within
``amqp.auth_timeout`` seconds, or whose tokens have all expired, is closed with
``amqp:unauthorized-access``.

Bounds: at most ``amqp.max_links`` links; senders stop producing while more than
``amqp.outbox_bytes`` of encoded output wait for the socket, and input is not read meanwhile;
receivers grant a fixed credit.

Tasks: :meth:`AmqpConnection.run` owns a TaskGroup holding the read, write and timer loops
and every link's pump; it returns when the transport is closed both ways.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, Protocol

from proton import Collector, Condition, Connection, Event, Transport

from gateway.amqp.pad import FramePadder
from gateway.amqp.sasl import SaslServer
from gateway.hub.auth import ServicePrincipal

if TYPE_CHECKING:
    from gateway.amqp.links import LinkHandler, Services

__all__ = ["AmqpConnection", "Stream"]

log = logging.getLogger(__name__)

READ_BYTES = 64 * 1024
SESSION_CAPACITY = 1024 * 1024  # bytes of incoming transfers buffered per session


class Stream(Protocol):
    """Where a connection's bytes come from and go to (a TLS socket, a WebSocket)."""

    async def read(self) -> bytes:
        """Some bytes; ``b""`` at the end."""
        ...

    async def write(self, data: bytes) -> None: ...


class _Closed(Exception):
    """Raised in the connection's TaskGroup once the transport has closed both ways."""


class AmqpConnection:
    def __init__(self, services: Services, peer: str) -> None:
        self.services = services
        self.peer = peer
        config = services.config
        self.connection = Connection()
        self._collector = Collector()
        self.connection.collect(self._collector)
        self.transport = Transport(Transport.SERVER)
        self.transport.max_frame_size = config.max_frame_size
        self.transport.idle_timeout = config.idle_timeout
        self.transport.bind(self.connection)
        self._sasl: SaslServer | None = SaslServer()  # until the SASL exchange is over
        self._raw: list[bytes] = []  # SASL bytes to send ahead of the engine's
        self._refused = False
        self.links: dict[Any, LinkHandler] = {}
        self.tokens: dict[str, ServicePrincipal] = {}  # $cbs audience -> principal
        self._wake_writer = asyncio.Event()
        self._drained = asyncio.Event()
        self._drained.set()
        self._tg: asyncio.TaskGroup | None = None
        self._opened = time.monotonic()
        self._ever_authorized = False

    # -- tasks ------------------------------------------------------------------------------

    async def run(self, stream: Stream) -> None:
        """Serve the connection until it is closed either way."""
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                tg.create_task(self._read_loop(stream), name=f"amqp-read {self.peer}")
                tg.create_task(self._write_loop(stream), name=f"amqp-write {self.peer}")
                tg.create_task(self._timer_loop(), name=f"amqp-timer {self.peer}")
        except* _Closed:
            pass
        except* (ConnectionError, OSError) as group:
            log.debug("amqp connection lost peer=%s: %r", self.peer, group.exceptions[0])
        finally:
            self._tg = None
            for handler in list(self.links.values()):
                handler.closed()
            self.links.clear()

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        """Run ``coro`` in this connection's TaskGroup; its failure is logged and closes the
        connection (``amqp:internal-error``), never the hub."""
        tg = self._tg
        if tg is None:  # the connection is over: nothing more runs for it
            coro.close()
            return

        async def guarded() -> None:
            try:
                await coro
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bug: report it on the wire, keep the hub up
                log.exception("amqp task failed peer=%s name=%s", self.peer, name)
                self.fail("amqp:internal-error", f"internal error: {type(exc).__name__}")

        try:
            tg.create_task(guarded(), name=f"{name} {self.peer}")
        except RuntimeError:  # the TaskGroup is shutting down
            coro.close()

    async def _read_loop(self, stream: Stream) -> None:
        transport = self.transport
        while True:
            if transport.pending() > self.services.config.outbox_bytes:
                self._drained.clear()
                await self._drained.wait()  # a slow reader: stop taking its input meanwhile
            data = await stream.read()
            if not data:
                if self._sasl is not None:
                    self._refuse("closed during SASL")
                    return
                transport.close_tail()
                self.process()
                return
            if self._sasl is not None:
                out, result = self._sasl.feed(data)
                if out:
                    self._raw.append(out)
                    self._wake_writer.set()
                if result is None:
                    continue
                if not result.ok:
                    self._refuse(result.error)
                    return
                self._sasl = None
                data = result.rest
                self._opened = time.monotonic()
            view = memoryview(data)
            while view:
                room = transport.capacity()
                if room < 0:  # tail closed by the engine (protocol error, close)
                    self.process()
                    return
                if room == 0:
                    self.process()
                    await self.drained()
                    continue
                transport.push(bytes(view[:room]))
                view = view[room:]
                self.process()

    async def _write_loop(self, stream: Stream) -> None:
        transport = self.transport
        padder = FramePadder()
        while True:
            await self._wake_writer.wait()
            self._wake_writer.clear()
            while self._raw:
                await stream.write(self._raw.pop(0))
            if self._refused:
                raise _Closed
            if self._sasl is not None:
                continue  # the engine speaks once SASL is over
            while True:
                pending = transport.pending()
                if pending < 0:
                    raise _Closed
                if pending == 0:
                    break
                data = transport.peek(pending) or b""
                transport.pop(pending)
                out = padder.feed(bytes(data))
                if out:
                    await stream.write(out)
            self._drained.set()

    def _refuse(self, reason: str) -> None:
        """End the connection during SASL (what was queued, the outcome, is sent first)."""
        log.info("amqp connection refused peer=%s: %s", self.peer, reason)
        self._refused = True
        self._wake_writer.set()

    async def drained(self) -> None:
        """Return once the encoded output is below the outbox bound."""
        while self.transport.pending() > self.services.config.outbox_bytes:
            self._drained.clear()
            await self._drained.wait()

    async def _timer_loop(self) -> None:
        timeout = self.services.config.auth_timeout
        while True:
            now = time.monotonic()
            deadline = self.transport.tick(now)
            self._wake_writer.set()
            wall = self.services.clock()
            for audience, principal in list(self.tokens.items()):
                if principal.expires_at < wall:
                    del self.tokens[audience]
            if self._sasl is not None:
                if now - self._opened > timeout:
                    self._refuse(f"SASL not completed within {timeout:g} s")
            elif not self.tokens:
                if self._ever_authorized:
                    self.fail("amqp:unauthorized-access", "the $cbs token expired")
                elif now - self._opened > timeout:
                    self.fail("amqp:unauthorized-access",
                              f"no valid $cbs token within {timeout:g} s")
            delay = 1.0 if not deadline else min(max(deadline - now, 0.05), 1.0)
            await asyncio.sleep(delay)

    # -- authorization --------------------------------------------------------------------

    def authorize(self, audience: str, principal: ServicePrincipal) -> None:
        if len(self.tokens) >= 64 and audience not in self.tokens:
            del self.tokens[next(iter(self.tokens))]
        self.tokens[audience] = principal
        self._ever_authorized = True

    def principal(self, right: str) -> ServicePrincipal | None:
        """A live principal of this connection holding ``right`` (any live one if none)."""
        wall = self.services.clock()
        live = [p for p in self.tokens.values() if p.expires_at >= wall]
        for candidate in live:
            if right in candidate.rights:
                return candidate
        return live[0] if live else None

    # -- the engine ---------------------------------------------------------------------------

    def fail(self, condition: str, description: str) -> None:
        """Close the connection with an error condition (sent once, then the socket ends)."""
        conn = self.connection
        if not conn.state & conn.LOCAL_CLOSED:
            log.info("amqp connection closed peer=%s condition=%s: %s", self.peer, condition,
                     description)
            conn.condition = Condition(condition, description)
            if conn.state & conn.LOCAL_UNINIT:
                conn.open()
            conn.close()
        self.process()

    def process(self) -> None:
        """Dispatch every pending engine event, then let the writer send the output."""
        from gateway.amqp.links import attach

        collector = self._collector
        while True:
            event = collector.peek()
            if event is None:
                break
            kind = event.type
            link: Any = event.link
            session: Any = event.session
            try:
                if kind == Event.CONNECTION_REMOTE_OPEN:
                    conn = self.connection
                    conn.container = self.services.host_name
                    if conn.state & conn.LOCAL_UNINIT:
                        conn.open()
                elif kind == Event.SESSION_REMOTE_OPEN:
                    if session.state & session.LOCAL_UNINIT:
                        # the session window: how much a peer may send before we read it
                        session.incoming_capacity = SESSION_CAPACITY
                        session.open()
                elif kind == Event.LINK_REMOTE_OPEN:
                    if link.state & link.LOCAL_UNINIT:
                        attach(self, link)
                elif kind == Event.LINK_FLOW:
                    handler = self.links.get(link)
                    if handler is not None:
                        handler.flow()
                elif kind == Event.DELIVERY:
                    handler = self.links.get(link)
                    if handler is not None and event.delivery is not None:
                        handler.delivery(event.delivery)
                elif kind in (Event.LINK_REMOTE_CLOSE, Event.LINK_REMOTE_DETACH):
                    handler = self.links.pop(link, None)
                    if handler is not None:
                        handler.closed()
                    if not link.state & link.LOCAL_CLOSED:
                        link.close()
                elif kind == Event.LINK_FINAL:
                    self.links.pop(link, None)
                elif kind == Event.SESSION_REMOTE_CLOSE:
                    for other, handler in list(self.links.items()):
                        if other.session == session:
                            handler.closed()
                            del self.links[other]
                    if not session.state & session.LOCAL_CLOSED:
                        session.close()
                elif kind == Event.CONNECTION_REMOTE_CLOSE:
                    conn = self.connection
                    if not conn.state & conn.LOCAL_CLOSED:
                        conn.close()
                elif kind == Event.TRANSPORT_ERROR:
                    condition = self.transport.condition
                    log.info("amqp transport error peer=%s: %s", self.peer,
                             condition.description if condition else "?")
            finally:
                collector.pop()
        self._wake_writer.set()
