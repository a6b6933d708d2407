"""CONNECT over TLS: acceptance and every refusal, each with the right CONNACK code or a closed
connection and a log line naming the reason; the hub keeps serving others."""

from __future__ import annotations

import time

import pytest

from gateway.hub.sas import generate_sas_token
from gateway.mqtt.packets import Connack, Puback, Publish
from tests.hubproc import HubProcess, create_device, device_token, username
from tests.mqttraw import RawClient


@pytest.fixture
def device(hub: HubProcess) -> tuple[str, str]:
    info = create_device(hub, "dev1")
    return "dev1", info["authentication"]["symmetricKey"]["primaryKey"]


def tls(hub: HubProcess) -> RawClient:
    return RawClient(hub.port("mqtt_tls_port"), ca_file=hub.ca_file)


def wait_for_log(hub: HubProcess, text: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in hub.log_text():
            return
        time.sleep(0.05)
    raise AssertionError(f"log line {text!r} not found in:\n{hub.log_text()[-3000:]}")


def assert_still_serving(hub: HubProcess, device: tuple[str, str]) -> None:
    c = tls(hub)
    ack = c.connect(device[0], username(hub, device[0]), device_token(hub, *device))
    assert isinstance(ack, Connack) and ack.return_code == 0
    c.send(Publish(topic=f"devices/{device[0]}/messages/events/", payload=b"{}", qos=1, packet_id=7))
    assert c.recv() == Puback(7)
    c.close()


def test_valid_sas_token_is_accepted(hub: HubProcess, device: tuple[str, str]) -> None:
    c = tls(hub)
    ack = c.connect("dev1", username(hub, "dev1"), device_token(hub, *device))
    assert isinstance(ack, Connack) and ack.return_code == 0


@pytest.mark.parametrize("case,code,reason", [
    ("bad-signature", 5, "bad signature"),
    ("expired", 5, "expired"),
    ("unknown-device", 5, "unknown device"),
    ("malformed-username", 4, "username"),
    ("malformed-password", 4, "malformed"),
    ("client-id-mismatch", 5, "client id"),
])
def test_refusals_get_connack_and_log_reason(hub: HubProcess, device: tuple[str, str],
                                             case: str, code: int, reason: str) -> None:
    dev, key = device
    client_id, user, password = dev, username(hub, dev), device_token(hub, dev, key)
    if case == "bad-signature":
        password = device_token(hub, dev, "A" * 43 + "=")
    elif case == "expired":
        password = generate_sas_token(f"{hub.host_name}/devices/{dev}", key, int(time.time()) - 600)
    elif case == "unknown-device":
        client_id, user = "ghost", username(hub, "ghost")
        password = generate_sas_token(f"{hub.host_name}/devices/ghost", key, int(time.time()) + 60)
    elif case == "malformed-username":
        user = "not-a-hub-username"
    elif case == "malformed-password":
        password = "SharedAccessSignature garbage"
    elif case == "client-id-mismatch":
        client_id = "someone-else"
    c = tls(hub)
    ack = c.connect(client_id, user, password)
    assert ack == Connack(session_present=False, return_code=code)
    c.expect_closed()
    wait_for_log(hub, "connection refused")
    assert reason in hub.log_text().split("connection refused")[-1].splitlines()[0]
    assert_still_serving(hub, device)


def test_disabled_device_is_refused(hub: HubProcess) -> None:
    info = create_device(hub, "off1", "--disabled")
    key = info["authentication"]["symmetricKey"]["primaryKey"]
    c = tls(hub)
    assert c.connect("off1", username(hub, "off1"), device_token(hub, "off1", key)).return_code == 5  # type: ignore[union-attr]
    wait_for_log(hub, "disabled")


def test_token_expiry_closes_the_connection(hub: HubProcess, device: tuple[str, str]) -> None:
    c = tls(hub)
    ack = c.connect(device[0], username(hub, device[0]), device_token(hub, *device, ttl=2))
    assert ack.return_code == 0  # type: ignore[union-attr]
    c.expect_closed(timeout=8)
    wait_for_log(hub, "SAS token expired")


def test_connect_timeout_closes_silent_connection(tmp_path) -> None:  # type: ignore[no-untyped-def]
    hub = HubProcess(tmp_path / "data")
    text = hub.config_file.read_text().replace("[mqtt]\n", "[mqtt]\nconnect_timeout = 1.0\n")
    hub.config_file.write_text(text)
    hub.start()
    try:
        c = tls(hub)
        c.expect_closed(timeout=5)
        wait_for_log(hub, "no CONNECT")
    finally:
        hub.stop()


def test_keepalive_expiry(hub: HubProcess, device: tuple[str, str]) -> None:
    c = tls(hub)
    assert c.connect(device[0], username(hub, device[0]), device_token(hub, *device),
                     keepalive=1).return_code == 0  # type: ignore[union-attr]
    started = time.monotonic()
    c.expect_closed(timeout=6)
    assert time.monotonic() - started >= 1.4  # 1.5 x keep-alive (MQTT 3.1.1 §3.1.2.10)
    wait_for_log(hub, "keep-alive expired")


def test_same_client_id_takes_over(hub: HubProcess, device: tuple[str, str]) -> None:
    first = tls(hub)
    assert first.connect(device[0], username(hub, device[0]), device_token(hub, *device)).return_code == 0  # type: ignore[union-attr]
    second = tls(hub)
    assert second.connect(device[0], username(hub, device[0]), device_token(hub, *device)).return_code == 0  # type: ignore[union-attr]
    first.expect_closed()
    second.send(Publish(topic="devices/dev1/messages/events/", payload=b"x", qos=1, packet_id=1))
    assert second.recv() == Puback(1)


def test_unknown_client_certificate_is_refused_at_connect_with_log(hub: HubProcess, tmp_path) -> None:  # type: ignore[no-untyped-def]
    # As IoT Hub: any certificate passes the TLS handshake, the identity check refuses it.
    from gateway.pki import make_self_signed_certificate

    cert, key = make_self_signed_certificate("intruder", tmp_path)
    c = RawClient(hub.port("mqtt_tls_port"), ca_file=hub.ca_file, cert=(str(cert), str(key)))
    assert c.connect("intruder", username(hub, "intruder"), None).return_code == 5  # type: ignore[union-attr]
    wait_for_log(hub, "client_id='intruder'")
    assert "reason=unknown device" in hub.log_text()


def test_plaintext_on_tls_port_is_logged(hub: HubProcess, device: tuple[str, str]) -> None:
    import socket

    with socket.create_connection(("localhost", hub.port("mqtt_tls_port"))) as s:
        s.sendall(b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x3c\x00\x00")
        s.settimeout(5)
        s.recv(100)  # the hub answers with an alert or just closes
    wait_for_log(hub, "tls handshake failed")
    assert_still_serving(hub, device)
