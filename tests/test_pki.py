"""The hub's PKI and TLS server context, proven with real TLS handshakes on loopback."""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import ssl
import stat
import subprocess
import warnings
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.errors import ConfigError, InvalidRequestError
from gateway.pki import (
    HubCertificates,
    ensure_certificates,
    issue_client_certificate,
    make_self_signed_certificate,
    server_ssl_context,
    thumbprints,
)

T0 = datetime(2025, 1, 1, tzinfo=UTC)


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def sans(cert: x509.Certificate) -> tuple[set[str], set[str]]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return (set(san.get_values_for_type(x509.DNSName)),
            {str(ip) for ip in san.get_values_for_type(x509.IPAddress)})


@pytest.fixture
def certs(tmp_path: Path) -> HubCertificates:
    return ensure_certificates(tmp_path / "data", host_names=["Gateway.Local", "10.1.2.3"],
                               addresses=["192.168.1.20", "fe80::1"])


# --- ensure_certificates ----------------------------------------------------------------------

def test_first_call_makes_a_ca_and_a_server_certificate(certs: HubCertificates) -> None:
    ca, server = load(certs.ca_cert), load(certs.server_cert)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert ca.not_valid_after_utc - ca.not_valid_before_utc >= timedelta(days=3650)
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)
    assert ca.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]
    server.verify_directly_issued_by(ca)
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert list(server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH]
    lifetime = server.not_valid_after_utc - server.not_valid_before_utc
    assert timedelta(days=730) <= lifetime <= timedelta(days=731)
    dns, ips = sans(server)
    assert dns == {"gateway.local", "localhost"}
    assert ips == {"10.1.2.3", "192.168.1.20", "fe80::1", "127.0.0.1", "::1"}


def test_keys_are_private_and_certificates_public(certs: HubCertificates) -> None:
    assert mode(certs.ca_key) == mode(certs.server_key) == 0o600
    assert mode(certs.ca_cert) == mode(certs.server_cert) == 0o644
    assert sorted(p.name for p in certs.ca_cert.parent.iterdir()) == [
        "ca.key", "ca.pem", "server.key", "server.pem"]  # no temporary files left behind


def test_later_calls_reuse_everything_while_names_are_covered(certs: HubCertificates) -> None:
    before = [p.read_bytes() for p in (certs.ca_cert, certs.ca_key, certs.server_cert,
                                        certs.server_key)]
    again = ensure_certificates(certs.ca_cert.parent, host_names=["gateway.local"],
                                addresses=["192.168.1.20"])
    assert again == certs
    assert [p.read_bytes() for p in (again.ca_cert, again.ca_key, again.server_cert,
                                     again.server_key)] == before


def test_a_new_name_reissues_the_server_certificate_from_the_same_ca(
        certs: HubCertificates) -> None:
    ca_before, server_before = certs.ca_cert.read_bytes(), certs.server_cert.read_bytes()
    ensure_certificates(certs.ca_cert.parent, host_names=["gateway.local", "gw2.example"],
                        addresses=["192.168.1.21"])
    assert certs.ca_cert.read_bytes() == ca_before
    assert certs.server_cert.read_bytes() != server_before
    server = load(certs.server_cert)
    server.verify_directly_issued_by(load(certs.ca_cert))
    dns, ips = sans(server)
    assert {"gw2.example", "gateway.local"} <= dns and "192.168.1.21" in ips


def test_a_server_certificate_near_expiry_is_reissued(tmp_path: Path) -> None:
    certs = ensure_certificates(tmp_path, host_names=["gw"], addresses=[], now=T0)
    first = certs.server_cert.read_bytes()
    ensure_certificates(tmp_path, host_names=["gw"], addresses=[],
                        now=T0 + timedelta(days=699))
    assert certs.server_cert.read_bytes() == first  # 31 days left: keep
    ensure_certificates(tmp_path, host_names=["gw"], addresses=[],
                        now=T0 + timedelta(days=701))
    renewed = load(certs.server_cert)
    assert certs.server_cert.read_bytes() != first
    assert renewed.not_valid_after_utc > T0 + timedelta(days=1400)


def test_a_damaged_server_key_or_missing_ca_key_is_repaired(certs: HubCertificates) -> None:
    ca_before = certs.ca_cert.read_bytes()
    certs.server_key.write_text("garbage")
    ensure_certificates(certs.ca_cert.parent, host_names=[], addresses=[])
    assert certs.ca_cert.read_bytes() == ca_before
    server_ssl_context(certs)  # key and certificate match again
    certs.ca_key.unlink()
    ensure_certificates(certs.ca_cert.parent, host_names=[], addresses=[])
    assert certs.ca_cert.read_bytes() != ca_before
    load(certs.server_cert).verify_directly_issued_by(load(certs.ca_cert))


