"""The HTTPS port through the hub's own TLS layer (:mod:`gateway.broker.tls`), as an aiohttp
site: any client certificate passes the handshake and the whole chain it sent reaches the
identity check, on port 443 as on 8883 -- so X.509 devices work over MQTT-over-WebSocket and
the device HTTP API exactly as over MQTT (self-signed by thumbprint only, CA-signed through
intermediates), and a refused handshake is logged with its reason.
"""

from __future__ import annotations

import asyncio

from aiohttp import web
from OpenSSL import SSL

from gateway.broker.tls import TlsServerProtocol

__all__ = ["TlsSite"]


class TlsSite(web.BaseSite):
    """Like ``web.TCPSite(ssl_context=...)``, with pyOpenSSL memory-BIO TLS in front."""

    __slots__ = ("_handshake_timeout", "_host", "_port", "_tls")

    def __init__(self, runner: web.BaseRunner, host: str, port: int, *, tls: SSL.Context,
                 handshake_timeout: float = 60.0, backlog: int = 128) -> None:
        super().__init__(runner, backlog=backlog)
        self._host = host
        self._port = port
        self._tls = tls
        self._handshake_timeout = handshake_timeout

    @property
    def name(self) -> str:
        return f"https://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        handler = self._runner.server
        assert handler is not None
        tls, timeout = self._tls, self._handshake_timeout
        self._server = await asyncio.get_running_loop().create_server(
            lambda: TlsServerProtocol(tls, timeout, handler), self._host, self._port,
            reuse_address=True, backlog=self._backlog)
