"""The hub's certificate files at start, checked with the standard library alone.

Importing ``cryptography`` costs an idle hub several MB of resident memory it would keep for
good (issue 16), and at almost every start the files from the previous run are still good. So
:func:`ensure` first checks them with Python's ``ssl``: the server key matches its
certificate and the CA key its certificate (``load_cert_chain``), a TLS handshake in memory
against a client that trusts only ``ca.pem`` succeeds (the CA signed the server certificate and
both are valid now), the server certificate is valid for more than
:data:`~gateway.pki.RENEW_BEFORE` and its SANs cover every wanted name. Only when one of these
fails does it call :func:`gateway.pki.ensure_certificates`, which imports ``cryptography`` and
makes or repairs what is missing (design contract "Trust", IoT Hub ref §15.2).
"""

from __future__ import annotations

import hashlib
import ipaddress
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from gateway.errors import ConfigError

__all__ = ["HubCertificates", "RENEW_BEFORE", "ensure", "reusable", "thumbprints",
           "wanted_names"]

RENEW_BEFORE = timedelta(days=30)
"""A server certificate that expires sooner than this is re-issued."""

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class HubCertificates:
    """Paths of the hub's CA and server certificate/key (PEM)."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path

    @classmethod
    def in_dir(cls, data_dir: Path) -> HubCertificates:
        return cls(data_dir / "ca.pem", data_dir / "ca.key",
                   data_dir / "server.pem", data_dir / "server.key")


def thumbprints(der: bytes) -> tuple[str, str]:
    """(SHA-1, SHA-256) hex digests of a DER certificate, upper case (IoT Hub ref §8)."""
    return hashlib.sha1(der).hexdigest().upper(), hashlib.sha256(der).hexdigest().upper()


def wanted_names(host_names: Sequence[str],
                 addresses: Sequence[str]) -> tuple[frozenset[str], frozenset[IPAddress]]:
    """The DNS names and IP addresses the server certificate must cover: ``host_names``
    (an IP literal among them counts as an address), ``localhost``, ``addresses``, 127.0.0.1
    and ::1. DNS names are lower case, without a trailing dot; :class:`ConfigError` for a
    name or address that is not one."""
    dns = {"localhost"}
    ips: set[IPAddress] = {ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")}
    for name in host_names:
        try:
            ips.add(ipaddress.ip_address(name))
        except ValueError:
            if not name or not name.isascii() or any(c in name for c in " /\\"):
                raise ConfigError(f"not a DNS name: {name!r}", path="host_names") from None
            dns.add(name.rstrip(".").lower())
    for address in addresses:
        try:
            ips.add(ipaddress.ip_address(address))
        except ValueError:
            raise ConfigError(f"not an IP address: {address!r}", path="addresses") from None
    return frozenset(dns), frozenset(ips)


def _served_certificate(certs: HubCertificates) -> dict[str, object] | None:
    """The server certificate as a client trusting only the hub CA sees it after a handshake
    in memory (``getpeercert()``); None when a key does not match its certificate, a file is
    missing or unreadable, or the handshake fails (not signed by the CA, or either one not
    valid now)."""
    try:
        ca_pair = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ca_pair.load_cert_chain(certs.ca_cert, certs.ca_key)  # the CA key matches ca.pem
        server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server_ctx.load_cert_chain(certs.server_cert, certs.server_key)
        client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        client_ctx.check_hostname = False  # the names are compared below, all of them
        client_ctx.load_verify_locations(cafile=certs.ca_cert)
    except (OSError, ValueError):  # ssl.SSLError is an OSError
        return None
    to_server, to_client = ssl.MemoryBIO(), ssl.MemoryBIO()
    c2s, s2c = ssl.MemoryBIO(), ssl.MemoryBIO()
    server = server_ctx.wrap_bio(to_server, s2c, server_side=True)
    client = client_ctx.wrap_bio(to_client, c2s)
    done = {"client": False, "server": False}
    for _ in range(8):  # TLS 1.3 completes in 2 rounds, 1.2 in 3
        for name, side in (("client", client), ("server", server)):
            if not done[name]:
                try:
                    side.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
                except (ssl.SSLError, OSError):
                    return None
        to_server.write(c2s.read())
        to_client.write(s2c.read())
        if done["client"] and done["server"]:
            peer = client.getpeercert()
            return dict(peer) if peer else None
    return None


def reusable(certs: HubCertificates, dns: frozenset[str], ips: frozenset[IPAddress], *,
             now: float | None = None) -> bool:
    """The files in ``certs`` can serve as they are (see the module docstring); ``now`` (a
    Unix time) is for tests: the handshake itself checks validity at the real time."""
    peer = _served_certificate(certs)
    if peer is None:
        return False
    now = time.time() if now is None else now
    try:
        not_before = ssl.cert_time_to_seconds(str(peer["notBefore"]))
        not_after = ssl.cert_time_to_seconds(str(peer["notAfter"]))
    except (KeyError, ValueError):
        return False
    if not not_before <= now <= not_after - RENEW_BEFORE.total_seconds():
        return False
    have_dns: set[str] = set()
    have_ips: set[IPAddress] = set()
    for kind, value in peer.get("subjectAltName", ()):  # type: ignore[attr-defined]
        if kind == "DNS":
            have_dns.add(str(value).lower())
        elif kind == "IP Address":
            try:
                have_ips.add(ipaddress.ip_address(str(value).strip()))
            except ValueError:
                continue
    return dns <= have_dns and ips <= have_ips


def ensure(data_dir: Path, *, host_names: Sequence[str], addresses: Sequence[str],
           now: datetime | None = None) -> HubCertificates:
    """The hub's certificates in ``data_dir``: the files as they are when :func:`reusable`,
    else made or repaired by :func:`gateway.pki.ensure_certificates` (which imports
    ``cryptography``). ``now`` is for tests."""
    dns, ips = wanted_names(host_names, addresses)
    certs = HubCertificates.in_dir(data_dir)
    if reusable(certs, dns, ips, now=now.timestamp() if now is not None else None):
        return certs
    from gateway import pki  # cryptography: only when something must be made

    return pki.ensure_certificates(data_dir, host_names=host_names, addresses=addresses,
                                   now=now)
