"""The AMQP listeners: AMQP 1.0 over TLS (``amqp.port``, 5671 as on IoT Hub and Event Hubs)
and AMQP over WebSocket at ``/$servicebus/websocket`` on the HTTPS port (sub-protocol
``AMQPWSB10``, Event Hubs' WebSocket binding: gateway.amqp.websocket). Each connection is one
:class:`~gateway.amqp.engine.AmqpConnection`; the listener's :meth:`AmqpServer.serve` runs in
the app's TaskGroup and owns a TaskGroup of its connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from pathlib import Path
from typing import TYPE_CHECKING, Final

from gateway.amqp.services import Services

if TYPE_CHECKING:
    from aiohttp import web

READ_BYTES: Final = 64 * 1024  # as gateway.amqp.engine reads

__all__ = ["AmqpServer", "WEBSOCKET_PATH", "WS_SUBPROTOCOL", "amqp_ssl_context"]

log = logging.getLogger(__name__)

WEBSOCKET_PATH: Final = "/$servicebus/websocket"
WS_SUBPROTOCOL: Final = "AMQPWSB10"
HANDSHAKE_TIMEOUT: Final = 30.0


def amqp_ssl_context(cert: Path, key: Path) -> ssl.SSLContext:
    """TLS 1.2+ with the hub's server certificate; back ends authenticate over ``$cbs``,
    so no client certificate is asked for."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    ctx.load_cert_chain(cert, key)
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


class _SocketStream:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def read(self) -> bytes:
        return await self.reader.read(READ_BYTES)

    async def write(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()


class AmqpServer:
    def __init__(self, services: Services, ssl_context: ssl.SSLContext) -> None:
        self.services = services
        self.ssl_context = ssl_context
        self.port = 0
        self.live = 0
        self._server: asyncio.Server | None = None
        self._tg: asyncio.TaskGroup | None = None
        self._pending: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def start(self) -> None:
        """Bind the TLS listener (connections are served once :meth:`serve` runs)."""
        config = self.services.config
        self._server = await asyncio.start_server(
            self._accepted, config.bind, config.port, ssl=self.ssl_context,
            ssl_handshake_timeout=HANDSHAKE_TIMEOUT, reuse_address=True)
        self.port = int(self._server.sockets[0].getsockname()[1])
        log.info("amqp listening port=%s event_hub=%s", self.port, self.services.event_hub)

    async def serve(self) -> None:
        """Own the connections until cancelled (runs in the app's TaskGroup)."""
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                for reader, writer in self._pending:
                    tg.create_task(self._serve_socket(reader, writer))
                self._pending.clear()
                await asyncio.Event().wait()
        finally:
            self._tg = None
            if self._server is not None:
                self._server.close()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2.0):
                    await self._server.wait_closed()
            self._server = None

    def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.live >= self.services.config.max_connections:
            log.warning("amqp connection refused: %d connections open",
                        self.services.config.max_connections)
            writer.close()
            return
        if self._tg is None:
            if len(self._pending) >= self.services.config.max_connections:
                writer.close()
                return
            self._pending.append((reader, writer))
            return
        self._tg.create_task(self._serve_socket(reader, writer))

    async def _serve_socket(self, reader: asyncio.StreamReader,
                            writer: asyncio.StreamWriter) -> None:
        peer = str(writer.get_extra_info("peername"))
        self.live += 1
        try:
            from gateway.amqp.engine import AmqpConnection  # Proton: with the first client

            await AmqpConnection(self.services, peer).run(_SocketStream(reader, writer))
        except Exception:
            log.exception("amqp connection failed peer=%s", peer)
        finally:
            self.live -= 1
            writer.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2.0):
                    await writer.wait_closed()

    # -- WebSocket ---------------------------------------------------------------------------

    def add_websocket_route(self, app: web.Application) -> None:
        """AMQP over WebSocket on the service API's port (gateway.amqp.websocket, imported
        with the service API: gateway.api.lazy)."""
        from gateway.amqp.websocket import add_websocket_route

        add_websocket_route(app, self)
