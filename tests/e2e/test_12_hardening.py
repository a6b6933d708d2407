"""Issue 8's protocol edges, rights, files and X.509 set-up, against a real hub process:
each test fails on the code before the fix."""

from __future__ import annotations

import base64
import json
import os
import ssl
import stat
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
from cryptography import x509

from gateway.hub.sas import SAS_PREFIX, generate_sas_token, sign
from gateway.mqtt.codec import encode
from gateway.mqtt.packets import Connack, Connect, Disconnect, Publish, Puback, Will
from tests.certchain import issue, three_levels
from tests.hubproc import HubProcess, create_device, device_token, username
from tests.mqttraw import RawClient


@pytest.fixture
def device(hub: HubProcess) -> tuple[str, str]:
    info = create_device(hub, "dev1")
    return "dev1", info["authentication"]["symmetricKey"]["primaryKey"]


def tls_client(hub: HubProcess, cert: tuple[Path, Path] | None = None) -> RawClient:
    return RawClient(hub.port("mqtt_tls_port"), ca_file=hub.ca_file,
                     cert=(str(cert[0]), str(cert[1])) if cert else None)


def policy_key(hub: HubProcess, name: str) -> str:
    cs = hub.cli("policy", "connection-string", name).stdout.strip()
    return dict(p.split("=", 1) for p in cs.split(";"))["SharedAccessKey"]


def policy_token(hub: HubProcess, name: str, resource: str | None = None) -> str:
    return generate_sas_token(resource or hub.host_name, policy_key(hub, name),
                              int(time.time()) + 3600, policy=name)


