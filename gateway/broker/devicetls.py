"""The device ports' TLS (MQTT 8883, HTTPS 443), its pyOpenSSL context built on first use.

pyOpenSSL and ``cryptography`` are several MB of an idle hub's resident memory (issue 16), and
a hub whose devices connect over the local listener, or not yet, never needs them. So
:class:`DeviceTls` checks at start, with Python's ``ssl`` alone, that the server certificate
and key are a pair (a :class:`~gateway.errors.ConfigError` if not: the hub refuses to start,
as it did when it built the context then), and builds the context of
:func:`gateway.broker.tls.server_context` in a worker thread when the first TLS bytes of a run
arrive. Connections whose bytes arrive before it is ready wait in a bounded list
(:data:`MAX_PENDING`; beyond it a connection is closed at once) and are handed to
:class:`~gateway.broker.tls.TlsServerProtocol` with what they sent; later connections get
one directly. A client sees no difference except that the first handshake of a run waits for
the build (about 0.1 s: importing pyOpenSSL and cryptography, loading the files).

:func:`peer_certificate_chain` lives here, not in gateway.broker.tls, so the broker and the
HTTP device API read a connection's client certificates without importing pyOpenSSL.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Final

from gateway.errors import ConfigError

if TYPE_CHECKING:
    from OpenSSL import SSL

    from gateway.broker.tls import TlsServerProtocol

__all__ = ["DeviceTls", "MAX_PENDING", "PEER_CHAIN", "peer_certificate_chain"]

log = logging.getLogger(__name__)

PEER_CHAIN: Final = "peer_cert_chain"
"""``get_extra_info`` name: the client's certificates as DER, leaf first (None: none sent)."""
MAX_PENDING: Final = 256
"""Connections that may wait for the context to be built; more are closed at once."""
MAX_EARLY_BYTES: Final = 64 * 1024
"""What a waiting connection may send before the context is ready (a ClientHello is < 2 KB)."""


def peer_certificate_chain(transport: asyncio.BaseTransport | None) -> list[bytes] | None:
    """The client certificates of a connection, DER, leaf first: the whole chain from our TLS
    layer; from a Python ``ssl`` transport (aiohttp's), the leaf alone."""
    if transport is None:
        return None
    chain = transport.get_extra_info(PEER_CHAIN)
    if chain is not None:
        return list(chain) or None
    ssl_object = transport.get_extra_info("ssl_object")
    if isinstance(ssl_object, (ssl.SSLObject, ssl.SSLSocket)):
        der = ssl_object.getpeercert(binary_form=True)
        return [der] if der else None
    return None


def check_pair(cert_file: Path, key_file: Path) -> None:
    """:class:`ConfigError` unless ``key_file`` is the private key of ``cert_file`` (both PEM,
    readable)."""
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert_file, key_file)
    except ssl.SSLError as exc:
        raise ConfigError(f"server certificate {cert_file} and key {key_file} are not a "
                          f"usable pair: {exc.reason or exc}", path="data_dir") from None
    except OSError as exc:
        raise ConfigError(f"server certificate or key unreadable: {exc}",
                          path="data_dir") from None


def _build(cert_file: Path, key_file: Path) -> tuple[SSL.Context, type[TlsServerProtocol]]:
    from gateway.broker import tls  # pyOpenSSL, cryptography: here, in a worker thread

    return tls.server_context(cert_file, key_file), tls.TlsServerProtocol


