"""The service API's HTTPS port, listening from the start; its application built with the
first connection (the idle footprint on a small board, issue 16).

aiohttp's server and client, the routes of every component and what they import are about a
quarter of an idle hub's resident memory, and an appliance's service API is often not called
for hours. So the hub binds and listens on ``api.port`` before it announces READY, exactly as
before (``hub.json`` names the port, the kernel completes TCP handshakes into the backlog at
once), but only :class:`LazyApi` watches the socket. The first time it is readable,
:class:`LazyApi` stops watching, imports the API's modules (in a worker thread, so the MQTT
side keeps running meanwhile), builds the real :class:`~gateway.api.server.ServiceApi` with
``build`` (every component's routes, in the order the hub always registered them) and hands it
the listening socket: its accept loop (gateway.broker.listener, with the same admission caps,
deadlines and TLS layer) takes that first connection from the backlog, and every later one.
Nothing a client sees differs, except that the very first connection of a run waits for the
build (a fraction of a second) before its TLS handshake is answered.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import socket
import ssl
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gateway.broker.listener import Admission, listening_socket

if TYPE_CHECKING:
    from OpenSSL import SSL

    from gateway.api.server import ServiceApi
    from gateway.broker.devicetls import DeviceTls

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class _Serving:
    """What :meth:`ServiceApi.serve` gets with the socket."""

    ssl_context: ssl.SSLContext | SSL.Context | DeviceTls | None
    admission: Admission | None
    header_timeout: float
    body_timeout: float


class LazyApi:
    """The service API's listening socket until the first connection, then the built API.

    ``build(port)`` makes the :class:`ServiceApi` with its routes (called once, on the event
    loop, with the port listened on); ``modules`` are imported first, in a worker thread (what
    ``build`` would import)."""

    def __init__(self, build: Callable[[int], ServiceApi], modules: Iterable[str] = ()) -> None:
        self._build = build
        self._modules = tuple(modules)
        self.api: ServiceApi | None = None
        self.port = 0
        self._sock: socket.socket | None = None
        self._serving: _Serving | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watching = False
        self._task: asyncio.Task[None] | None = None
        self._failed: asyncio.Future[None] | None = None

    async def start(self, host: str, port: int,
                    ssl_context: ssl.SSLContext | SSL.Context | DeviceTls | None, *,
                    admission: Admission | None = None, header_timeout: float = 10.0,
                    body_timeout: float = 60.0) -> None:
        """Bind and listen on ``host:port`` (as :meth:`ServiceApi.start`); the API is built when
        the first connection arrives."""
        self._loop = asyncio.get_running_loop()
        self._failed = self._loop.create_future()
        self._serving = _Serving(ssl_context, admission, header_timeout, body_timeout)
        self._sock = listening_socket(host, port)
        self._sock.setblocking(False)
        self.port = int(self._sock.getsockname()[1])
        self._loop.add_reader(self._sock.fileno(), self._first_connection)
        self._watching = True
        log.info("https service api listening port=%s", self.port)

    def _first_connection(self) -> None:
        self._unwatch()
        assert self._loop is not None
        if self._task is None:
            self._task = self._loop.create_task(self._serve(), name="service-api-build")

    def _unwatch(self) -> None:
        if self._watching and self._loop is not None and self._sock is not None:
            self._loop.remove_reader(self._sock.fileno())
            self._watching = False

    async def _serve(self) -> None:
        assert self._sock is not None and self._serving is not None
        try:
            if self._modules:
                await asyncio.to_thread(_import, self._modules)
            api = self._build(self.port)
            s = self._serving
            await api.serve(self._sock, s.ssl_context, admission=s.admission,
                            header_timeout=s.header_timeout, body_timeout=s.body_timeout)
        except Exception as exc:
            log.exception("the https service api could not be built")
            if self._sock is not None:  # refuse rather than leave clients in the backlog
                self._sock.close()
                self._sock = None
            assert self._failed is not None
            if not self._failed.done():
                self._failed.set_exception(exc)
            return
        self._sock = None  # the API's listener owns it now
        self.api = api
        log.info("https service api built port=%s", self.port)

    async def run(self) -> None:
        """Wait forever, or raise what building the API raised (in the hub's TaskGroup: a hub
        whose API cannot be built stops, as it did when it failed at start)."""
        assert self._failed is not None, "start() first"
        await asyncio.shield(self._failed)

    async def stop(self) -> None:
        self._unwatch()
        if self._task is not None and not self._task.done():
            self._task.cancel()
            await asyncio.wait({self._task})  # our own cancellation still propagates
        if self._failed is not None and self._failed.done() and not self._failed.cancelled():
            self._failed.exception()  # retrieved: reported by run() or build(), or logged
        if self.api is not None:
            await self.api.stop()
            self.api = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _import(modules: tuple[str, ...]) -> None:
    for name in modules:
        importlib.import_module(name)
