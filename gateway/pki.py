"""The hub's own PKI: root CA, server certificate, device certificates, TLS server context.

Design contract "Trust": on first start the hub makes a CA and a server certificate whose SANs
cover its host names, ``localhost`` and its addresses; clients trust ``ca.pem`` from the data
directory (IoT Hub ref §15.2, §15.3 items 2-3).

Keys are EC P-256 (ECDSA with SHA-256). Why not RSA 2048: generation is instant on a Raspberry
Pi (RSA takes seconds there), handshakes are cheaper for the hub that terminates every device
connection, certificates are a third of the size, and every TLS 1.2 stack the Azure SDKs use
(OpenSSL, mbedTLS, SChannel, BearSSL) supports ECDHE-ECDSA with P-256.

Files in the data directory: ``ca.pem``, ``ca.key``, ``server.pem``, ``server.key``. Keys are
written mode 0600 through a temporary file and an atomic rename; certificates 0644.
"""

from __future__ import annotations

import os
import secrets
import ssl
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import quote

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.errors import ConfigError, InvalidRequestError
from gateway.hubcerts import (  # re-exported: they need no cryptography
    RENEW_BEFORE,
    HubCertificates,
    IPAddress,
    thumbprints,
    wanted_names,
)

__all__ = [
    "RENEW_BEFORE",
    "HubCertificates",
    "ensure_certificates",
    "issue_client_certificate",
    "make_self_signed_certificate",
    "server_ssl_context",
    "thumbprints",
]

CA_DAYS = 3650
SERVER_DAYS = 730  # under the 825-day limit Apple platforms enforce for any TLS server cert
_BACKDATE = timedelta(hours=1)  # tolerate clients whose clock lags a little
_CN_MAX = 64  # RFC 5280 ub-common-name

# --- files ------------------------------------------------------------------------------------

def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same directory, fsync, rename."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb", closefd=False) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _save_pair(cert_path: Path, key_path: Path, cert: x509.Certificate,
               key: ec.EllipticCurvePrivateKey) -> None:
    # Key first: a crash in between leaves a key that does not match the old certificate,
    # which the next ensure_certificates() detects and repairs.
    _write_atomic(key_path, _key_pem(key), 0o600)
    _write_atomic(cert_path, _cert_pem(cert), 0o644)


def _load_pair(cert_path: Path,
               key_path: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None:
    """Load a certificate and its key; None when missing, unreadable or not a matching pair."""
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError):
        return None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        return None
    if cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) != key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ):
        return None
    return cert, key


# --- building certificates --------------------------------------------------------------------

def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _common_name(value: str) -> x509.Name:
    if not 1 <= len(value) <= _CN_MAX:
        raise InvalidRequestError(f"common name must be 1..{_CN_MAX} characters")
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, value)])


def _builder(subject: x509.Name, issuer: x509.Name, key: ec.EllipticCurvePrivateKey,
             now: datetime, days: int) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
    )


def _leaf_usage(purpose: x509.ObjectIdentifier) -> list[tuple[x509.ExtensionType, bool]]:
    return [
        (x509.BasicConstraints(ca=False, path_length=None), True),
        (x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                       data_encipherment=False, key_agreement=False, key_cert_sign=False,
                       crl_sign=False, encipher_only=False, decipher_only=False), True),
        (x509.ExtendedKeyUsage([purpose]), False),
    ]