class DeviceTls:
    """The TLS layer's protocol factory for one server certificate; see the module
    docstring. ``builds`` counts the contexts built (one per run, unless a build failed)."""

    def __init__(self, cert_file: Path, key_file: Path, *,
                 max_pending: int = MAX_PENDING) -> None:
        check_pair(cert_file, key_file)
        self.cert_file = cert_file
        self.key_file = key_file
        self.max_pending = max_pending
        self.builds = 0
        self._context: SSL.Context | None = None
        self._protocol: type[TlsServerProtocol] | None = None
        self._pending: list[_Waiting] = []
        self._building: asyncio.Task[None] | None = None

    @property
    def context(self) -> SSL.Context | None:
        """The pyOpenSSL context, once built."""
        return self._context

    @property
    def pending(self) -> int:
        """Connections waiting for the context."""
        return len(self._pending)

    def protocol(self, handshake_timeout: float,
                 make_inner: Callable[[], asyncio.Protocol]) -> asyncio.Protocol:
        """The raw protocol of a new TLS connection, whose plaintext goes to ``make_inner()``."""
        if self._context is not None and self._protocol is not None:
            return self._protocol(self._context, handshake_timeout, make_inner)
        return _Waiting(self, handshake_timeout, make_inner)

    async def ready(self) -> SSL.Context:
        """Build the context now (if it is not built yet) and return it."""
        if self._context is None:
            if self._building is None:
                self._building = asyncio.get_running_loop().create_task(
                    self._build(), name="device-tls-build")
            await asyncio.shield(self._building)
        if self._context is None:
            raise ConfigError("the device TLS context could not be built", path="data_dir")
        return self._context

    def close(self) -> None:
        """Close the connections still waiting (the hub stops)."""
        pending, self._pending = self._pending, []
        for waiting in pending:
            waiting.fail()

    # -- the waiting list --------------------------------------------------------------------

    def _wait(self, waiting: _Waiting) -> bool:
        if len(self._pending) >= self.max_pending:
            log.warning("tls connection refused peer=%s reason=%d connections already wait "
                        "for the tls context", waiting.peer, len(self._pending))
            return False
        self._pending.append(waiting)
        if self._building is None:
            self._building = asyncio.get_running_loop().create_task(
                self._build(), name="device-tls-build")
        return True

    def _forget(self, waiting: _Waiting) -> None:
        try:
            self._pending.remove(waiting)
        except ValueError:
            pass

    async def _build(self) -> None:
        try:
            context, protocol = await asyncio.to_thread(_build, self.cert_file, self.key_file)
        except Exception:
            log.exception("the device tls context could not be built")
            self._building = None  # the next connection tries again
            self.close()
            return
        self._context, self._protocol = context, protocol
        self.builds += 1
        log.info("device tls context built waiting=%d", len(self._pending))
        pending, self._pending = self._pending, []
        for waiting in pending:
            waiting.start(context, protocol)


class _Waiting(asyncio.Protocol):
    """A TLS connection accepted before the context was built: holds what the client sent
    until :meth:`start` hands the connection to a :class:`TlsServerProtocol`, then forwards
    to it (``data_received`` is bound once by the listener: it stays this one's)."""

    __slots__ = ("_tls", "_timeout", "_make_inner", "_raw", "_early", "_size", "_timer",
                 "_real", "peer")

    def __init__(self, device_tls: DeviceTls, handshake_timeout: float,
                 make_inner: Callable[[], asyncio.Protocol]) -> None:
        self._tls = device_tls
        self._timeout = handshake_timeout
        self._make_inner = make_inner
        self._raw: asyncio.Transport | None = None
        self._early: list[bytes] = []
        self._size = 0
        self._timer: asyncio.TimerHandle | None = None
        self._real: asyncio.Protocol | None = None
        self.peer = "?"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._raw = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "?"
        self._timer = asyncio.get_running_loop().call_later(self._timeout, self._expired)

    def data_received(self, data: bytes) -> None:
        if self._real is not None:
            self._real.data_received(data)
            return
        if self._raw is None or self._raw.is_closing():
            return
        first = not self._early
        self._early.append(data)
        self._size += len(data)
        if self._size > MAX_EARLY_BYTES:
            log.warning("tls handshake failed peer=%s reason=%d bytes before the tls context "
                        "was ready", self.peer, self._size)
            self._tls._forget(self)
            self.fail()
        elif first and not self._tls._wait(self):
            self.fail()

    def start(self, context: SSL.Context, protocol: type[TlsServerProtocol]) -> None:
        """The context is ready: the connection is the TLS layer's from here."""
        self._cancel_timer()
        if self._raw is None or self._raw.is_closing():
            return
        real = protocol(context, self._timeout, self._make_inner)
        self._real = real
        real.connection_made(self._raw)
        early, self._early = self._early, []
        for chunk in early:
            real.data_received(chunk)

    def fail(self) -> None:
        self._cancel_timer()
        self._early = []
        if self._raw is not None:
            self._raw.close()

    def _expired(self) -> None:
        self._timer = None
        log.warning("tls handshake failed peer=%s reason=no handshake within %g s",
                    self.peer, self._timeout)
        self._tls._forget(self)
        self.fail()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def eof_received(self) -> bool | None:
        if self._real is not None:
            return self._real.eof_received()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        if self._real is not None:
            self._real.connection_lost(exc)
        else:
            self._tls._forget(self)

    def pause_writing(self) -> None:
        if self._real is not None:
            self._real.pause_writing()

    def resume_writing(self) -> None:
        if self._real is not None:
            self._real.resume_writing()