def api(hub: HubProcess, method: str, path: str, token: str,
        body: Any = None) -> tuple[int, dict[str, str], Any]:
    ctx = ssl.create_default_context(cafile=hub.ca_file)
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"https://localhost:{hub.port('api_port')}{path}", data=data,
                                 method=method, headers={"Authorization": token,
                                                         "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=30) as response:
            raw = response.read()
            return response.status, dict(response.headers), json.loads(raw) if raw else None
    except urllib.error.HTTPError as err:
        raw = err.read()
        return err.code, dict(err.headers), json.loads(raw) if raw else None


def monitor(hub: HubProcess, device_id: str, *extra: str) -> list[dict[str, Any]]:
    out = hub.cli("monitor-events", "--device", device_id, "--from-beginning", "--timeout", "2",
                  "--json", *extra).stdout
    return [json.loads(line)["event"] for line in out.splitlines() if line.strip()]


def wait_for_log(hub: HubProcess, text: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in hub.log_text():
        if time.monotonic() > deadline:
            raise AssertionError(f"log line {text!r} not found in:\n{hub.log_text()[-3000:]}")
        time.sleep(0.05)


# --- protocol edges (issue 8 item 3) ---------------------------------------------------------

async def test_sas_expiry_with_hundreds_of_digits_is_refused_everywhere(
        hub: HubProcess, device: tuple[str, str]) -> None:
    dev, key = device
    se = "9" * 400
    sr = quote(f"{hub.host_name}/devices/{dev}", safe="")
    sig = quote(base64.b64encode(sign(key, f"{sr}\n{se}")).decode(), safe="")
    token = f"{SAS_PREFIX} sr={sr}&sig={sig}&se={se}"
    ack = tls_client(hub).connect(dev, username(hub, dev), token)
    assert isinstance(ack, Connack) and ack.return_code == 5
    # the service API: a policy token signed with such an se
    psr = quote(hub.host_name, safe="")
    psig = quote(base64.b64encode(sign(policy_key(hub, "iothubowner"),
                                       f"{psr}\n{se}")).decode(), safe="")
    status, headers, body = api(hub, "GET", "/devices",
                                f"{SAS_PREFIX} sr={psr}&sig={psig}&se={se}&skn=iothubowner")
    assert status == 401 and headers["iothub-errorcode"] == "IotHubUnauthorizedAccess"
    assert "expiry out of range" in body["Message"]
    # MQTT over WebSocket: CONNACK 5, then a clean close
    ws_ctx = ssl.create_default_context(cafile=hub.ca_file)
    async with aiohttp.ClientSession() as session, session.ws_connect(
            f"wss://localhost:{hub.port('api_port')}/$iothub/websocket", protocols=("mqtt",),
            ssl=ws_ctx) as ws:
        await ws.send_bytes(encode(Connect(client_id=dev, clean_session=False, keepalive=60,
                                           username=username(hub, dev),
                                           password=token.encode())))
        msg = await ws.receive(timeout=10)
        assert msg.type is aiohttp.WSMsgType.BINARY and msg.data == encode(Connack(False, 5))
        closing = await ws.receive(timeout=10)
        assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
    log = hub.log_text()
    assert "OverflowError" not in log and "Traceback" not in log
    assert log.count("reason=token expiry out of range") >= 2


def test_connect_publish_disconnect_in_one_write(hub: HubProcess,
                                                 device: tuple[str, str]) -> None:
    dev, key = device
    will = Will(topic=f"devices/{dev}/messages/events/", payload=b"will", qos=1, retain=False)
    c = tls_client(hub)
    c.send_raw(encode(Connect(client_id=dev, clean_session=False, keepalive=60,
                              username=username(hub, dev),
                              password=device_token(hub, dev, key).encode(), will=will))
               + encode(Publish(topic=f"devices/{dev}/messages/events/", payload=b"pipelined",
                                qos=1, packet_id=1))
               + encode(Disconnect()))
    assert c.recv() == Connack(False, 0)
    c.expect_closed()
    wait_for_log(hub, f"disconnected client_id='{dev}'")
    assert [e["payload"] for e in monitor(hub, dev)] == ["pipelined"]  # stored, no Will
    assert "Traceback" not in hub.log_text()


@pytest.fixture
def capped_hub(tmp_path: Path) -> Any:
    proc = HubProcess(tmp_path / "data")  # writes its config file; start it with the cap
    proc.config_file.write_text(proc.config_file.read_text().replace(
        "[mqtt]\n", "[mqtt]\nmax_keepalive = 1\n"))
    yield proc.start()
    proc.stop()


@pytest.mark.parametrize("asked", [0, 100])
def test_max_keepalive_is_enforced_and_zero_gets_the_cap(capped_hub: HubProcess,
                                                         asked: int) -> None:
    info = create_device(capped_hub, "dev1")
    key = info["authentication"]["symmetricKey"]["primaryKey"]
    c = tls_client(capped_hub)
    started = time.monotonic()
    ack = c.connect("dev1", username(capped_hub, "dev1"), device_token(capped_hub, "dev1", key),
                    keepalive=asked)
    assert isinstance(ack, Connack) and ack.return_code == 0
    c.expect_closed(timeout=15)  # 1.5 x the 1 s cap, not 1.5 x asked (or never)
    assert time.monotonic() - started < 12
    wait_for_log(capped_hub, "keep-alive expired")
    assert f"keep-alive capped client_id='dev1' asked={asked} cap=1" in capped_hub.log_text()


def test_tls_close_notify_ends_the_connection_at_once(hub: HubProcess,
                                                      device: tuple[str, str]) -> None:
    dev, key = device
    c = tls_client(hub)
    assert c.connect(dev, username(hub, dev), device_token(hub, dev, key)) == Connack(False, 0)
    assert isinstance(c.sock, ssl.SSLSocket)
    c.sock.settimeout(10)
    started = time.monotonic()
    plain = c.sock.unwrap()  # sends close_notify and waits for the hub's
    assert time.monotonic() - started < 5
    plain.settimeout(10)
    assert plain.recv(10) == b""  # and the hub closed the TCP connection too
    wait_for_log(hub, f"disconnected client_id='{dev}'")


def test_telemetry_without_message_id_is_shown_without_one(hub: HubProcess,
                                                           device: tuple[str, str]) -> None:
    dev, key = device
    c = tls_client(hub)
    c.connect(dev, username(hub, dev), device_token(hub, dev, key))
    c.send(Publish(topic=f"devices/{dev}/messages/events/a=1", payload=b"{}", qos=1,
                   packet_id=1))
    c.send(Publish(topic=f"devices/{dev}/messages/events/%24.mid=m7", payload=b"{}", qos=1,
                   packet_id=2))
    assert [c.recv(), c.recv()] == [Puback(1), Puback(2)]
    first, second = monitor(hub, dev)
    assert "message_id" not in first["properties"]["system"]
    assert second["properties"]["system"]["message_id"] == "m7"
    status, _, batch = api(hub, "GET", f"/messages/events?start=earliest&deviceId={dev}",
                           policy_token(hub, "service"))
    assert status == 200
    assert "message-id" not in json.dumps(batch[0]) and "message_id" not in json.dumps(batch[0])


@pytest.mark.parametrize("query", ["limit=abc", "waitSeconds=nan", "waitSeconds=inf",
                                   "limit=0", "waitSeconds=x&limit=5"])
def test_bad_query_values_are_400_in_iot_hub_shape(hub: HubProcess, query: str) -> None:
    status, headers, body = api(hub, "GET", f"/messages/events?{query}",
                                policy_token(hub, "service"))
    assert status == 400, body
    assert headers["iothub-errorcode"] == "ArgumentInvalid"
    assert body["Message"].startswith("ErrorCode:ArgumentInvalid;")
    for path in ("/messages/serviceBound/feedback?waitSeconds=nan", "/devices?top=abc"):
        token = policy_token(hub, "iothubowner")
        status, headers, _ = api(hub, "GET", path, token)
        assert status == 400 and headers["iothub-errorcode"] == "ArgumentInvalid", path
    assert "Traceback" not in hub.log_text()


# --- rights (issue 8 item 5) -------------------------------------------------------------------

def test_reading_policy_keys_needs_every_right(hub: HubProcess) -> None:
    for name in ("registryReadWrite", "registryRead", "service", "device"):
        status, _, body = api(hub, "GET", "/sharedAccessPolicies/iothubowner",
                              policy_token(hub, name))
        assert status == 403, (name, body)
        assert "primaryKey" not in json.dumps(body)
    status, _, body = api(hub, "GET", "/sharedAccessPolicies/service",
                          policy_token(hub, "iothubowner"))
    assert status == 200 and body["primaryKey"]


def test_a_policy_token_for_one_device_reaches_only_that_device(hub: HubProcess) -> None:
    create_device(hub, "dev1")
    create_device(hub, "dev2")
    token = policy_token(hub, "iothubowner", f"{hub.host_name}/devices/dev1")
    assert api(hub, "GET", "/devices/dev1", token)[0] == 200
    assert api(hub, "GET", "/twins/dev1", token)[0] == 200
    for path in ("/devices/dev2", "/twins/dev2", "/devices", "/statistics/devices",
                 "/sharedAccessPolicies/iothubowner", "/messages/events", "/devices/dev10"):
        status, headers, _ = api(hub, "GET", path, token)
        assert status == 403 and headers["iothub-errorcode"] == "IotHubUnauthorizedAccess", path
    assert api(hub, "DELETE", "/devices/dev2", token)[0] == 403
    hub_wide = policy_token(hub, "iothubowner", f"{hub.host_name}/devices")
    assert api(hub, "GET", "/devices/dev2", hub_wide)[0] == 200
    assert api(hub, "GET", "/statistics/devices", hub_wide)[0] == 403


# --- files (issue 8 item 6) --------------------------------------------------------------------

def test_a_wide_data_directory_is_tightened_and_databases_are_private(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    os.chmod(data, 0o755)
    (data / "hub.db").touch(mode=0o644)
    os.chmod(data / "hub.db", 0o644)
    proc = HubProcess(data).start()
    try:
        create_device(proc, "dev1")
        assert stat.S_IMODE(data.stat().st_mode) == 0o700
        assert "tightened to 0700" in proc.log_text()
        for name in ("hub.db", "hub.db-wal", "hub.db-shm", "registry.db", "registry.db-wal",
                     "registry.db-shm"):
            assert stat.S_IMODE((data / name).stat().st_mode) == 0o600, name
    finally:
        proc.stop()


# --- X.509 set-up (issue 8 item 1) -------------------------------------------------------------

def test_device_create_x509_ca_issues_the_certificate_and_key(hub: HubProcess,
                                                             tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = hub.cli("device", "create", "cam-2", "--x509-ca", "--out", str(out))
    assert json.loads(result.stdout)["authentication"]["type"] == "certificateAuthority"
    cert, key = out / "cam-2.cert.pem", out / "cam-2.key.pem"
    assert f"certificate: {cert}" in result.stderr
    for path in (cert, key):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    loaded = x509.load_pem_x509_certificate(cert.read_bytes())
    assert loaded.subject.rfc4514_string() == "CN=cam-2"
    loaded.verify_directly_issued_by(x509.load_pem_x509_certificate(
        Path(hub.ca_file).read_bytes()))
    c = tls_client(hub, (cert, key))
    assert c.connect("cam-2", username(hub, "cam-2"), None) == Connack(False, 0)
    c.send(Publish(topic="devices/cam-2/messages/events/", payload=b"x", qos=1, packet_id=1))
    assert c.recv() == Puback(1)


def test_ca_cert_commands_and_a_three_level_chain(hub: HubProcess, tmp_path: Path) -> None:
    chain = three_levels("plc-9")
    root = tmp_path / "root.pem"
    root.write_text(chain.root.pem)
    created = json.loads(hub.cli("ca-cert", "create", "plant", "--path", str(root)).stdout)
    assert created["name"] == "plant" and created["properties"]["isVerified"] is False
    assert created["properties"]["subject"] == "CN=Test Root CA"
    listed = hub.cli("ca-cert", "list").stdout
    assert listed.startswith("plant\tunverified\tCN=Test Root CA\t")
    hub.cli("device", "create", "plc-9", "--x509-ca", "--no-cert", "--out", str(tmp_path / "x"))
    assert not (tmp_path / "x").exists()  # registered only: its certificate is from our CA
    device_cert, device_key = chain.write_device_files(tmp_path / "dev")
    c = tls_client(hub, (device_cert, device_key))  # any certificate passes the handshake
    assert c.connect("plc-9", username(hub, "plc-9"), None) == Connack(False, 5)
    c.close()
    code = hub.cli("ca-cert", "verification-code", "plant").stdout.strip()
    assert len(code) == 48
    wrong = tmp_path / "wrong.pem"
    wrong.write_text(issue(code, chain.intermediate, ca=False).pem)
    bad = hub.cli("ca-cert", "verify", "plant", "--path", str(wrong), check=False)
    assert bad.returncode == 1 and "not signed by this CA's private key" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    proof = tmp_path / "proof.pem"
    proof.write_text(issue(code, chain.root, ca=False).pem)
    verified = json.loads(hub.cli("ca-cert", "verify", "plant", "--path", str(proof)).stdout)
    assert verified["properties"]["isVerified"] is True
    assert json.loads(hub.cli("ca-cert", "show", "plant").stdout)["etag"] == verified["etag"]
    c = tls_client(hub, (device_cert, device_key))
    assert c.connect("plc-9", username(hub, "plc-9"), None) == Connack(False, 0)
    c.send(Publish(topic="devices/plc-9/messages/events/", payload=b"chained", qos=1,
                   packet_id=1))
    assert c.recv() == Puback(1)
    hub.cli("ca-cert", "delete", "plant")
    c.expect_closed()  # the live connection it vouched for goes too
    wait_for_log(hub, "reason=CA certificate 'plant' deleted")
    assert hub.cli("ca-cert", "list").stdout == ""
    c = tls_client(hub, (device_cert, device_key))
    assert c.connect("plc-9", username(hub, "plc-9"), None) == Connack(False, 5)
    c.close()
    wait_for_log(hub, "reason=certificate chain not trusted: no path to the hub CA or a "
                      "verified CA certificate through the 1 intermediate(s)")
    missing = hub.cli("ca-cert", "show", "plant", check=False)
    assert missing.returncode == 1 and "404" in missing.stderr
    # the REST shapes: registryRead may read, not write
    token = policy_token(hub, "registryRead")
    assert api(hub, "GET", "/certificates", token)[:1] == (200,)
    status, _, _ = api(hub, "PUT", "/certificates/x", token,
                       {"properties": {"certificate": chain.root.pem}})
    assert status == 403
