"""Deadlines for HTTPS clients on the service port: slow or stalled clients (a "slowloris"
sending its headers a byte at a time, a body that never ends) are cut off instead of holding a
connection, a descriptor and a request slot for as long as they like.

* ``api.header_timeout``: from the connection's start (after the TLS handshake, which has the
  same deadline) or from the first byte of a later request on a kept-alive connection, until
  aiohttp has parsed the request line and headers (the handler starts);
* ``api.body_timeout``: from then until the request body has arrived (read or not).

Idle kept-alive connections are aiohttp's own ``keepalive_timeout``. The connection side lives
in :class:`HttpDeadlines` (a :class:`~gateway.broker.listener.Listener` wrapper, so it also
gives the connection's admission slot back), the request side in :meth:`Deadlines.middleware`;
they meet through :class:`Deadlines`, keyed by the socket, so whatever TLS layer sits between
them (asyncio's, or one of our own) does not matter.
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
                 header_timeout: float, table: dict[int, HttpDeadlines]) -> None:
        super().__init__(inner, admission, address)
        self._table = table
        self._key: int | None = None
        self._inner_data = getattr(inner, "data_received")
        self._header_timeout = header_timeout
        self._deadline: asyncio.TimerHandle | None = None
        self._in_request = False
        self._transport: asyncio.BaseTransport | None = None
        self._peer = address or "?"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            self._key = sock.fileno()
            self._table[self._key] = self
        self._arm()
        super().connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if not self._in_request and self._deadline is None:
            self._arm()
        self._inner_data(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self._key is not None and self._table.get(self._key) is self:
            del self._table[self._key]
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


class Deadlines:
    """The header and body deadlines of one HTTPS listener: :meth:`wrap` for its
    :class:`~gateway.broker.listener.Listener`, :attr:`middleware` for its aiohttp app."""

    def __init__(self, header_timeout: float, body_timeout: float) -> None:
        self.header_timeout = header_timeout
        self.body_timeout = body_timeout
        self._conns: dict[int, HttpDeadlines] = {}  # socket descriptor -> its deadlines
        self.middleware = self._middleware()

    def wrap(self, inner: asyncio.BaseProtocol, admission: Admission,
             address: str | None) -> HttpDeadlines:
        return HttpDeadlines(inner, admission, address, self.header_timeout, self._conns)

    def _middleware(self) -> Any:
        body_timeout = self.body_timeout
        conns = self._conns

        @web.middleware
        async def deadlines(request: web.Request, handler: Handler) -> web.StreamResponse:
            """Stop the header deadline; abort a request whose body has not arrived within
            ``body_timeout`` seconds."""
            transport = request.transport
            sock = transport.get_extra_info("socket") if transport is not None else None
            conn = conns.get(sock.fileno()) if sock is not None else None
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
