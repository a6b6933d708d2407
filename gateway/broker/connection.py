"""One MQTT connection: bytes in, session events, hub calls, bytes out.

This is the thin asyncio shell around the pure :class:`gateway.mqtt.session.ServerSession`
(aesthetics §1.2, convention 2): ``data_received`` feeds the session, handles the events in
order and flushes. It never blocks: work that needs the store (telemetry commits, subscription
persistence) returns a future whose callback sends the acknowledgement, so PUBACK goes out only
after the message is durable (DESIGN "One telemetry message", step 6) and in the order the
PUBLISH packets arrived (MQTT 3.1.1 §4.6: the store resolves commits in submission order).

Bounds: at most ``max_pending_acks`` QoS1 messages (or QoS 0 batches and requests) and
``max_pending_bytes`` bytes of messages per connection wait for their commit or answer, and at
most ``limits.pending_bytes_total`` bytes for the whole hub (reading pauses at either bound
until commits catch up); at most ``outbox_bytes`` may sit
unsent in the transport (a slower consumer is disconnected: its durable messages stay in the
store). A connection the hub closes while its peer is not reading (unsent bytes in the
transport) is aborted, so its buffers are freed at once and its identity stops counting as
connected, instead of lingering until the peer goes away.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from gateway.errors import AuthError, ForbiddenError, GatewayError, RemoteProtocolError
from gateway.hub.auth import SKEW_SECONDS
from gateway.hub.hub import PendingWill, PreparedTelemetry
from gateway.mqtt.packets import ConnackCode, Connect, Publish, Subscribe, Unsubscribe
from gateway.mqtt.session import (
    ConnectReceived,
    DisconnectReceived,
    PubackReceived,
    PublishReceived,
    ServerSession,
    SessionState,
    SubscribeReceived,
    UnsubscribeReceived,
)
from gateway.store.log import Record

if TYPE_CHECKING:
    from gateway.broker.broker import Broker
    from gateway.hub.auth import Principal

log = logging.getLogger(__name__)

ROW_OVERHEAD = 128
"""Bytes counted per pending message beyond its body (the row tuple, the record)."""

OP_OVERHEAD = 2048
"""Bytes counted per pending twin or method request (its task, frame and answer)."""


class _Commit:
    """One batch's commit as the PUBACK queue waits for it: called by the log once the
    transaction is over (:meth:`gateway.hub.hub.Hub.append_then`), instead of a future whose
    callback would cost a loop turn per commit."""

    __slots__ = ("conn", "acked", "finished", "error")

    def __init__(self, conn: MqttConnection, acked: bool) -> None:
        self.conn = conn
        self.acked = acked  # it holds QoS 1 messages (PUBACKs wait for it)
        self.finished = False
        self.error: BaseException | None = None

    def __call__(self, error: BaseException | None) -> None:
        self.finished = True
        self.error = error
        conn = self.conn
        if error is not None and self.acked:
            conn.refuse_more()  # nothing read after a refused batch may be stored
        conn._drain_acks()


class MqttConnection(asyncio.Protocol):
    """asyncio protocol for one client connection (TCP, TLS or unix socket)."""

    def __init__(self, broker: Broker, listener: str) -> None:
        self.broker = broker
        self.listener = listener
        cfg = broker.config
        self.session = ServerSession(
            max_packet_size=cfg.max_packet_size,
            max_inflight=cfg.max_inflight,
            connect_timeout=cfg.connect_timeout,
            now=time.monotonic(),
        )
        self.principal: Principal | None = None
        self.client_id = ""
        self.peer = "?"
        self.will: PendingWill | None = None
        self.closed = False
        self.clean_disconnect = False
        self.transport: asyncio.Transport | None = None
        self._pending_acks = 0
        self._pending_bytes = 0  # message bytes waiting in _acks for their commit
        self._max_acks = cfg.max_pending_acks
        self._max_bytes = cfg.max_pending_bytes
        # (packet ids to PUBACK, the future they wait for, bytes held until it is done,
        # what it counts against max_pending_acks: its packet ids, or 1 for QoS 0 work)
        # A list, not a deque: an empty deque holds ~600 bytes, an empty list 56; the done
        # ones are removed with one slice deletion per drain.
        self._acks: list[tuple[list[int], asyncio.Future[Any] | _Commit | None, int, int]] = []
        self._paused = False
        self._refused = False  # a commit was refused at once (store full): read nothing more
        self.deadline_slot: int | None = None  # in broker.deadlines (connect, keep-alive, SAS)
        self._expires: float | None = None  # SAS token expiry, on time.monotonic's clock
        # Per-connection cache: topic -> prepared telemetry (props JSON and its size).
        self._topic_cache: dict[str, Any] = {}
        self._close_reason = ""
        self._flush_soon = False
        self._stamps = False  # the identity may send stamped on-behalf-of telemetry

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's are not subclasses
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else (peer or self.listener)
        self.broker.connection_opened(self)
        self._arm_timer()

    def data_received(self, data: bytes) -> None:
        if self.closed or self._refused:
            return
        try:
            events = self.session.receive(data, time.monotonic())
        except RemoteProtocolError as exc:
            self.flush()  # a refusal CONNACK may be queued (unsupported level, empty id)
            self.fail(f"protocol error: {exc}")
            return
        if not events:
            self.flush()
            return
        rows: list[Any] = []
        ack_ids: list[int] = []
        try:
            for event in events:
                if type(event) is PublishReceived:
                    self._on_publish(event.packet, rows, ack_ids)
                elif type(event) is ConnectReceived:
                    self._on_connect(event.packet)
                elif type(event) is PubackReceived:
                    self.broker.puback_received(self, event.packet_id)
                elif type(event) is SubscribeReceived:
                    self._on_subscribe(event.packet)
                elif type(event) is UnsubscribeReceived:
                    self._on_unsubscribe(event.packet)
                elif type(event) is DisconnectReceived:
                    self.clean_disconnect = True
                    self._close_reason = "client disconnected"
                if self.closed or self._refused:
                    break
        except (ForbiddenError, RemoteProtocolError, GatewayError) as exc:
            # Commit what came before the offending packet, then drop the connection
            # (IoT Hub closes the link on a bad topic, QoS 2 or an oversize message).
            if rows:
                self._commit(rows, ack_ids)
            self.fail(str(exc))
            return
        if rows:
            self._commit(rows, ack_ids)
        self.flush()
        if self.clean_disconnect and self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.broker.blocked.discard(self)
        self.broker.deadlines.cancel(self)
        reason = self._close_reason or (f"connection lost: {exc}" if exc else "peer closed")
        self.broker.connection_closed(self, reason)

    # -- packet handlers -------------------------------------------------------------------

    def _on_connect(self, packet: Connect) -> None:
        self.client_id = packet.client_id
        try:
            principal = self.broker.authenticate(self, packet)
        except AuthError as exc:
            log.warning(
                "connection refused client_id=%r peer=%s listener=%s reason=%s",
                packet.client_id, self.peer, self.listener, exc.reason,
            )
            self._close_reason = f"refused: {exc.reason}"
            self.session.refuse(ConnackCode(exc.connack))
            self.flush()
            self.closed = True
            if self.transport is not None:
                self.transport.close()
            return
        self.principal = principal
        # a device's own connection may be a child gateway's (Hub.stamped_record checks)
        self._stamps = (principal.module_id is None and principal.provisioning is None
                        and self.broker.hub.on_behalf is not None)
        if packet.will is not None:
            self.will = self.broker.hub.check_will(principal, packet.will)
        session_present = self.broker.attach(self, packet.clean_session)
        self.session.accept(session_present)
        self.after_flush(lambda: self.broker.connection_ready(self))
        if principal.expires_at is not None:
            self._arm_expiry(principal.expires_at)
        self._arm_timer()

    def _on_publish(self, packet: Publish, rows: list[Any], ack_ids: list[int]) -> None:
        """Telemetry rows join this read's batch (one commit); any other publish (a twin
        request, a method response) is handled by the hub, which may return a future: its
        PUBACK then waits for it, in order with the batch's (MQTT 3.1.1 §4.6)."""
        assert self.principal is not None
        prepared = self._topic_cache.get(packet.topic)
        if prepared is None:
            if self._stamps:  # a child gateway's forwarded messages: a topic per message
                record = self.broker.hub.stamped_record(self.principal, packet.topic,
                                                        packet.payload, packet.retain)
                if record is not None:
                    rows.append(record)
                    if packet.qos == 1:
                        assert packet.packet_id is not None
                        ack_ids.append(packet.packet_id)
                    return
            prepared = self.broker.hub.prepare_publish(self.principal, packet.topic)
            if type(prepared) is PreparedTelemetry and len(self._topic_cache) < 64:
                self._topic_cache[packet.topic] = prepared  # twin topics carry a fresh $rid
        result = self.broker.hub.handle_publish(self, prepared, packet)
        if isinstance(result, Record):
            rows.append(result)
            if packet.qos == 1:
                assert packet.packet_id is not None
                ack_ids.append(packet.packet_id)
            return
        if rows:  # keep PUBACK order: the batch so far is acknowledged before this one
            self._commit(list(rows), list(ack_ids))
            rows.clear()
            ack_ids.clear()
        if packet.qos == 1:
            assert packet.packet_id is not None
            self._queue_ack([packet.packet_id], result, len(packet.payload) + OP_OVERHEAD)
        elif result is not None:  # QoS 0: no PUBACK, but it counts until it is done
            self._queue_ack([], result, len(packet.payload) + OP_OVERHEAD)

    def _on_subscribe(self, packet: Subscribe) -> None:
        assert self.principal is not None
        future = self.broker.subscribe(self, packet)
        pid = packet.packet_id

        def done(fut: asyncio.Future[list[int]]) -> None:
            if self.closed:
                return
            if fut.cancelled() or fut.exception() is not None:
                self.fail(f"subscribe failed: {fut.exception()}")
                return
            self.session.suback(pid, fut.result())
            self.flush()

        future.add_done_callback(done)

    def _on_unsubscribe(self, packet: Unsubscribe) -> None:
        future = self.broker.unsubscribe(self, packet)
        pid = packet.packet_id

        def done(fut: asyncio.Future[None]) -> None:
            if self.closed or fut.cancelled() or fut.exception() is not None:
                return
            self.session.unsuback(pid)
            self.flush()

        future.add_done_callback(done)

    # -- commits and acknowledgements ------------------------------------------------------

    def _commit(self, rows: list[Any], ack_ids: list[int]) -> None:
        """Append one batch; its rows (their bodies) count as pending until it commits, QoS 0
        ones too (they are in memory just the same)."""
        if len(rows) == 1:
            nbytes = len(rows[0].body) + ROW_OVERHEAD
        else:
            nbytes = sum([len(r.body) for r in rows]) + ROW_OVERHEAD * len(rows)
        commit = _Commit(self, bool(ack_ids))
        self._queue_ack(ack_ids, commit, nbytes)  # queued first: a refusal calls back at once
        self.broker.hub.append_then(rows, commit)

    def refuse_more(self) -> None:
        """A commit was refused: what the client sends after it must not be stored either,
        or it would be stored without its PUBACK (which waits behind the refusal) and come
        again as a duplicate. Reading stops; the connection closes once the PUBACKs earned
        before the refusal are out."""
        self._refused = True
        if not self._paused and self.transport is not None and not self.closed:
            self._paused = True
            self.transport.pause_reading()

    def _queue_ack(self, packet_ids: list[int], future: asyncio.Future[Any] | _Commit | None,
                   nbytes: int = 0) -> None:
        """PUBACK ``packet_ids`` once ``future`` is done (None: at once), never before the
        acknowledgements queued earlier. A failed future means "not durable": no PUBACK, the
        connection closes and the client resends (at-least-once). ``nbytes`` counts against
        the connection's and the hub's pending-bytes bounds until then."""
        if packet_ids and not isinstance(future, _Commit) and future is not None and future.done() \
                and not future.cancelled() and future.exception() is not None:
            self.refuse_more()  # refused at once (reject-new at the byte cap)
        count = len(packet_ids) or 1
        self._acks.append((packet_ids, future, nbytes, count))
        self._pending_acks += count
        broker = self.broker
        if nbytes:
            self._pending_bytes += nbytes
            broker.pending_bytes += nbytes
        if not self._paused and (
            self._pending_acks >= self._max_acks
            or self._pending_bytes >= self._max_bytes
            or broker.pending_bytes >= broker.pending_bytes_total
        ):
            self._pause()
        if future is None:
            self._drain_acks()
        elif not isinstance(future, _Commit):
            future.add_done_callback(self._drain_acks)

    def _drain_acks(self, _: object = None) -> None:
        """Send the PUBACKs whose commits are done, in order. When one failed, the ones
        earned before it are still sent (those messages are stored), then the connection
        closes; later ones are never acknowledged (the client resends them)."""
        acks = self._acks
        ready: list[int] = []
        released = 0
        failure: BaseException | str | None = None
        done = 0
        for packet_ids, future, nbytes, count in acks:
            if future is not None:
                if isinstance(future, _Commit):
                    if not future.finished:
                        break
                    error: BaseException | str | None = future.error
                elif not future.done():
                    break
                else:
                    error = "cancelled" if future.cancelled() else future.exception()
                if error is not None:
                    if packet_ids:
                        if failure is None and not self.closed:
                            failure = error
                    else:
                        log.error("background step failed: %s", error)
            done += 1
            self._pending_acks -= count
            released += nbytes
            if failure is None:
                ready += packet_ids
        if done:
            del acks[:done]
        if released:
            self._pending_bytes -= released
            self.broker.release_pending(released)
        if self.closed:
            return
        if ready:
            self.session.ack_many(ready)
            self.flush()
        if failure is not None:
            self.fail(f"not acknowledged: {failure}")
            return
        if self._paused:
            self.maybe_resume()

    def _pause(self) -> None:
        self._paused = True
        assert self.transport is not None
        self.transport.pause_reading()
        if self.broker.pending_bytes >= self.broker.pending_bytes_total:
            self.broker.blocked.add(self)

    def maybe_resume(self) -> None:
        """Read again once this connection is under half of its own bounds and the hub is
        under its total (the broker calls this when the total falls)."""
        cfg = self.broker.config
        if (
            not self._paused or self.closed or self._refused
            or self._pending_acks >= cfg.max_pending_acks // 2
            or self._pending_bytes >= cfg.max_pending_bytes // 2
        ):
            return
        if self.broker.pending_bytes >= self.broker.pending_bytes_total:
            self.broker.blocked.add(self)
            return
        self.broker.blocked.discard(self)
        self._paused = False
        assert self.transport is not None
        self.transport.resume_reading()

    # -- output ------------------------------------------------------------------------------

    def after_flush(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` once the packets queued now (a CONNACK, a SUBACK) have been written, so
        deliveries it starts follow them on the wire."""
        asyncio.get_running_loop().call_soon(self._run_if_open, fn)

    def _run_if_open(self, fn: Callable[[], None]) -> None:
        if not self.closed:
            self.flush()
            fn()

    def flush(self) -> None:
        data = self.session.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)
            if self.transport.get_write_buffer_size() > self.broker.config.outbox_bytes:
                self.fail("slow consumer: outbox over its bound")

    def publish(self, topic: str, payload: bytes, qos: int) -> int | None:
        """Send a PUBLISH to this client (QoS 1 returns the packet id, tracked in flight).
        It is written at the end of this turn of the event loop, with whatever else is queued
        for this client meanwhile: one write (one TLS record) for a burst of answers."""
        pid = self.session.publish(topic, payload, qos)
        if not self._flush_soon:
            self._flush_soon = True
            asyncio.get_running_loop().call_soon(self._flush_queued)
        return pid

    def _flush_queued(self) -> None:
        self._flush_soon = False
        if not self.closed:
            self.flush()

    @property
    def can_publish(self) -> bool:
        return not self.closed and self.session.state is SessionState.CONNECTED and not self.session.inflight_full

    # -- closing -----------------------------------------------------------------------------

    def fail(self, reason: str) -> None:
        """Close the connection because of ``reason`` (logged once, with the identity)."""
        if self.closed:
            return
        log.warning(
            "closing connection client_id=%r peer=%s reason=%s", self.client_id, self.peer, reason
        )
        self._close_reason = reason
        self.close()

    def close(self) -> None:
        """Close gracefully when everything written has left; abort when the peer has not
        taken what we sent (a slow consumer, a client that never reads): waiting for it
        would keep the buffers and the identity's "connected" state for as long as the peer
        likes."""
        if self._flush_soon and not self.closed:
            self.flush()  # what was published before the close still goes out first
        self.closed = True
        self.session.close()
        self.broker.blocked.discard(self)
        transport = self.transport
        if transport is not None:
            if transport.get_write_buffer_size() > 0:
                transport.abort()
            else:
                transport.close()

    def _arm_timer(self) -> None:
        """Put this connection's next deadline (the session's, or the token's expiry if
        sooner) in the broker's deadline wheel."""
        deadline = self.session.deadline()
        expires = self._expires
        if expires is not None and (deadline is None or expires < deadline):
            deadline = expires
        if deadline is None:
            self.broker.deadlines.cancel(self)
        else:
            self.broker.deadlines.arm(self, deadline)

    def deadline_reached(self) -> None:
        if self.closed:
            return
        now = time.monotonic()
        if self._expires is not None and now >= self._expires:
            self.fail("SAS token expired")
            return
        deadline = self.session.deadline()
        if deadline is not None and now >= deadline:
            if self.session.state is SessionState.AWAIT_CONNECT:
                self.fail("no CONNECT within the connect timeout")
            else:
                self.fail(f"keep-alive expired ({self.session.keepalive} s x 1.5 without traffic)")
            return
        self._arm_timer()

    def _arm_expiry(self, expires_at: float) -> None:
        """Close when the SAS token expires (IoT Hub ref §1.4). ``expires_at`` includes the
        5-minute clock-skew allowance; a token still valid by its own ``se`` is dropped at
        ``se``, one accepted only thanks to the allowance at the end of the allowance."""
        now = time.time()
        stated = expires_at - SKEW_SECONDS
        delay = (stated if stated > now else expires_at) - now
        self._expires = time.monotonic() + max(delay, 1.0)