def _make_ca(now: datetime) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _new_key()
    # A unique subject per gateway, so a client trusting several gateways' CAs never confuses
    # them while building a chain.
    name = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Edge Gateway"),
        x509.NameAttribute(NameOID.COMMON_NAME, f"Edge Gateway Root CA {secrets.token_hex(4)}"),
    ])
    cert = (
        _builder(name, name, key, now, CA_DAYS)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, key_cert_sign=True, crl_sign=True,
                                     encipher_only=False, decipher_only=False), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _issue(ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, subject: x509.Name,
           purpose: x509.ObjectIdentifier, now: datetime, days: int,
           san: x509.SubjectAlternativeName | None = None,
           ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _new_key()
    builder = _builder(subject, ca_cert.subject, key, now, days).add_extension(
        x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    for extension, critical in _leaf_usage(purpose):
        builder = builder.add_extension(extension, critical=critical)
    if san is not None:
        builder = builder.add_extension(san, critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


# --- server certificate -----------------------------------------------------------------------

def _server_ok(cert: x509.Certificate, ca_cert: x509.Certificate, dns: frozenset[str],
               ips: frozenset[IPAddress], now: datetime) -> bool:
    """Reuse the server certificate only if the current CA signed it, it is valid now for more
    than RENEW_BEFORE, and its SANs cover every wanted name."""
    try:
        cert.verify_directly_issued_by(ca_cert)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, TypeError, InvalidSignature, x509.ExtensionNotFound):
        return False
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc - RENEW_BEFORE:
        return False
    have_dns = {name.lower() for name in san.get_values_for_type(x509.DNSName)}
    have_ips = set(san.get_values_for_type(x509.IPAddress))
    return dns <= have_dns and ips <= have_ips


def ensure_certificates(data_dir: Path, *, host_names: Sequence[str], addresses: Sequence[str],
                        now: datetime | None = None) -> HubCertificates:
    """Make (first call) or reuse the CA and server certificate in ``data_dir``.

    The CA (10 years) is made only when ``ca.pem``/``ca.key`` are missing, unreadable, not a
    pair, or expired -- a new CA means every device must be given the new ``ca.pem``. The server
    certificate (2 years, serverAuth, SANs = ``host_names`` + ``localhost`` + ``addresses`` +
    127.0.0.1 + ::1) is re-issued from the same CA when it no longer covers the requested names,
    expires within 30 days, or does not match its key or the CA. ``now`` is for tests.
    """
    now = now or datetime.now(UTC)
    dns, ips = wanted_names(host_names, addresses)
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    certs = HubCertificates.in_dir(data_dir)
    ca = _load_pair(certs.ca_cert, certs.ca_key)
    if ca is None or not ca[0].not_valid_before_utc <= now <= ca[0].not_valid_after_utc:
        ca = _make_ca(now)
        _save_pair(certs.ca_cert, certs.ca_key, *ca)
    ca_cert, ca_key = ca
    server = _load_pair(certs.server_cert, certs.server_key)
    if server is None or not _server_ok(server[0], ca_cert, dns, ips, now):
        ordered_dns = sorted(dns - {"localhost"}) + ["localhost"]
        cn = next((n for n in ordered_dns if len(n) <= _CN_MAX), "localhost")
        san = x509.SubjectAlternativeName(
            [x509.DNSName(n) for n in ordered_dns]
            + [x509.IPAddress(ip) for ip in sorted(ips, key=lambda a: (a.version, int(a)))])
        server = _issue(ca_cert, ca_key, _common_name(cn), ExtendedKeyUsageOID.SERVER_AUTH, now,
                        SERVER_DAYS, san)
        _save_pair(certs.server_cert, certs.server_key, *server)
    return certs


# --- device certificates ----------------------------------------------------------------------

def _out_paths(out_dir: Path, common_name: str) -> tuple[Path, Path]:
    out_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    stem = quote(common_name, safe="")  # "dev/mod" -> "dev%2Fmod"
    return out_dir / f"{stem}.cert.pem", out_dir / f"{stem}.key.pem"


def issue_client_certificate(certs: HubCertificates, common_name: str, out_dir: Path, *,
                             days: int = 365,
                             now: datetime | None = None) -> tuple[Path, Path]:
    """Issue a CA-signed client certificate (clientAuth) with ``CN=common_name`` for an
    X.509-CA identity (``CN=deviceId`` or ``deviceId/moduleId``, IoT Hub ref §8). Returns
    ``(cert.pem, key.pem)``; the key is written 0600."""
    now = now or datetime.now(UTC)
    ca = _load_pair(certs.ca_cert, certs.ca_key)
    if ca is None:
        raise ConfigError("hub CA certificate or key missing or unreadable", path="data_dir")
    cert, key = _issue(ca[0], ca[1], _common_name(common_name), ExtendedKeyUsageOID.CLIENT_AUTH,
                       now, days)
    cert_path, key_path = _out_paths(out_dir, common_name)
    _save_pair(cert_path, key_path, cert, key)
    return cert_path, key_path


def make_self_signed_certificate(common_name: str, out_dir: Path, *, days: int = 365,
                                 now: datetime | None = None) -> tuple[Path, Path]:
    """Make a self-signed client certificate for an X.509 ``selfSigned`` identity (the registry
    stores its thumbprint, IoT Hub ref §8). It is an end-entity certificate (CA:FALSE), so a
    hub that trusts it as an anchor does not let it vouch for other certificates."""
    now = now or datetime.now(UTC)
    key = _new_key()
    name = _common_name(common_name)
    builder = _builder(name, name, key, now, days)
    for extension, critical in _leaf_usage(ExtendedKeyUsageOID.CLIENT_AUTH):
        builder = builder.add_extension(extension, critical=critical)
    cert = builder.sign(key, hashes.SHA256())
    cert_path, key_path = _out_paths(out_dir, common_name)
    _save_pair(cert_path, key_path, cert, key)
    return cert_path, key_path


# --- TLS --------------------------------------------------------------------------------------

def server_ssl_context(certs: HubCertificates, *,
                       extra_trust_pems: Sequence[str] = ()) -> ssl.SSLContext:
    """A Python ``ssl`` server context with the hub's certificate (IoT Hub ref §1.1), for a
    listener that needs one. The hub's own device ports (MQTT 8883, HTTPS 443) use
    :func:`gateway.broker.tls.server_context` instead, which accepts any client certificate
    and leaves the decision to ``hub.auth`` (ref §8); Python's ``ssl`` cannot.

    TLS 1.2 minimum. The client certificate is *requested*, not required (``CERT_OPTIONAL``);
    one that is sent must chain to the hub CA or to one of ``extra_trust_pems``, else the
    handshake fails. More anchors can be added to the live context later with
    ``ctx.load_verify_locations(cadata=pem)``; new handshakes see them.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    ctx.load_cert_chain(certs.server_cert, certs.server_key)
    ctx.verify_mode = ssl.CERT_OPTIONAL
    ctx.load_verify_locations(cafile=certs.ca_cert)
    for pem in extra_trust_pems:
        ctx.load_verify_locations(cadata=pem)
    return ctx
