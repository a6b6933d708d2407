"""gateway.broker.devicetls: the certificate and key checked at start, the pyOpenSSL context
built once with the first TLS bytes (in a worker thread), connections that come before it
waiting in a bounded list and then served as any other."""

from __future__ import annotations

import asyncio
import logging
import ssl
from pathlib import Path
from typing import Any

import pytest

from gateway import pki
from gateway.broker import devicetls, tls
from gateway.broker.devicetls import DeviceTls
from gateway.errors import ConfigError
from tests.broker.test_tls_layer import Inner, Raw


@pytest.fixture
def certs(tmp_path: Path) -> pki.HubCertificates:
    return pki.ensure_certificates(tmp_path / "data", host_names=["localhost"], addresses=[])


class Client:
    """One TLS client (Python's ssl over memory BIOs) on a connection of ``device_tls``."""

    def __init__(self, device_tls: DeviceTls, ca: Path) -> None:
        self.inner = Inner()
        self.raw = Raw()
        self.server: Any = device_tls.protocol(30, lambda: self.inner)
        self.server.connection_made(self.raw)
        self.cin, self.cout = ssl.MemoryBIO(), ssl.MemoryBIO()
        ctx = ssl.create_default_context(cafile=str(ca))
        self.client = ctx.wrap_bio(self.cin, self.cout, server_hostname="localhost")

    def hello(self) -> None:
        """The ClientHello, to the server."""
        with pytest.raises(ssl.SSLWantReadError):
            self.client.do_handshake()
        self.server.data_received(self.cout.read())

    def finish(self) -> None:
        """The rest of the handshake, then one application record each way."""
        for _ in range(10):
            while self.raw.sent:
                self.cin.write(self.raw.sent.pop(0))
            try:
                self.client.do_handshake()
                break
            except ssl.SSLWantReadError:
                self.server.data_received(self.cout.read())
        self.client.write(b"ping")
        self.server.data_received(self.cout.read())
        assert self.inner.received == b"ping"
        while self.raw.sent:
            self.cin.write(self.raw.sent.pop(0))
        assert self.client.read(100) == b"ack:ping"


async def built(device_tls: DeviceTls) -> None:
    for _ in range(500):
        if device_tls.context is not None and device_tls.pending == 0:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the context was never built")


def test_a_key_that_is_not_the_certificates_is_refused_at_start(
        certs: pki.HubCertificates) -> None:
    with pytest.raises(ConfigError, match="not a usable pair") as err:
        DeviceTls(certs.server_cert, certs.ca_key)
    assert err.value.path == "data_dir"
    with pytest.raises(ConfigError, match="unreadable"):
        DeviceTls(certs.server_cert, certs.server_key.with_name("missing.key"))


async def test_the_context_is_built_once_with_the_first_tls_bytes(
        certs: pki.HubCertificates) -> None:
    device_tls = DeviceTls(certs.server_cert, certs.server_key)
    first, second = Client(device_tls, certs.ca_cert), Client(device_tls, certs.ca_cert)
    await asyncio.sleep(0.05)
    assert device_tls.context is None and device_tls.builds == 0  # connected, nothing sent
    first.hello()
    second.hello()
    assert device_tls.pending == 2
    await built(device_tls)
    assert device_tls.builds == 1
    first.finish()
    second.finish()
    later = Client(device_tls, certs.ca_cert)  # straight to the TLS layer from here
    assert isinstance(later.server, tls.TlsServerProtocol)
    later.hello()
    later.finish()
    assert device_tls.builds == 1
    assert await device_tls.ready() is device_tls.context


async def test_waiting_connections_are_bounded(certs: pki.HubCertificates,
                                               caplog: pytest.LogCaptureFixture) -> None:
    device_tls = DeviceTls(certs.server_cert, certs.server_key, max_pending=2)
    clients = [Client(device_tls, certs.ca_cert) for _ in range(3)]
    with caplog.at_level(logging.WARNING):
        for c in clients:
            c.hello()  # before the build can finish: it runs in a thread
    assert device_tls.pending == 2
    assert [c.raw.closed for c in clients] == [False, False, True]
    assert "2 connections already wait for the tls context" in caplog.text
    await built(device_tls)
    for c in clients[:2]:
        c.finish()


async def test_a_connection_that_leaves_while_waiting_is_forgotten(
        certs: pki.HubCertificates) -> None:
    device_tls = DeviceTls(certs.server_cert, certs.server_key)
    gone, staying = Client(device_tls, certs.ca_cert), Client(device_tls, certs.ca_cert)
    gone.hello()
    staying.hello()
    gone.server.connection_lost(None)
    assert device_tls.pending == 1
    await built(device_tls)
    staying.finish()
    assert not gone.inner.lost and gone.inner.transport is None  # never reached the inner side


async def test_a_waiting_connection_has_the_handshake_deadline(
        certs: pki.HubCertificates, caplog: pytest.LogCaptureFixture) -> None:
    device_tls = DeviceTls(certs.server_cert, certs.server_key)
    raw = Raw()
    silent = device_tls.protocol(0.05, Inner)
    silent.connection_made(raw)
    with caplog.at_level(logging.WARNING):
        await asyncio.sleep(0.2)
    assert raw.closed and "no handshake within 0.05 s" in caplog.text
    assert device_tls.builds == 0  # it sent nothing: nothing was built


async def test_too_many_bytes_before_the_context_close_the_connection(
        certs: pki.HubCertificates) -> None:
    device_tls = DeviceTls(certs.server_cert, certs.server_key)
    c = Client(device_tls, certs.ca_cert)
    c.server.data_received(b"\x16\x03\x01")
    assert device_tls.pending == 1
    c.server.data_received(b"x" * devicetls.MAX_EARLY_BYTES)
    assert c.raw.closed and device_tls.pending == 0
    await built(device_tls)  # the build its first bytes started still completes
    assert c.inner.transport is None
