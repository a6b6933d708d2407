"""The TLS layer (gateway.broker.tls) driven in-process by Python's own ssl client over memory
BIOs: every byte arrives whatever the read boundaries, any client certificate passes the
handshake with its whole chain kept, close_notify ends the connection, refusals are logged."""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
import warnings
from pathlib import Path
from typing import Any

import pytest

from gateway import pki
from gateway.broker import tls
from tests.certchain import three_levels


class Raw(asyncio.Transport):
    """The TCP side: what the TLS layer sends, and whether it closed."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[bytes] = []
        self.closed = False

    def write(self, data: Any) -> None:
        self.sent.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 4242) if name == "peername" else default

    def get_write_buffer_size(self) -> int:
        return 0


class Inner(asyncio.Protocol):
    def __init__(self) -> None:
        self.received = bytearray()
        self.transport: Any = None
        self.lost = False
        self.echo = True

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.received += data
        if self.echo:
            self.transport.write(b"ack:" + data[-4:])

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True


class Pair:
    def __init__(self, certs: pki.HubCertificates, client_ctx: ssl.SSLContext) -> None:
        self.inner = Inner()
        self.server = tls.TlsServerProtocol(
            tls.server_context(certs.server_cert, certs.server_key), 30, lambda: self.inner)
        self.raw = Raw()
        self.server.connection_made(self.raw)
        self.cin, self.cout = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.client = client_ctx.wrap_bio(self.cin, self.cout, server_hostname="localhost")

    def to_client(self) -> None:
        while self.raw.sent:
            self.cin.write(self.raw.sent.pop(0))

    def handshake(self) -> None:
        for _ in range(10):
            try:
                self.client.do_handshake()
                break
            except ssl.SSLWantReadError:
                self.server.data_received(self.cout.read())
                self.to_client()
        if self.cout.pending:  # TLS 1.3: the client's Finished (and certificate)
            self.server.data_received(self.cout.read())
            self.to_client()

    def client_reads(self) -> bytes:
        out = b""
        try:
            while True:
                out += self.client.read(65536)
        except ssl.SSLWantReadError:
            return out


@pytest.fixture
def certs(tmp_path: Path) -> pki.HubCertificates:
    return pki.ensure_certificates(tmp_path / "data", host_names=["localhost"], addresses=[])


def client_context(certs: pki.HubCertificates, cert: tuple[Path, Path] | None = None,
                   version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(certs.ca_cert))
    if cert is not None:
        ctx.load_cert_chain(*cert)
    if version is not None:
        ctx.minimum_version = ctx.maximum_version = version
    return ctx


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
async def test_every_byte_arrives_whatever_the_read_boundaries(
        certs: pki.HubCertificates, version: ssl.TLSVersion) -> None:
    pair = Pair(certs, client_context(certs, version=version))
    pair.handshake()
    rng = random.Random(8)
    expected = bytearray()
    stream = bytearray()
    for i in range(400):  # records of every size, up to a full 16 KB one
        data = bytes([i % 251]) * rng.choice([1, 2, 5, 200, 4000, 16384, 30000])
        pair.client.write(data)
        expected += data
        stream += pair.cout.read()
    pos = 0
    while pos < len(stream):  # fed in pieces cut anywhere, headers included
        step = rng.choice([1, 2, 3, 4, 5, 6, 7, 100, 1500, 16389, 70000])
        pair.server.data_received(bytes(stream[pos:pos + step]))
        pos += step
    assert pair.inner.received == expected
    pair.to_client()
    assert pair.client_reads().endswith(b"ack:" + bytes(expected[-4:]))


async def test_any_client_certificate_passes_with_its_chain(certs: pki.HubCertificates,
                                                            tmp_path: Path) -> None:
    chain = three_levels("dev1")
    cert, key = chain.write_device_files(tmp_path / "dev")  # leaf + intermediate, unknown CA
    pair = Pair(certs, client_context(certs, (cert, key)))
    pair.handshake()
    assert pair.inner.transport is not None
    assert tls.peer_certificate_chain(pair.inner.transport) == [chain.leaf.der,
                                                               chain.intermediate.der]
    plain = Pair(certs, client_context(certs))
    plain.handshake()
    assert tls.peer_certificate_chain(plain.inner.transport) is None


async def test_close_notify_closes_at_once_and_answers_in_kind(
        certs: pki.HubCertificates) -> None:
    pair = Pair(certs, client_context(certs))
    pair.handshake()
    pair.inner.echo = False
    pair.client.write(b"last words")
    try:
        pair.client.unwrap()
    except ssl.SSLWantReadError:
        pass
    pair.server.data_received(pair.cout.read())
    assert pair.inner.received == b"last words"  # delivered first
    assert pair.raw.closed
    pair.to_client()
    pair.client.unwrap()  # the hub's close_notify is there: no SSLWantReadError


async def test_old_tls_is_refused_with_the_reason_logged(
        certs: pki.HubCertificates, caplog: pytest.LogCaptureFixture) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(str(certs.ca_cert))
    ctx.set_ciphers("ALL:@SECLEVEL=0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # that is the point
        ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    pair = Pair(certs, ctx)
    with caplog.at_level(logging.WARNING, logger="gateway.broker.tls"):
        with pytest.raises(ssl.SSLError):
            pair.handshake()
    assert pair.raw.closed and pair.inner.transport is None
    assert "tls handshake failed peer=127.0.0.1:4242 reason=" in caplog.text


def _heap_in_use() -> int | None:
    """Bytes malloc has handed out and not got back (glibc's mallinfo2), or None."""
    import ctypes
    import ctypes.util

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
            "fordblks", "keepcost")]

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallinfo2 = libc.mallinfo2
    except (OSError, AttributeError):
        return None
    mallinfo2.restype = MallInfo2
    info = mallinfo2()
    return int(info.uordblks + info.hblkhd)


