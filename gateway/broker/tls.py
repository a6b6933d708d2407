"""TLS termination over ``ssl.MemoryBIO``, so every refused handshake is logged with its reason.

asyncio's ``create_server(ssl=...)`` drops a connection whose handshake fails without telling
anyone (no exception handler call, no log line), so a device with an untrusted certificate, a
TLS 1.1 client or plain MQTT on port 8883 would leave no trace. ``start_tls`` cannot be used
either: uvloop starts reading only after ``connection_made`` returns, so the ClientHello can
reach the raw protocol before the handshake task runs. Driving an ``SSLObject`` ourselves keeps
TLS in one small, synchronous adapter: raw bytes in, plaintext to the inner protocol; the inner
protocol's writes are encrypted and sent. (Python's own ``asyncio.sslproto`` is built the same
way.) Cost: a few Python calls per socket read, not per message.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

READ_SIZE = 256 * 1024


class TlsServerProtocol(asyncio.Protocol):
    """The raw TCP side of one TLS connection; the inner protocol sees a plaintext transport."""

    def __init__(self, context: ssl.SSLContext, handshake_timeout: float,
                 make_inner: Callable[[], asyncio.Protocol]) -> None:
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self.ssl_object = context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self._timeout = handshake_timeout
        self._make_inner = make_inner
        self._inner: asyncio.Protocol | None = None
        self.raw: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.peer = "?"
        self.closing = False

    # -- raw side ------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.raw = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "?"
        self._timer = asyncio.get_running_loop().call_later(self._timeout, self._handshake_expired)

    def data_received(self, data: bytes) -> None:
        self._incoming.write(data)
        if self._inner is None and not self._handshake():
            return
        chunks = []
        try:
            while True:
                chunk = self.ssl_object.read(READ_SIZE)
                if not chunk:  # close_notify from the peer
                    break
                chunks.append(chunk)
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLError as exc:
            self._fail(f"tls error peer={self.peer} reason={_reason(exc)}")
            return
        self.flush()
        if chunks and self._inner is not None:
            self._inner.data_received(chunks[0] if len(chunks) == 1 else b"".join(chunks))

    def eof_received(self) -> bool | None:
        return None  # close the transport; connection_lost tells the inner protocol

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._inner is not None:
            self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()

    # -- handshake -----------------------------------------------------------------------------

    def _handshake(self) -> bool:
        try:
            self.ssl_object.do_handshake()
        except ssl.SSLWantReadError:
            self.flush()
            return False
        except ssl.SSLError as exc:
            self.flush()  # the alert, if OpenSSL made one
            self._fail(f"tls handshake failed peer={self.peer} reason={_reason(exc)}")
            return False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.flush()
        self._inner = self._make_inner()
        self._inner.connection_made(TlsTransport(self))
        return True

    def _handshake_expired(self) -> None:
        self._fail(f"tls handshake failed peer={self.peer} reason=no handshake within "
                   f"{self._timeout:g} s")

    def _fail(self, line: str) -> None:
        log.warning("%s", line)
        if self.raw is not None:
            self.raw.close()

    # -- inner side ----------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self.closing or self.raw is None:
            return
        try:
            self.ssl_object.write(data)
        except ssl.SSLError as exc:
            self._fail(f"tls error peer={self.peer} reason={_reason(exc)}")
            return
        self.flush()

    def flush(self) -> None:
        data = self._outgoing.read()
        if data and self.raw is not None and not self.raw.is_closing():
            self.raw.write(data)

    def close(self) -> None:
        if self.closing:
            return
        self.closing = True
        try:
            self.ssl_object.unwrap()  # queue our close_notify; we do not wait for the peer's
        except ssl.SSLError:
            pass
        self.flush()
        if self.raw is not None:
            self.raw.close()


class TlsTransport(asyncio.Transport):
    """What the inner protocol writes to: plaintext in, TLS records out."""

    def __init__(self, tls: TlsServerProtocol) -> None:
        super().__init__()
        self._tls = tls

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._tls.write(bytes(data))

    def close(self) -> None:
        self._tls.close()

    def abort(self) -> None:
        self._tls.closing = True
        if self._tls.raw is not None:
            self._tls.raw.abort()

    def is_closing(self) -> bool:
        raw = self._tls.raw
        return self._tls.closing or raw is None or raw.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "ssl_object":
            return self._tls.ssl_object
        if name in ("peercert", "cipher"):
            return getattr(self._tls.ssl_object, "getpeercert" if name == "peercert" else name)()
        raw = self._tls.raw
        return raw.get_extra_info(name, default) if raw is not None else default

    def pause_reading(self) -> None:
        if self._tls.raw is not None:
            self._tls.raw.pause_reading()

    def resume_reading(self) -> None:
        if self._tls.raw is not None:
            self._tls.raw.resume_reading()

    def is_reading(self) -> bool:
        raw = self._tls.raw
        return raw is not None and raw.is_reading()

    def get_write_buffer_size(self) -> int:
        raw = self._tls.raw
        return raw.get_write_buffer_size() if raw is not None else 0


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    return str(exc) or type(exc).__name__
