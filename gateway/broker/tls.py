"""TLS termination over memory BIOs (pyOpenSSL), so every refused handshake is logged with
its reason and any client certificate is accepted for the identity check to judge.

asyncio's ``create_server(ssl=...)`` drops a connection whose handshake fails without telling
anyone (no exception handler call, no log line), so a device with an old TLS stack or plain MQTT
on port 8883 would leave no trace. ``start_tls`` cannot be used either: uvloop starts reading
only after ``connection_made`` returns, so the ClientHello can reach the raw protocol before the
handshake task runs. Driving the TLS engine ourselves keeps TLS in one small, synchronous
adapter: raw bytes in, plaintext to the inner protocol; the inner protocol's writes are
encrypted and sent (Python's own ``asyncio.sslproto`` is built the same way).

Why pyOpenSSL and not ``ssl.MemoryBIO``: IoT Hub accepts any client certificate in the handshake
and lets the identity check decide (ref §8): a self-signed device registered by thumbprint only
must get through, and a CA-signed device sends its intermediates. Python's ``ssl`` has no
verify callback (a certificate it cannot chain fails the handshake) and, before 3.13, no way to
read the chain the client sent. Here the verify callback accepts every certificate (they are
still *requested*, not required: SAS clients send none) and :func:`peer_certificate_chain`
hands the whole chain the client sent to :mod:`gateway.hub.auth`. Cost: a few Python calls
per socket read, not per message. The hub builds its context with the first TLS connection
(gateway.broker.devicetls), so an idle hub does not import pyOpenSSL.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from cryptography.hazmat.primitives.serialization import Encoding
from OpenSSL import SSL, crypto

from gateway.broker.devicetls import PEER_CHAIN, peer_certificate_chain

try:  # pyOpenSSL's binding, to give a connection fresh memory BIOs (see _MemoryBios)
    from OpenSSL._util import ffi as _ffi
    from OpenSSL._util import lib as _lib
except ImportError:  # pragma: no cover - a pyOpenSSL without it keeps its BIOs
    _ffi = _lib = None

__all__ = [  # PEER_CHAIN and peer_certificate_chain: re-exported from gateway.broker.devicetls
    "PEER_CHAIN",
    "TlsServerProtocol",
    "TlsTransport",
    "peer_certificate_chain",
    "server_context",
]

log = logging.getLogger(__name__)

READ_SIZE: Final = 64 * 1024  # ciphertext taken from the outgoing BIO per call
RECORD_PLAINTEXT: Final = 16 * 1024  # a TLS record carries at most 2^14 bytes (RFC 8446 §5.1)
# Python's ssl defaults for TLS 1.2 (forward secrecy, AEAD or CBC-SHA2, no SHA-1 MACs);
# TLS 1.3 suites are OpenSSL's defaults.
CIPHERS: Final = b"ECDHE+AESGCM:ECDHE+CHACHA20:ECDHE+AES:!aNULL:!eNULL:!SHA1:!AESCCM"
BIO_KEEP: Final = 4096
"""Bytes a connection's memory BIOs may carry before they are replaced by empty ones."""
BIO_RENEW_DELAY: Final = 0.5
"""Seconds from the read or write that passed :data:`BIO_KEEP` to the renewal: a busy
connection renews at most twice a second (not after every read), an idle one soon after its
burst."""


def _accept_any(_conn: SSL.Connection, _cert: crypto.X509, _errno: int, _depth: int,
                _ok: int) -> bool:
    return True  # the identity check decides (IoT Hub ref §8)


def server_context(cert_file: Path, key_file: Path) -> SSL.Context:
    """The MQTT port's TLS context: TLS 1.2 minimum (the Azure Python SDK speaks exactly 1.2),
    no compression or renegotiation, the hub's server certificate; client certificates
    requested, not required, and accepted whoever issued them; record buffers released while
    a connection is idle."""
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    ctx.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION
                    | SSL.OP_CIPHER_SERVER_PREFERENCE)
    # An idle connection holds no record buffers (OpenSSL's are ~34 KB per connection
    # otherwise): they are taken from malloc for a read or write and given back after it.
    ctx.set_mode(SSL.MODE_RELEASE_BUFFERS)
    ctx.set_cipher_list(CIPHERS)
    ctx.use_certificate_chain_file(str(cert_file))
    ctx.use_privatekey_file(str(key_file))
    ctx.check_privatekey()
    ctx.set_verify(SSL.VERIFY_PEER, _accept_any)
    ctx.set_session_id(b"edge-gateway-mqtt")
    return ctx