@pytest.mark.parametrize(("host_names", "addresses"), [
    (["ok"], ["not-an-ip"]), (["has space"], []), ([""], []), (["bad/slash"], []),
])
def test_bad_names_are_config_errors(tmp_path: Path, host_names: list[str],
                                     addresses: list[str]) -> None:
    with pytest.raises(ConfigError):
        ensure_certificates(tmp_path, host_names=host_names, addresses=addresses)


# --- device certificates ----------------------------------------------------------------------

def test_client_certificate_for_a_module_identity(certs: HubCertificates,
                                                  tmp_path: Path) -> None:
    cert_path, key_path = issue_client_certificate(certs, "dev1/mod1", tmp_path / "out", days=10)
    assert (cert_path.name, key_path.name) == ("dev1%2Fmod1.cert.pem", "dev1%2Fmod1.key.pem")
    assert mode(key_path) == 0o600
    cert = load(cert_path)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "dev1/mod1"
    cert.verify_directly_issued_by(load(certs.ca_cert))
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH]
    assert cert.not_valid_after_utc - cert.not_valid_before_utc <= timedelta(days=10, hours=1)


def test_common_names_over_64_characters_are_refused(certs: HubCertificates,
                                                     tmp_path: Path) -> None:
    with pytest.raises(InvalidRequestError):
        issue_client_certificate(certs, "d" * 65, tmp_path)


def test_self_signed_certificate_is_an_end_entity(tmp_path: Path) -> None:
    cert_path, key_path = make_self_signed_certificate("dev1", tmp_path)
    cert = load(cert_path)
    assert cert.subject == cert.issuer
    cert.verify_directly_issued_by(cert)
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert mode(key_path) == 0o600


def test_thumbprints_are_upper_case_sha1_and_sha256(tmp_path: Path) -> None:
    cert_path, _ = make_self_signed_certificate("dev1", tmp_path)
    der = ssl.PEM_cert_to_DER_cert(cert_path.read_text())
    sha1, sha256 = thumbprints(der)
    assert sha1 == hashlib.sha1(der).hexdigest().upper() and len(sha1) == 40
    assert sha256 == hashlib.sha256(der).hexdigest().upper() and len(sha256) == 64
    if shutil.which("openssl"):
        out = subprocess.run(["openssl", "x509", "-noout", "-fingerprint", "-sha1", "-in",
                              str(cert_path)], capture_output=True, text=True, check=True).stdout
        assert out.strip().split("=", 1)[1].replace(":", "") == sha1


# --- real TLS ---------------------------------------------------------------------------------

@dataclass
class TlsServer:
    ctx: ssl.SSLContext
    port: int
    peer_certs: list[bytes | None] = field(default_factory=list)


