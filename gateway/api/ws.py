"""MQTT over WebSocket on the HTTPS port (IoT Hub ref §1.1, §15.2 (E); MQTT 3.1.1 §6).

``GET /$iothub/websocket`` with ``Upgrade: websocket`` and the sub-protocol ``mqtt`` becomes
one :class:`~gateway.broker.connection.MqttConnection` on the ``websocket`` listener. Binary
frames carry MQTT bytes in both directions; a frame may hold part of a packet or several
(MQTT 3.1.1 §6.0), so the connection sees a byte stream exactly as on port 8883. The upgrade
itself is not authenticated, as on IoT Hub: the CONNECT inside it is, by the same code as on
8883 -- including an X.509 client certificate, read from the HTTPS port's TLS handshake.

:class:`WebSocketTransport` is the seam: an ``asyncio.Transport`` the connection writes to.
``write`` must not block, so bytes are queued and one sender task per connection turns them
into frames (consecutive writes coalesced, up to :data:`FRAME_BYTES` per frame). The queue is
bounded by the connection itself: :meth:`WebSocketTransport.get_write_buffer_size` counts the
queued bytes plus the socket's buffer, so the connection's outbox bound (the slow-consumer
rule, ``mqtt.outbox_bytes``) applies as it does on TCP. ``pause_reading`` stops taking frames;
aiohttp then stops reading the socket.

Closing, either way: when the MQTT connection closes its transport, the sender sends what is
queued and then the WebSocket close frame; when the peer closes (or the socket drops), the
connection is told at once (``connection_lost``). A peer that neither reads nor answers the
close is cut off after :data:`CLOSE_TIMEOUT` seconds.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from functools import partial
from typing import TYPE_CHECKING, Any, Final

from aiohttp import WSMsgType, web

from gateway.api.errors import error_response
from gateway.broker.connection import MqttConnection

if TYPE_CHECKING:
    from gateway.broker.broker import Broker

__all__ = ["LISTENER", "SUBPROTOCOL", "WEBSOCKET_PATH", "WebSocketTransport",
           "add_websocket_route"]

log = logging.getLogger(__name__)

WEBSOCKET_PATH: Final = "/$iothub/websocket"
"""Where IoT Hub serves MQTT over WebSocket (ref §1.1)."""

SUBPROTOCOL: Final = "mqtt"
"""The WebSocket sub-protocol MQTT 3.1.1 §6.0 names, and the one the SDKs ask for."""

LISTENER: Final = "websocket"
"""The listener name the broker logs for these connections."""

FRAME_BYTES: Final = 64 * 1024
"""Queued writes are joined into one frame up to this size (a larger write goes alone)."""

MAX_FRAME_BYTES: Final = 4 * 1024 * 1024
"""Largest frame accepted from a client; the MQTT packet limit is enforced by the session."""

CLOSE_TIMEOUT: Final = 5.0
"""Seconds a closing WebSocket may take to flush and exchange close frames."""


class WebSocketTransport(asyncio.Transport):
    """What an :class:`MqttConnection` writes to when its peer speaks WebSocket.

    :meth:`receive_loop` feeds frames to the protocol; :meth:`send_loop` sends what the
    protocol wrote. Both run in the request handler that owns this transport."""

    def __init__(self, ws: web.WebSocketResponse, request: web.BaseRequest) -> None:
        super().__init__()
        self._ws = ws
        self._raw: asyncio.Transport | None = request.transport
        self._chunks: deque[bytes] = deque()
        self._inbox: list[bytes] = []  # frames received, not yet fed to the connection
        self._buffered = 0  # queued or being sent
        self._closing = False
        self._wake_sender = asyncio.Event()
        self._readable = asyncio.Event()  # set: reading (or closing); clear: paused
        self._readable.set()
        self._deadline: asyncio.TimerHandle | None = None

    # -- asyncio.Transport, as MqttConnection uses it ------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or not data:
            return
        chunk = bytes(data)
        self._chunks.append(chunk)
        self._buffered += len(chunk)
        self._wake_sender.set()

    def close(self) -> None:
        """Send what is queued, then the close frame; give up after :data:`CLOSE_TIMEOUT`."""
        if self._closing:
            return
        self._closing = True
        self._wake_sender.set()
        self._readable.set()
        self._deadline = asyncio.get_running_loop().call_later(CLOSE_TIMEOUT, self._cut)

    def abort(self) -> None:
        self._chunks.clear()
        self._buffered = 0
        self.close()
        if self._raw is not None:
            self._raw.abort()

    def is_closing(self) -> bool:
        return self._closing or self._ws.closed

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """``peername``, ``sockname``, ``ssl_object``, ``peercert``... of the HTTPS socket."""
        raw = self._raw
        return raw.get_extra_info(name, default) if raw is not None else default

    def pause_reading(self) -> None:
        if not self._closing:
            self._readable.clear()

    def resume_reading(self) -> None:
        self._readable.set()

    def is_reading(self) -> bool:
        return self._readable.is_set() and not self._closing

    def get_write_buffer_size(self) -> int:
        raw = self._raw
        return self._buffered + (raw.get_write_buffer_size() if raw is not None else 0)

    # -- the two loops -------------------------------------------------------------------------

    async def receive_loop(self, conn: MqttConnection) -> Exception | None:
        """Feed binary frames to ``conn`` until either side closes; returns the error that
        ended the WebSocket, if any.

        Frames already buffered are handed over together, in one ``data_received`` (so in
        one store commit and one PUBACK write), as a TCP read would: a client sending each
        packet in its own frame (paho, the Azure SDK) is not charged per frame."""
        ws = self._ws
        inbox = self._inbox
        loop = asyncio.get_running_loop()
        try:
            while not self._closing:
                if not self._readable.is_set():
                    self._deliver(conn)
                    await self._readable.wait()
                    continue
                msg = await ws.receive()  # returns without yielding while frames are buffered
                if msg.type is WSMsgType.BINARY:
                    inbox.append(msg.data)
                    if len(inbox) == 1:
                        loop.call_soon(self._deliver, conn)
                elif msg.type is WSMsgType.TEXT:
                    self._deliver(conn)
                    conn.fail("protocol error: MQTT in a text frame (MQTT 3.1.1 §6.0)")
                elif msg.type is WSMsgType.ERROR:
                    error = ws.exception()
                    return error if isinstance(error, Exception) else ConnectionError(str(msg.data))
                else:  # CLOSE, CLOSING, CLOSED
                    return None
            return None
        finally:
            self._deliver(conn)  # what came before the end (a PUBLISH, then DISCONNECT)

    def _deliver(self, conn: MqttConnection) -> None:
        inbox = self._inbox
        if inbox:
            data = inbox[0] if len(inbox) == 1 else b"".join(inbox)
            inbox.clear()
            conn.data_received(data)

    async def send_loop(self) -> None:
        """Send queued bytes as binary frames until the transport closes; then close."""
        ws = self._ws
        try:
            try:
                while True:
                    await self._wake_sender.wait()
                    self._wake_sender.clear()
                    while self._chunks:
                        frame = self._take()
                        await ws.send_bytes(frame)
                        self._buffered -= len(frame)
                    if self._closing:
                        break
            except ConnectionError as exc:  # the peer went away while we were sending
                log.debug("websocket send failed peer=%s: %s",
                          self.get_extra_info("peername"), exc)
            self._closing = True
            self._chunks.clear()
            self._buffered = 0
            await ws.close()
        finally:
            if self._deadline is not None:
                self._deadline.cancel()

    def _take(self) -> bytes:
        chunks = self._chunks
        first = chunks.popleft()
        if not chunks or len(first) >= FRAME_BYTES:
            return first
        parts, size = [first], len(first)
        while chunks and size < FRAME_BYTES:
            chunk = chunks.popleft()
            parts.append(chunk)
            size += len(chunk)
        return b"".join(parts)

    def _cut(self) -> None:
        """Drop the socket: the peer neither took our bytes nor answered the close."""
        if self._raw is not None and not self._raw.is_closing():
            log.info("websocket cut off peer=%s (no close within %g s)",
                     self.get_extra_info("peername"), CLOSE_TIMEOUT)
            self._raw.abort()


async def serve_websocket(broker: Broker, request: web.Request) -> web.StreamResponse:
    """The ``/$iothub/websocket`` handler: one MQTT connection for the request's lifetime."""
    ws = web.WebSocketResponse(protocols=(SUBPROTOCOL,), compress=False,
                               max_msg_size=MAX_FRAME_BYTES, timeout=CLOSE_TIMEOUT)
    ready = ws.can_prepare(request)
    if not ready.ok:
        return error_response(400, "ArgumentInvalid", "expected a WebSocket upgrade")
    if ready.protocol != SUBPROTOCOL:
        return error_response(400, "ArgumentInvalid",
                              "the WebSocket sub-protocol must be 'mqtt' (MQTT 3.1.1 §6.0)")
    await ws.prepare(request)
    transport = WebSocketTransport(ws, request)
    conn = MqttConnection(broker, LISTENER)
    conn.connection_made(transport)
    sender = asyncio.get_running_loop().create_task(
        transport.send_loop(), name=f"websocket-send {conn.peer}")
    error: Exception | None = None
    try:
        error = await transport.receive_loop(conn)
    except BaseException:
        sender.cancel()
        raise
    finally:
        # The connection may no longer write; whatever it queued is still sent.
        transport.close()
        conn.connection_lost(error)
    await sender
    return ws


def add_websocket_route(app: web.Application, broker: Broker) -> None:
    """Serve MQTT over WebSocket at :data:`WEBSOCKET_PATH` with ``broker``'s connections."""
    app.router.add_get(WEBSOCKET_PATH, partial(serve_websocket, broker), allow_head=False)