class _MemoryBios:
    """Replaces a connection's memory BIOs with fresh ones once they are empty.

    OpenSSL's memory BIO never gives back what it grew to: a connection that once read a
    200 KB burst (or sent its certificate chain in the handshake) would keep that buffer, in
    each direction, until it closes (about 300 KB for a 200 KB read and a 100 KB answer,
    measured). ``SSL_set_bio`` with new BIOs frees the old ones. This reaches into
    pyOpenSSL's connection (its ``_ssl``, ``_into_ssl``, ``_from_ssl``); if they are not
    there, the connection keeps its BIOs, as before.
    """

    @staticmethod
    def usable(tls: SSL.Connection) -> bool:
        return _lib is not None and all(
            hasattr(tls, name) for name in ("_ssl", "_into_ssl", "_from_ssl"))

    @staticmethod
    def renew(tls: SSL.Connection) -> bool:
        """New, empty BIOs for ``tls`` if both of its BIOs are empty; True if renewed."""
        assert _lib is not None and _ffi is not None
        into, out = tls._into_ssl, tls._from_ssl
        if _lib.BIO_get_mem_data(into, _ffi.NULL) or _lib.BIO_get_mem_data(out, _ffi.NULL):
            return False
        new_into = _lib.BIO_new(_lib.BIO_s_mem())
        new_out = _lib.BIO_new(_lib.BIO_s_mem())
        if new_into == _ffi.NULL or new_out == _ffi.NULL:  # out of memory: keep the old ones
            for bio in (new_into, new_out):
                if bio != _ffi.NULL:
                    _lib.BIO_free(bio)
            return False
        _lib.SSL_set_bio(tls._ssl, new_into, new_out)  # frees the old ones
        tls._into_ssl, tls._from_ssl = new_into, new_out
        return True