@pytest.fixture
async def tls(certs: HubCertificates) -> AsyncIterator[TlsServer]:
    ctx = server_ssl_context(certs)
    holder: list[TlsServer] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ssl_object = writer.get_extra_info("ssl_object")
        holder[0].peer_certs.append(ssl_object.getpeercert(binary_form=True))
        writer.write(b"hello\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx)
    holder.append(TlsServer(ctx, server.sockets[0].getsockname()[1]))
    async with server:
        yield holder[0]


def client_context(certs: HubCertificates, *, tls12_only: bool = True,
                   cert: tuple[Path, Path] | None = None) -> ssl.SSLContext:
    """Like the Azure device SDK: CERT_REQUIRED, check_hostname, TLS 1.2, PEM text as cadata."""
    ctx = ssl.create_default_context(cadata=certs.ca_cert.read_text())
    if tls12_only:
        ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    if cert is not None:
        ctx.load_cert_chain(*cert)
    return ctx


async def exchange(tls: TlsServer, ctx: ssl.SSLContext, server_hostname: str = "localhost",
                   ) -> bytes:
    async with asyncio.timeout(10):
        reader, writer = await asyncio.open_connection("127.0.0.1", tls.port, ssl=ctx,
                                                       server_hostname=server_hostname)
        try:
            return await reader.readline()
        finally:
            writer.close()


@pytest.mark.parametrize("name", ["localhost", "127.0.0.1", "gateway.local", "10.1.2.3"])
async def test_sas_client_without_certificate_verifies_the_server(
        tls: TlsServer, certs: HubCertificates, name: str) -> None:
    assert await exchange(tls, client_context(certs), server_hostname=name) == b"hello\n"
    assert tls.peer_certs == [None]


async def test_tls13_clients_work_too(tls: TlsServer, certs: HubCertificates) -> None:
    assert await exchange(tls, client_context(certs, tls12_only=False)) == b"hello\n"


async def test_wrong_server_name_is_refused_by_the_client(tls: TlsServer,
                                                          certs: HubCertificates) -> None:
    with pytest.raises(ssl.SSLCertVerificationError):
        await exchange(tls, client_context(certs), server_hostname="elsewhere.example")


@pytest.mark.parametrize("tls12_only", [True, False])
async def test_ca_issued_client_certificate_reaches_the_server(
        tls: TlsServer, certs: HubCertificates, tmp_path: Path, tls12_only: bool) -> None:
    pair = issue_client_certificate(certs, "dev1", tmp_path)
    ctx = client_context(certs, tls12_only=tls12_only, cert=pair)
    assert await exchange(tls, ctx) == b"hello\n"
    assert tls.peer_certs == [ssl.PEM_cert_to_DER_cert(pair[0].read_text())]


async def _refused(tls: TlsServer, ctx: ssl.SSLContext) -> None:
    """The server rejects the client certificate: during the handshake under TLS 1.2, on the
    first read under TLS 1.3 (the client's handshake completes before the server checks)."""
    with pytest.raises((ssl.SSLError, ConnectionResetError, asyncio.IncompleteReadError)):
        line = await exchange(tls, ctx)
        if not line:
            raise ConnectionResetError("closed")
    assert tls.peer_certs == []


@pytest.mark.parametrize("tls12_only", [True, False])
async def test_unknown_self_signed_certificate_is_refused(
        tls: TlsServer, certs: HubCertificates, tmp_path: Path, tls12_only: bool) -> None:
    pair = make_self_signed_certificate("stranger", tmp_path)
    await _refused(tls, client_context(certs, tls12_only=tls12_only, cert=pair))


async def test_self_signed_certificate_added_to_the_live_context_is_accepted(
        tls: TlsServer, certs: HubCertificates, tmp_path: Path) -> None:
    pair = make_self_signed_certificate("dev1", tmp_path)
    await _refused(tls, client_context(certs, cert=pair))
    tls.ctx.load_verify_locations(cadata=pair[0].read_text())
    assert await exchange(tls, client_context(certs, cert=pair)) == b"hello\n"
    assert tls.peer_certs == [ssl.PEM_cert_to_DER_cert(pair[0].read_text())]


async def test_trust_anchors_given_at_construction_are_accepted(
        certs: HubCertificates, tmp_path: Path) -> None:
    pair = make_self_signed_certificate("dev1", tmp_path)
    ctx = server_ssl_context(certs, extra_trust_pems=[pair[0].read_text()])
    seen: list[bytes | None] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(writer.get_extra_info("ssl_object").getpeercert(binary_form=True))
        writer.close()

    async with await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx) as server:
        port = server.sockets[0].getsockname()[1]
        async with asyncio.timeout(10):
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=client_context(certs, cert=pair),
                server_hostname="localhost")
            await reader.read()
            writer.close()
    assert seen == [ssl.PEM_cert_to_DER_cert(pair[0].read_text())]


async def test_registered_self_signed_certificate_cannot_vouch_for_others(
        tls: TlsServer, certs: HubCertificates, tmp_path: Path) -> None:
    cert_path, key_path = make_self_signed_certificate("dev1", tmp_path)
    tls.ctx.load_verify_locations(cadata=cert_path.read_text())
    anchor = load(cert_path)
    anchor_key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    assert isinstance(anchor_key, ec.EllipticCurvePrivateKey)
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    forged = (x509.CertificateBuilder()
              .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "victim")]))
              .issuer_name(anchor.subject).public_key(leaf_key.public_key())
              .serial_number(x509.random_serial_number())
              .not_valid_before(now - timedelta(hours=1)).not_valid_after(now + timedelta(days=1))
              .sign(anchor_key, hashes.SHA256()))
    (tmp_path / "forged.pem").write_bytes(forged.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "forged.key").write_bytes(leaf_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    await _refused(tls, client_context(
        certs, cert=(tmp_path / "forged.pem", tmp_path / "forged.key")))


def _with_old_tls(version: ssl.TLSVersion) -> Callable[[HubCertificates], ssl.SSLContext]:
    def make(certs: HubCertificates) -> ssl.SSLContext:
        ctx = client_context(certs, tls12_only=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            ctx.minimum_version = version
            ctx.maximum_version = version
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # so the *client* really offers the old version
        return ctx
    return make


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_1, ssl.TLSVersion.TLSv1])
async def test_clients_below_tls12_are_refused(tls: TlsServer, certs: HubCertificates,
                                               version: ssl.TLSVersion) -> None:
    # asyncio's server drops the connection without flushing the protocol_version alert, so
    # the client sees either the alert or a reset; either way no session is established.
    with pytest.raises((ssl.SSLError, ConnectionResetError)):
        await exchange(tls, _with_old_tls(version)(certs))
    assert tls.peer_certs == []
    # Control: the same client settings at TLS 1.2 connect, so the version is what was refused.
    assert await exchange(tls, _with_old_tls(ssl.TLSVersion.TLSv1_2)(certs)) == b"hello\n"


def test_server_context_settings(certs: HubCertificates) -> None:
    ctx = server_ssl_context(certs)
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.verify_mode == ssl.CERT_OPTIONAL