async def test_a_burst_leaves_no_buffers_behind(certs: pki.HubCertificates) -> None:
    """A connection that read a 200 KB burst and answered 100 KB holds no more memory than an
    idle one once it is done (OpenSSL's memory BIOs never shrink: they are replaced, within
    ``BIO_RENEW_DELAY`` of the burst), and it still carries data both ways afterwards."""
    if _heap_in_use() is None:
        pytest.skip("needs glibc's mallinfo2")
    ctx = client_context(certs)
    burst = bytes(range(256)) * 800  # 200 KB

    async def connections(count: int, bulk: bool) -> tuple[list[Pair], int]:
        pairs = [Pair(certs, ctx) for _ in range(count)]
        for pair in pairs:
            pair.handshake()
            if bulk:
                pair.inner.echo = False
                pair.client.write(burst)
                pair.server.data_received(pair.cout.read())
                assert pair.inner.received == burst
                pair.inner.received = bytearray()
                pair.inner.transport.write(burst[:100_000])
                pair.raw.sent.clear()
        for pair in pairs:  # the client side's own buffers are not the hub's
            pair.client = pair.cin = pair.cout = None  # type: ignore[assignment]
        await asyncio.sleep(tls.BIO_RENEW_DELAY + 0.2)
        return pairs, _heap_in_use() or 0

    await connections(5, True)  # warm up
    before = _heap_in_use() or 0
    idle, with_idle = await connections(40, False)
    idle_each = (with_idle - before) / 40
    del idle
    before = _heap_in_use() or 0
    busy, with_busy = await connections(40, True)
    busy_each = (with_busy - before) / 40
    assert busy_each < max(idle_each, 24_576) + 16_384, (idle_each, busy_each)

    pair = Pair(certs, ctx)  # and it goes on working after the BIOs were replaced
    pair.handshake()
    pair.client.write(burst)
    pair.server.data_received(pair.cout.read())
    pair.to_client()
    assert pair.client_reads() == b"ack:" + burst[-4:]
    pair.client.write(b"more")
    pair.server.data_received(pair.cout.read())
    pair.to_client()
    assert pair.inner.received == burst + b"more"
    assert pair.client_reads() == b"ack:more"


async def test_without_pyopenssl_internals_it_keeps_its_bios_and_still_works(
        certs: pki.HubCertificates, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pyOpenSSL without the attributes the BIO replacement reaches for: the layer keeps
    its BIOs, and more than READ_SIZE still goes out whole."""
    monkeypatch.setattr(tls._MemoryBios, "usable", staticmethod(lambda _tls: False))
    pair = Pair(certs, client_context(certs))
    pair.handshake()
    into = pair.server.tls._into_ssl
    big = b"b" * 200_000
    pair.client.write(big)
    pair.server.data_received(pair.cout.read())
    pair.inner.transport.write(big)  # more than READ_SIZE at once
    pair.to_client()
    assert pair.client_reads() == b"ack:bbbb" + big
    assert pair.inner.received == big
    assert pair.server.tls._into_ssl == into


async def test_a_busy_connection_renews_its_buffers_at_most_once_per_delay(
        certs: pki.HubCertificates, monkeypatch: pytest.MonkeyPatch) -> None:
    """Reads of 64 KB one after another: the BIOs are replaced once, ``BIO_RENEW_DELAY`` after
    the first, not after every read (each renewal is five OpenSSL calls on the hot path)."""
    renewals: list[bool] = []
    real = tls._MemoryBios.renew

    def counted(conn: Any) -> bool:
        renewals.append(real(conn))
        return renewals[-1]

    pair = Pair(certs, client_context(certs))
    pair.handshake()
    monkeypatch.setattr(tls._MemoryBios, "renew", staticmethod(counted))
    pair.inner.echo = False
    for _ in range(20):
        pair.client.write(bytes(65536))
        pair.server.data_received(pair.cout.read())
    assert renewals == []
    await asyncio.sleep(tls.BIO_RENEW_DELAY + 0.2)
    assert renewals == [True]
    assert len(pair.inner.received) == 20 * 65536
