"""`gateway doctor`, `gateway support-bundle` and `gateway store inspect|export`, each check's
failure provoked for real: an expired certificate, a wrong upstream key (against a real hub),
a port in use, a full disk (a tiny tmpfs), a missing serial port, a damaged database."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import socket
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gateway.config import load_config
from gateway.doctor.bundle import redact, redact_text
from gateway.doctor.checks import (
    Context,
    check_certificates,
    check_disk,
    check_listeners,
    check_store,
)
from gateway.doctor.probe import UpstreamTarget, probe
from gateway.mqtt.packets import Puback, Publish
from tests.e2e.test_01_connect import tls
from tests.hubproc import HubProcess, create_device, device_token, username
from tests.tmpfs import tmpfs

ADDR = "127.0.9.1"  # this module's loopback address


def wait_until(check: Callable[[], Any], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.5)


def doctor(hub: HubProcess, *extra: str) -> dict[str, Any]:
    out = hub.cli("doctor", "--json", "--config", str(hub.config_file), *extra, check=False)
    assert out.returncode in (0, 1), out.stderr
    report = json.loads(out.stdout)
    assert out.returncode == (1 if report["summary"]["fail"] else 0)
    return report


def by_check(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["check"]: c for c in report["checks"]}


def context(data_dir: Path, config_text: str = "") -> Context:
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / "gateway.toml"
    path.write_text(config_text)
    return Context(data_dir=data_dir, config=load_config(data_dir, path), runtime=None,
                   client=None)


def test_a_healthy_hub_passes(hub: HubProcess) -> None:
    checks = by_check(doctor(hub))
    for name in ("hub.running", "store.hub", "store.registry", "certificates.ca",
                 "certificates.server", "listeners.mqtt-tls", "listeners.api", "disk"):
        assert checks[name]["status"] == "ok", checks[name]
    assert checks["upstream"]["status"] == "skip"


def test_a_stopped_hub_is_a_failure_with_a_hint(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "gateway", "--data-dir", str(tmp_path), "doctor",
                           "--json"], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    report = json.loads(proc.stdout)
    assert proc.returncode == 1
    found = by_check(report)["hub.running"]
    assert found["status"] == "fail" and "gateway run" in found["hint"]


def _write_cert(path: Path, *, not_before: datetime, not_after: datetime) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "testhub.local")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(not_before).not_valid_after(not_after)
            .sign(key, hashes.SHA256()))
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def test_expired_and_expiring_certificates(tmp_path: Path) -> None:
    now = datetime.now(UTC)
    ctx = context(tmp_path / "data")
    _write_cert(ctx.data_dir / "server.pem", not_before=now - timedelta(days=800),
                not_after=now - timedelta(days=1))
    _write_cert(ctx.data_dir / "ca.pem", not_before=now - timedelta(days=1),
                not_after=now + timedelta(days=10))
    found = {f.check: f for f in check_certificates(ctx)}
    assert found["certificates.server"].status == "fail"
    assert "expired" in found["certificates.server"].message
    assert "restart" in found["certificates.server"].hint
    assert found["certificates.ca"].status == "warn"
    assert "expires in" in found["certificates.ca"].message


def test_a_port_in_use_fails_naming_it(tmp_path: Path) -> None:
    with socket.socket() as blocker:
        blocker.bind((ADDR, 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        ctx = context(tmp_path / "data", f'[mqtt]\nbind = "{ADDR}"\ntls_port = {port}\n'
                                         'local_port = 0\n[api]\nbind = "127.0.9.1"\nport = 0\n')
        found = {f.check: f for f in check_listeners(ctx)}
    assert found["listeners.mqtt-tls"].status == "fail"
    assert "in use" in found["listeners.mqtt-tls"].message
    assert f"sport = :{port}" in found["listeners.mqtt-tls"].hint


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    with tmpfs(tmp_path / "tiny", "4m") as mount:
        yield mount


def test_a_full_disk_fails(tiny_disk: Path) -> None:
    ctx = context(tiny_disk / "data")
    with open(tiny_disk / "filler", "wb") as fh:
        try:
            while True:
                fh.write(b"\0" * 65536)
        except OSError:
            pass
    [disk, *rest] = list(check_disk(ctx))
    assert disk.status == "fail" and "free" in disk.message
    assert rest and rest[0].check == "disk.store-cap" and rest[0].status == "warn"


def test_a_damaged_store_fails(tmp_path: Path) -> None:
    ctx = context(tmp_path / "data")
    (ctx.data_dir / "hub.db").write_bytes(b"SQLite format 3\0" + os.urandom(8192))
    found = {f.check: f for f in check_store(ctx)}
    assert found["store.hub"].status == "fail"


def _parent(tmp_path: Path) -> HubProcess:
    return HubProcess(tmp_path / "parent").start()


def test_upstream_step_by_step(tmp_path: Path) -> None:
    parent = _parent(tmp_path)
    try:
        key = create_device(parent, "gw-7")["authentication"]["symmetricKey"]["primaryKey"]
        port = parent.port("mqtt_tls_port")
        good = UpstreamTarget(host="localhost", port=port, hub_name=parent.host_name,
                              device_id="gw-7", key=key, ca_file=Path(parent.ca_file))
        assert [f.status for f in probe(good)] == ["ok", "ok", "ok", "ok"]

        wrong_key = dataclasses.replace(good, key="d3Jvbmcga2V5IHdyb25nIGtleSB3cm9uZyBrZXk=")
        findings = probe(wrong_key)
        assert [f.status for f in findings] == ["ok", "ok", "ok", "fail"]
        assert findings[3].check == "upstream.auth" and "CONNACK 5" in findings[3].message
        assert "connection string's key" in findings[3].hint

        untrusted = dataclasses.replace(good, ca_file=None)
        findings = probe(untrusted)
        assert [f.status for f in findings] == ["ok", "ok", "fail", "skip"]
        assert "not trusted" in findings[2].message

        with socket.socket() as s:
            s.bind((ADDR, 0))
            closed = s.getsockname()[1]
        refused = UpstreamTarget(host=ADDR, port=closed, hub_name=parent.host_name,
                                 device_id="gw-7", key=key)
        assert [f.status for f in probe(refused)] == ["ok", "fail", "skip", "skip"]

        unknown = UpstreamTarget(host="no-such-parent.invalid", port=8883, hub_name="x",
                                 device_id="gw-7", key=key)
        findings = probe(unknown)
        assert findings[0].status == "fail" and findings[0].check == "upstream.dns"
    finally:
        parent.stop()


def test_a_missing_serial_port_and_a_refused_config(tmp_path: Path) -> None:
    hub = HubProcess(tmp_path / "data", extra_config='[modules.meters]\nbridge = "modbus"\n')
    hub.start()
    try:
        device = hub.info["device_id"]
        desired = {"buses": {"rs485": {"serial": {"port": "/dev/serial/by-id/usb-FTDI-gone"}}},
                   "devices": {}}
        hub.cli("twin", "update", device, "--module", "meters", "--desired", json.dumps(desired))
        wait_until(lambda: by_check(doctor(hub)).get("modules.meters", {}).get("status") == "ok",
                   timeout=60)
        checks = by_check(doctor(hub))
        port = checks["serial.meters.rs485"]
        assert port["status"] == "fail" and "does not exist" in port["message"]
        assert "/dev/serial/by-id" in port["hint"]

        hub.cli("twin", "update", device, "--module", "meters", "--desired",
                json.dumps({"buses": {"rs485": {"serial": {"port": 7}}}}))
        wait_until(lambda: by_check(doctor(hub))["modules.meters"]["status"] == "fail",
                   timeout=60)
        assert "configuration refused" in by_check(doctor(hub))["modules.meters"]["message"]
    finally:
        hub.stop()


def _publish(hub: HubProcess, device_id: str, key: str, bodies: list[bytes]) -> None:
    c = tls(hub)
    assert c.connect(device_id, username(hub, device_id),  # type: ignore[union-attr]
                     device_token(hub, device_id, key)).return_code == 0
    for i, body in enumerate(bodies, 1):
        c.send(Publish(topic=f"devices/{device_id}/messages/events/n={i}", payload=body,
                       qos=1, packet_id=i))
        assert c.recv() == Puback(i)
    c.close()


def test_store_inspect_and_export(hub: HubProcess, tmp_path: Path) -> None:
    key = create_device(hub, "meter-1")["authentication"]["symmetricKey"]["primaryKey"]
    create_device(hub, "other")
    bodies = [json.dumps({"kwh": i}).encode() for i in range(5)]
    _publish(hub, "meter-1", key, bodies)

    report = json.loads(hub.cli("store", "inspect", "--json").stdout)
    tables = {t["name"]: t["rows"] for t in report["databases"]["hub.db"]["tables"]}
    assert tables["log_messages"] >= 5 and report["log"]["byKind"]["telemetry"] == 5
    text = hub.cli("store", "inspect").stdout
    assert "log_messages" in text and "hub.db" in text

    lines = hub.cli("store", "export", "--device", "meter-1").stdout.splitlines()
    events = [json.loads(line)["event"] for line in lines]
    assert [e["payload"] for e in events] == [{"kwh": i} for i in range(5)]
    assert [e["properties"]["application"]["n"] for e in events] == ["1", "2", "3", "4", "5"]

    out = tmp_path / "meter.csv"
    hub.cli("store", "export", "--device", "meter-1", "--format", "csv", "--out", str(out))
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert [json.loads(r["body"]) for r in rows] == [{"kwh": i} for i in range(5)]
    assert all(r["deviceId"] == "meter-1" for r in rows)
    assert hub.cli("store", "export", "--device", "other").stdout == ""


def test_support_bundle_has_everything_and_no_secret(hub: HubProcess, tmp_path: Path) -> None:
    created = create_device(hub, "boiler-1")
    secrets = [created["authentication"]["symmetricKey"]["primaryKey"],
               created["authentication"]["symmetricKey"]["secondaryKey"]]
    owner = (hub.data_dir / "owner.connstr").read_text()
    secrets.append(owner.split("SharedAccessKey=")[1].strip())
    log_file = tmp_path / "hub.log"
    log_file.write_text(f"something HostName=x;DeviceId=y;SharedAccessKey={secrets[0]}\n")
    out = tmp_path / "bundle.tar.gz"
    result = hub.cli("support-bundle", "--out", str(out), "--config", str(hub.config_file),
                     "--log-file", str(log_file))
    assert "secrets redacted" in result.stdout
    assert (out.stat().st_mode & 0o777) == 0o600
    with tarfile.open(out) as tar:
        names = {m.name.removeprefix("support-bundle/") for m in tar.getmembers()}
        blob = b"".join(tar.extractfile(m).read() for m in tar.getmembers())  # type: ignore[union-attr]
    assert {"doctor.json", "doctor.txt", "store.json", "hub.json", "identities.json",
            "version.json", "config/effective.json"} <= names
    for secret in secrets:
        assert secret.encode() not in blob
    assert b"boiler-1" in blob  # the identities are there, their keys are not


def test_redaction() -> None:
    doc = {"authentication": {"symmetricKey": {"primaryKey": "abc"}}, "deviceId": "d",
           "password": "", "upstream": {"connection_string": "HostName=h;SharedAccessKey=zz"},
           "note": "token SharedAccessSignature sr=a&sig=SECRET&se=1"}
    out = redact(doc)
    assert out["authentication"]["symmetricKey"] == "<redacted>"
    assert out["deviceId"] == "d" and out["password"] == ""
    assert out["upstream"]["connection_string"] == "<redacted>"
    assert "SECRET" not in out["note"]
    assert "zz" not in redact_text('connection_string = "HostName=h;SharedAccessKey=zz"')


def test_doctor_probes_the_configured_upstream(tmp_path: Path) -> None:
    parent = _parent(tmp_path)
    child = HubProcess(tmp_path / "child").start()
    try:
        create_device(parent, "site-gw", "--edge")
        good = parent.connection_string("site-gw")
        wrong = good.split("SharedAccessKey=")[0] + "SharedAccessKey=" + \
            "d3Jvbmcga2V5IHdyb25nIGtleSB3cm9uZyBrZXk="
        port = str(parent.port("mqtt_tls_port"))
        child.cli("upstream", "set", "--connection-string", wrong, "--ca-file", parent.ca_file,
                  "--host", "localhost", "--port", port)
        checks = by_check(doctor(child))
        assert checks["upstream.tls"]["status"] == "ok"
        assert checks["upstream.auth"]["status"] == "fail"
        child.cli("upstream", "set", "--connection-string", good, "--ca-file", parent.ca_file,
                  "--host", "localhost", "--port", port)
        assert by_check(doctor(child))["upstream.auth"]["status"] == "ok"
    finally:
        child.stop()
        parent.stop()
