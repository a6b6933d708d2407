"""The upstream link, step by step: DNS, TCP, TLS, then MQTT authentication.

Each step runs only when the one before it passed, and the first failure names its step, so a
technician knows whether to look at the name server, the firewall, the certificates or the
credentials (IoT Hub ref §7 for the username and token, §15.2 for TLS).
"""

from __future__ import annotations

import socket
import ssl
import time
from dataclasses import dataclass
from pathlib import Path

from gateway.doctor.report import Finding, fail, ok, skip
from gateway.hub.sas import generate_sas_token
from gateway.mqtt.codec import Decoder, encode
from gateway.mqtt.packets import Connack, Connect

API_VERSION = "2021-04-12"

_CONNACK_MEANING = {
    1: "the parent refused the MQTT protocol level",
    2: "the parent refused the client id",
    3: "the parent's MQTT service is unavailable",
    4: "the parent refused the username or password format",
    5: "the parent refused the credentials (wrong key, expired token, unknown or disabled device)",
}


@dataclass(frozen=True, slots=True)
class UpstreamTarget:
    """Where and as whom the gateway connects upstream."""

    host: str  # the address dialled
    port: int
    hub_name: str  # the parent's host name (token audience, username)
    device_id: str
    key: str | None = None  # SAS key (base64)
    cert: Path | None = None  # X.509 certificate and key files
    cert_key: Path | None = None
    ca_file: Path | None = None  # None: the system's trust store

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def probe(target: UpstreamTarget, *, timeout: float = 5.0) -> list[Finding]:
    """Run the four steps; every step after the first failure is reported as skipped."""
    findings: list[Finding] = []
    steps = ("upstream.dns", "upstream.tcp", "upstream.tls", "upstream.auth")

    def done(finding: Finding) -> bool:
        findings.append(finding)
        if finding.status == "fail":
            for name in steps[len(findings):]:
                findings.append(skip(name, f"not tried: {finding.check} failed"))
            return False
        return True

    try:
        infos = socket.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        done(fail("upstream.dns", f"cannot resolve {target.host!r}: {exc.strerror}",
                  "check the upstream host name and the gateway's DNS servers "
                  "(or set the parent's address with gateway upstream set --host)"))
        return findings
    addresses = sorted({str(info[4][0]) for info in infos})
    if not done(ok("upstream.dns", f"{target.host} resolves to {', '.join(addresses)}")):
        return findings

    start = time.monotonic()
    try:
        sock = socket.create_connection((target.host, target.port), timeout=timeout)
    except TimeoutError:
        done(fail("upstream.tcp", f"no answer from {target.address} within {timeout:g} s",
                  "a firewall may drop the traffic, or the parent is down; "
                  f"port {target.port} must be open outbound"))
        return findings
    except OSError as exc:
        done(fail("upstream.tcp", f"cannot connect to {target.address}: {exc.strerror or exc}",
                  "the parent is not listening there: check the port and that its hub runs"))
        return findings
    rtt_ms = (time.monotonic() - start) * 1000
    with sock:
        if not done(ok("upstream.tcp", f"connected to {target.address} in {rtt_ms:.1f} ms")):
            return findings
        try:
            tls = _tls_context(target).wrap_socket(sock, server_hostname=target.host)
        except ssl.SSLCertVerificationError as exc:
            done(fail("upstream.tls", f"the parent's certificate is not trusted: "
                                      f"{exc.verify_message}",
                      "give the parent's CA with --ca-file (gateway ca > parent-ca.pem on a "
                      "parent that is a gateway), and check the host name it was issued for"))
            return findings
        except (ssl.SSLError, OSError) as exc:
            done(fail("upstream.tls", f"TLS handshake failed: {exc}",
                      "the port may not speak TLS (8883 does), or the parent needs TLS 1.2+"))
            return findings
        except ValueError as exc:  # a client certificate that does not load
            done(fail("upstream.tls", str(exc), "check the certificate and key files"))
            return findings
        with tls:
            if not done(ok("upstream.tls", f"{tls.version()}, parent certificate verified")):
                return findings
            done(_authenticate(tls, target, timeout))
    return findings


def _tls_context(target: UpstreamTarget) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(target.ca_file) if target.ca_file else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if target.cert is not None:
        try:
            ctx.load_cert_chain(str(target.cert), str(target.cert_key or target.cert))
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"cannot load the upstream certificate {target.cert}: {exc}") \
                from None
    return ctx


def _authenticate(tls: ssl.SSLSocket, target: UpstreamTarget, timeout: float) -> Finding:
    password = None
    if target.key is not None:
        resource = f"{target.hub_name}/devices/{target.device_id}"
        password = generate_sas_token(resource, target.key, int(time.time()) + 300).encode()
    username = f"{target.hub_name}/{target.device_id}/?api-version={API_VERSION}"
    tls.settimeout(timeout)
    tls.sendall(encode(Connect(client_id=target.device_id, clean_session=True, keepalive=30,
                               username=username, password=password)))
    decoder = Decoder()
    try:
        while True:
            data = tls.recv(4096)
            if not data:
                return fail("upstream.auth", "the parent closed the connection without CONNACK",
                            "the parent refused this identity at the TLS or MQTT level; "
                            "see its log for the reason")
            for packet in decoder.feed(data):
                if isinstance(packet, Connack):
                    return _connack(packet, target)
    except TimeoutError:
        return fail("upstream.auth", f"no CONNACK within {timeout:g} s",
                    "the parent accepted TLS but does not answer MQTT; is this its MQTT port?")
    except (ssl.SSLError, OSError) as exc:
        return fail("upstream.auth", f"connection lost during CONNECT: {exc}",
                    "the parent refused this identity; see its log for the reason")


def _connack(packet: Connack, target: UpstreamTarget) -> Finding:
    if packet.return_code == 0:
        return ok("upstream.auth", f"authenticated as {target.device_id} at {target.hub_name}")
    meaning = _CONNACK_MEANING.get(packet.return_code, "an unknown refusal")
    return fail("upstream.auth", f"CONNACK {packet.return_code}: {meaning}",
                "check the connection string's key (rotate it at the parent and set it again "
                "with gateway upstream set), that the device exists and is enabled there, "
                "and the gateway's clock", code=packet.return_code)
