"""Deadlines for HTTPS clients on the service port: slow or stalled clients (a "slowloris"
sending its headers a byte at a time, a body that never ends) are cut off instead of holding a
connection, a descriptor and a request slot for as long as they like.

* ``api.header_timeout``: from the connection's start (after the TLS handshake, which has the
  same deadline) or from the first byte of a later request on a kept-alive connection, until
  aiohttp has parsed the request line and headers (the handler starts);
* ``api.body_timeout``: from then until the request body has arrived (read or not).

Idle kept-alive connections are aiohttp's own ``keepalive_timeout``. The connection side lives
in :class:`HttpDeadlines` (a :class:`~gateway.broker.listener.Listener` wrapper, so it also
gives the connection's admission slot back); the request side in :func:`deadline_middleware`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from gateway.broker.listener import Admission, _Counted

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class HttpDeadlines(_Counted):
    """The header deadline of one HTTPS connection."""

    FORWARDED = ("eof_received", "pause_writing", "resume_writing")

    def __init__(self, inner: asyncio.BaseProtocol, admission: Admission, address: str | None,
                 header_timeout: float) -> None:
        super().__init__(inner, admission, address)
        self._inner_data = getattr(inner, "data_received")
        self._header_timeout = header_timeout
        self._deadline: asyncio.TimerHandle | None = None
        self._in_request = False
        self._transport: asyncio.BaseTransport | None = None
        self._peer = address or "?"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        self._arm()
        super().connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if not self._in_request and self._deadline is None:
            self._arm()
        self._inner_data(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def request_started(self) -> None:
        self._disarm()
        self._in_request = True

    def request_finished(self) -> None:
        self._in_request = False

    def _arm(self) -> None:
        if self._header_timeout > 0:
            self._deadline = asyncio.get_running_loop().call_later(self._header_timeout, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        log.info("https client cut off peer=%s reason=no request headers within %g s",
                 self._peer, self._header_timeout)
        if self._transport is not None:
            self._transport.abort()  # type: ignore[attr-defined]


def deadline_middleware(body_timeout: float) -> Any:
    """The request side: stops the header deadline, and aborts a request whose body has not
    arrived within ``body_timeout`` seconds."""

    @web.middleware
    async def deadlines(request: web.Request, handler: Handler) -> web.StreamResponse:
        transport = request.transport
        proto = transport.get_protocol() if transport is not None else None
        conn = proto if isinstance(proto, HttpDeadlines) else None
        if conn is not None:
            conn.request_started()
        timer = None
        if body_timeout > 0 and request.body_exists and transport is not None:
            timer = asyncio.get_running_loop().call_later(
                body_timeout, _body_expired, request, transport, body_timeout)
        try:
            return await handler(request)
        finally:
            if timer is not None:
                timer.cancel()
            if conn is not None:
                conn.request_finished()

    return deadlines


def _body_expired(request: web.Request, transport: asyncio.BaseTransport,
                  timeout: float) -> None:
    if not request.content.is_eof():
        log.info("https client cut off peer=%s reason=request body not received within %g s",
                 request.remote, timeout)
        transport.abort()  # type: ignore[attr-defined]
