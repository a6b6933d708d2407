"""AMQP over WebSocket at ``/$servicebus/websocket`` on the HTTPS port (sub-protocol
``AMQPWSB10``, Event Hubs' WebSocket binding): one :class:`~gateway.amqp.engine.AmqpConnection`
per upgraded request, counted with the TLS listener's connections of :class:`AmqpServer`.
Imported with the service API (gateway.api.lazy), which serves it."""

from __future__ import annotations

from functools import partial

from aiohttp import WSMsgType, web

from gateway.amqp.server import WEBSOCKET_PATH, WS_SUBPROTOCOL, AmqpServer


class _WebSocketStream:
    def __init__(self, ws: web.WebSocketResponse) -> None:
        self.ws = ws

    async def read(self) -> bytes:
        while True:
            msg = await self.ws.receive()
            if msg.type is WSMsgType.BINARY:
                if msg.data:
                    return bytes(msg.data)
                continue
            if msg.type is WSMsgType.TEXT:
                raise ConnectionError("AMQP in a WebSocket text frame")
            return b""  # CLOSE, CLOSING, CLOSED, ERROR

    async def write(self, data: bytes) -> None:
        await self.ws.send_bytes(data)


async def serve_websocket(server: AmqpServer, request: web.Request) -> web.StreamResponse:
    """``/$servicebus/websocket``: one AMQP connection for the request's lifetime."""
    ws = web.WebSocketResponse(protocols=(WS_SUBPROTOCOL,), compress=False,
                               max_msg_size=4 * 1024 * 1024, timeout=5.0)
    ready = ws.can_prepare(request)
    if not ready.ok or ready.protocol != WS_SUBPROTOCOL:
        raise web.HTTPBadRequest(
            text=f"expected a WebSocket upgrade with the sub-protocol {WS_SUBPROTOCOL}")
    if server.live >= server.services.config.max_connections:
        raise web.HTTPServiceUnavailable(text="too many AMQP connections")
    await ws.prepare(request)
    peer = str(request.remote)
    server.live += 1
    try:
        from gateway.amqp.engine import AmqpConnection

        await AmqpConnection(server.services, peer).run(_WebSocketStream(ws))
    finally:
        server.live -= 1
        await ws.close()
    return ws


def add_websocket_route(app: web.Application, server: AmqpServer) -> None:
    """Both spellings: azure-eventhub asks for the path, uamqp for it with a ``/``."""
    handler = partial(serve_websocket, server)
    app.router.add_get(WEBSOCKET_PATH, handler, allow_head=False)
    app.router.add_get(WEBSOCKET_PATH + "/", handler, allow_head=False)