class TlsServerProtocol(asyncio.Protocol):
    """The raw TCP side of one TLS connection; the inner protocol sees a plaintext transport."""

    __slots__ = ("tls", "_timeout", "_make_inner", "_inner", "raw", "_timer", "peer", "closing",
                 "peer_chain", "_record_left", "_header", "_reading", "_unflushed", "_carried",
                 "_renewal")

    def __init__(self, context: SSL.Context, handshake_timeout: float,
                 make_inner: Callable[[], asyncio.Protocol]) -> None:
        self.tls = SSL.Connection(context, None)
        self.tls.set_accept_state()
        self._timeout = handshake_timeout
        self._make_inner = make_inner
        self._inner: asyncio.Protocol | None = None
        self.raw: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.peer = "?"
        self.closing = False
        self.peer_chain: list[bytes] = []
        # TLS record framing of what the client sent, followed across reads, so each read
        # makes one SSL_read per complete record and no failing one (an exception) at the end.
        self._record_left = 0  # body bytes of the current record still to come
        self._header = b""  # the start (< 5 bytes) of the next record's header
        self._reading = False  # inside data_received: the inner protocol's writes are batched
        self._unflushed = False  # written while reading, not yet flushed
        # Bytes through the memory BIOs since they were new (-1: they are never renewed).
        self._carried = 0 if _MemoryBios.usable(self.tls) else -1
        self._renewal: asyncio.TimerHandle | None = None  # the pending renewal of the BIOs

    # -- raw side ------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.raw = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "?"
        self._timer = asyncio.get_running_loop().call_later(self._timeout, self._handshake_expired)

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        records = self._complete_records(data)
        self.tls.bio_write(data)
        if self._carried >= 0:
            self._carried += len(data)
        if self._inner is None:
            if not self._handshake():
                return
            records = -1  # the handshake took some records: read until OpenSSL wants more
        chunks = []
        peer_closed = False
        recv = self.tls.recv
        try:
            if records < 0:
                while True:
                    chunks.append(recv(RECORD_PLAINTEXT))
            for _ in range(records):  # a record's plaintext fits RECORD_PLAINTEXT, always
                chunks.append(recv(RECORD_PLAINTEXT))
        except SSL.WantReadError:
            pass  # a record that held no application data (an alert, a key update)
        except SSL.ZeroReturnError:  # close_notify: the client is done, end at once
            peer_closed = True
        except SSL.Error as exc:
            self._fail(f"tls error peer={self.peer} reason={_reason(exc)}")
            return
        if chunks and self._inner is not None:
            self._reading = True
            try:
                self._inner.data_received(chunks[0] if len(chunks) == 1 else b"".join(chunks))
            finally:
                self._reading = False
        # One flush for the inner protocol's answers; and whatever OpenSSL made itself (session
        # tickets after the handshake, an answer to a key update): it makes nothing when every
        # record it read was application data.
        if self._unflushed or len(chunks) != records:
            self._unflushed = False
            self.flush()
        if peer_closed:
            log.debug("tls close_notify from peer=%s", self.peer)
            self.close()
        elif self._carried > BIO_KEEP and self._renewal is None:
            self._renew_soon()

    def _renew_soon(self) -> None:
        self._renewal = asyncio.get_running_loop().call_later(BIO_RENEW_DELAY, self._renew)

    def _renew(self) -> None:
        """Fresh BIOs (:class:`_MemoryBios`), the timer's; again later if they are not empty."""
        self._renewal = None
        if self.closing or self._carried <= BIO_KEEP:
            return
        if _MemoryBios.renew(self.tls):
            self._carried = 0
        else:
            self._renew_soon()

    def _complete_records(self, data: bytes) -> int:
        """How many TLS records ``data`` completes (5-byte headers: type, version, length)."""
        count = 0
        pos = 0
        size = len(data)
        left = self._record_left
        if left:
            if left > size:
                self._record_left = left - size
                return 0
            pos = left
            count = 1
            self._record_left = 0
        if self._header:
            head = self._header + data[pos:pos + 5 - len(self._header)]
            pos += 5 - len(self._header)
            if len(head) < 5:
                self._header = head
                return count
            self._header = b""
            end = pos + ((head[3] << 8) | head[4])
            if end > size:
                self._record_left = end - size
                return count
            pos = end
            count += 1
        while pos + 5 <= size:
            end = pos + 5 + ((data[pos + 3] << 8) | data[pos + 4])
            if end > size:
                self._record_left = end - size
                return count
            pos = end
            count += 1
        if pos < size:
            self._header = data[pos:]
        return count

    def eof_received(self) -> bool | None:
        return None  # close the transport; connection_lost tells the inner protocol

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._renewal is not None:
            self._renewal.cancel()
            self._renewal = None
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
            self.tls.do_handshake()
        except SSL.WantReadError:
            self.flush()
            return False
        except SSL.Error as exc:
            self.flush()  # the alert, if OpenSSL made one
            self._fail(f"tls handshake failed peer={self.peer} reason={_reason(exc)}")
            return False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.flush()
        if self._carried >= 0 and _MemoryBios.renew(self.tls):  # drop the handshake's flights
            self._carried = 0
        self.peer_chain = _chain_of(self.tls)
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
            view = memoryview(data)
            while view:
                view = view[self.tls.send(view):]
        except SSL.Error as exc:
            self._fail(f"tls error peer={self.peer} reason={_reason(exc)}")
            return
        if self._reading:  # answers to a read go out together, after it
            self._unflushed = True
        else:
            self.flush()

    def flush(self) -> None:
        out = []
        try:
            while True:
                chunk = self.tls.bio_read(READ_SIZE)
                out.append(chunk)
                if len(chunk) < READ_SIZE:
                    break
        except SSL.WantReadError:
            pass
        if out and self.raw is not None and not self.raw.is_closing():
            data = out[0] if len(out) == 1 else b"".join(out)
            self.raw.write(data)
            if self._carried >= 0:
                self._carried += len(data)
                if self._carried > BIO_KEEP and self._renewal is None:
                    self._renew_soon()

    def close(self) -> None:
        if self.closing:
            return
        self.closing = True
        try:
            self.tls.shutdown()  # queue our close_notify; we do not wait for the peer's
        except SSL.Error:
            pass
        self.flush()
        if self.raw is not None:
            self.raw.close()


class TlsTransport(asyncio.Transport):
    """What the inner protocol writes to: plaintext in, TLS records out."""

    __slots__ = ("_tls",)

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
        if name == PEER_CHAIN:
            return self._tls.peer_chain
        if name == "tls_connection":
            return self._tls.tls
        if name == "sslcontext":  # aiohttp: the request came over TLS (request.secure)
            return self._tls.tls.get_context()
        if name == "cipher":
            tls = self._tls.tls
            return (tls.get_cipher_name(), tls.get_protocol_version_name(), tls.get_cipher_bits())
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


def _chain_of(tls: SSL.Connection) -> list[bytes]:
    """The certificates the client sent, DER, leaf first (OpenSSL's server-side peer chain
    leaves the leaf out)."""
    leaf = tls.get_peer_certificate(as_cryptography=True)
    if leaf is None:
        return []
    ders = [leaf.public_bytes(Encoding.DER)]
    for cert in tls.get_peer_cert_chain(as_cryptography=True) or ():
        der = cert.public_bytes(Encoding.DER)
        if der not in ders:
            ders.append(der)
    return ders


def _reason(exc: BaseException) -> str:
    """OpenSSL's reason strings (``wrong version number``, ``unsupported protocol``...)."""
    args = exc.args[0] if exc.args else None
    if isinstance(args, list) and args:
        reasons = [str(item[-1]) for item in args if isinstance(item, tuple) and item]
        if reasons:
            return "; ".join(reasons)
    return str(exc) or type(exc).__name__
