"""Telemetry over real clients (our raw client, paho-mqtt, Debian's mosquitto_pub) and the
refusals of bad publishes: wrong topic, QoS 2, oversize, garbage bytes."""

from __future__ import annotations

import json
import ssl
import subprocess
import threading
from typing import Any

import paho.mqtt.client as paho
import pytest

from gateway.mqtt.packets import Connect, Puback, Publish, Subscribe, Will
from tests.e2e.test_01_connect import assert_still_serving, tls, wait_for_log
from tests.hubproc import HubProcess, create_device, device_token, username


@pytest.fixture
def device(hub: HubProcess) -> tuple[str, str]:
    info = create_device(hub, "dev1")
    return "dev1", info["authentication"]["symmetricKey"]["primaryKey"]


def monitor(hub: HubProcess, device_id: str, *extra: str) -> list[dict[str, Any]]:
    out = hub.cli("monitor-events", "--device", device_id, "--from-beginning", "--timeout", "1.5",
                  "--json", *extra).stdout
    return [json.loads(line)["event"] for line in out.splitlines() if line.strip()]


def connected(hub: HubProcess, device: tuple[str, str]):  # type: ignore[no-untyped-def]
    c = tls(hub)
    assert c.connect(device[0], username(hub, device[0]), device_token(hub, *device)).return_code == 0  # type: ignore[union-attr]
    return c


def test_property_bag_and_stamped_properties(hub: HubProcess, device: tuple[str, str]) -> None:
    c = connected(hub, device)
    topic = ("devices/dev1/messages/events/%24.mid=42&%24.ct=application%2Fjson&%24.ce=utf-8"
             "&alert=high&plus=a%2Bb%20c&empty=&novalue&%24.cdid=spoof&%24.to=%2Fx")
    c.send(Publish(topic=topic, payload=b'{"t": 21.5}', qos=1, packet_id=1))
    assert c.recv() == Puback(1)
    [event] = monitor(hub, "dev1")
    system, app = event["properties"]["system"], event["properties"]["application"]
    assert system["message_id"] == "42"
    assert system["content_type"] == "application/json"
    assert event["annotations"]["iothub-connection-device-id"] == "dev1"
    assert "to" not in system
    assert app["alert"] == "high" and app["plus"] == "a+b c" and app["empty"] == ""
    assert "novalue" in app and app["novalue"] is None
    assert event["payload"] == {"t": 21.5}


@pytest.mark.parametrize("topic", [
    "devices/dev1/messages/events", "devices/dev1/messages/events/",
    "devices/dev1/messages/events/?a=1", "devices/dev1/messages/events/a=1/",
])
def test_topic_variants_edgehub_accepts(hub: HubProcess, device: tuple[str, str], topic: str) -> None:
    c = connected(hub, device)
    c.send(Publish(topic=topic, payload=b"1", qos=1, packet_id=9))
    assert c.recv() == Puback(9)


def test_retain_becomes_property(hub: HubProcess, device: tuple[str, str]) -> None:
    c = connected(hub, device)
    c.send(Publish(topic="devices/dev1/messages/events/", payload=b"r", qos=1, packet_id=2, retain=True))
    assert c.recv() == Puback(2)
    [event] = monitor(hub, "dev1")
    assert event["properties"]["application"]["mqtt-retain"] == "true"


def test_will_is_sent_as_telemetry_when_the_link_drops(hub: HubProcess, device: tuple[str, str]) -> None:
    c = tls(hub)
    c.send(Connect(client_id="dev1", clean_session=False, keepalive=60,
                   username=username(hub, "dev1"), password=device_token(hub, *device).encode(),
                   will=Will(topic="devices/dev1/messages/events/", payload=b"gone", qos=1, retain=False)))
    assert c.recv().return_code == 0  # type: ignore[union-attr]
    c.sock.close()  # no DISCONNECT
    wait_for_log(hub, "disconnected client_id='dev1'")
    events = monitor(hub, "dev1")
    assert events[-1]["payload"] == "gone"
    assert events[-1]["properties"]["application"]["iothub-MessageType"] == "Will"


@pytest.mark.parametrize("case,reason", [
    ("foreign-topic", "not allowed"),
    ("unknown-topic", "not allowed"),
    ("qos2", "QoS 2"),
    ("oversize", "over the"),
    ("bad-subscribe", "not allowed"),
])
def test_bad_publish_closes_connection(hub: HubProcess, device: tuple[str, str], case: str,
                                       reason: str) -> None:
    c = connected(hub, device)
    if case == "foreign-topic":
        c.send(Publish(topic="devices/other/messages/events/", payload=b"x", qos=1, packet_id=1))
    elif case == "unknown-topic":
        c.send(Publish(topic="some/random/topic", payload=b"x", qos=1, packet_id=1))
    elif case == "qos2":
        c.send(Publish(topic="devices/dev1/messages/events/", payload=b"x", qos=2, packet_id=1))
    elif case == "oversize":
        c.send(Publish(topic="devices/dev1/messages/events/", payload=b"x" * 262_145, qos=1, packet_id=1))
    elif case == "bad-subscribe":
        c.send(Subscribe(packet_id=1, topics=(("#", 1),)))
    c.expect_closed()
    wait_for_log(hub, "closing connection client_id='dev1'")
    assert reason in hub.log_text().split("closing connection client_id='dev1'")[-1].splitlines()[0]
    assert monitor(hub, "dev1") == []
    assert_still_serving(hub, device)


def test_oversize_packet_refused_before_it_is_read(hub: HubProcess, device: tuple[str, str]) -> None:
    c = connected(hub, device)
    # Fixed header announcing 5 MB: refused from the header alone.
    c.send_raw(bytes([0x32, 0x80, 0x80, 0xC0, 0x02]))
    c.expect_closed()
    wait_for_log(hub, "too large")


def test_garbage_bytes_close_only_that_connection(hub: HubProcess, device: tuple[str, str]) -> None:
    c = tls(hub)
    c.send_raw(b"\xff\x00GARBAGE\x00\x01\x02" * 10)
    c.expect_closed()
    wait_for_log(hub, "protocol error")
    assert_still_serving(hub, device)


def publish_with_paho(hub: HubProcess, device: tuple[str, str], count: int, *, port: int,
                      timeout: float, websocket_path: str | None = None) -> None:
    """``count`` QoS 1 messages ``n=0..`` as ``dev1`` with paho 2 (over TLS, or secure
    WebSocket at ``websocket_path``); returns once every one is acknowledged."""
    done = threading.Event()
    acked: list[int] = []
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="dev1", clean_session=False,
                         protocol=paho.MQTTv311,
                         transport="websockets" if websocket_path else "tcp")
    if websocket_path:
        client.ws_set_options(path=websocket_path)
    client.username_pw_set(username(hub, "dev1"), device_token(hub, *device))
    client.tls_set(ca_certs=hub.ca_file, tls_version=ssl.PROTOCOL_TLS_CLIENT)

    def on_publish(c: Any, userdata: Any, mid: int, rc: Any, props: Any) -> None:
        acked.append(mid)
        if len(acked) == count:
            done.set()

    client.on_publish = on_publish
    client.connect("localhost", port)
    client.loop_start()
    try:
        for i in range(count):
            client.publish(f"devices/dev1/messages/events/n={i}", json.dumps({"i": i}), qos=1)
        assert done.wait(timeout)
    finally:
        client.disconnect()
        client.loop_stop()


def test_paho_publishes_qos1(hub: HubProcess, device: tuple[str, str]) -> None:
    publish_with_paho(hub, device, 50, port=hub.port("mqtt_tls_port"), timeout=15)
    events = monitor(hub, "dev1")
    assert [e["properties"]["application"]["n"] for e in events] == [str(i) for i in range(50)]


def test_mosquitto_pub(hub: HubProcess, device: tuple[str, str]) -> None:
    subprocess.run(
        ["mosquitto_pub", "-h", "localhost", "-p", str(hub.port("mqtt_tls_port")),
         "--cafile", hub.ca_file, "--tls-version", "tlsv1.2", "-V", "mqttv311",
         "-i", "dev1", "-u", username(hub, "dev1"), "-P", device_token(hub, *device),
         "-q", "1", "-t", "devices/dev1/messages/events/source=mosquitto", "-m", '{"hello": 1}'],
        check=True, timeout=20,
    )
    [event] = monitor(hub, "dev1")
    assert event["payload"] == {"hello": 1}
    assert event["properties"]["application"] == {"source": "mosquitto"}


def test_lifecycle_and_connection_state_events(hub: HubProcess, device: tuple[str, str]) -> None:
    c = connected(hub, device)
    c.close()
    wait_for_log(hub, "disconnected client_id='dev1'")
    out = hub.cli("monitor-events", "--device", "dev1", "--from-beginning", "--timeout", "1.5",
                  "--json", "--all-kinds").stdout
    events = [json.loads(line)["event"] for line in out.splitlines() if line.strip()]
    ops = [e["properties"]["application"]["opType"] for e in events]
    assert ops == ["createDeviceIdentity", "deviceConnected", "deviceDisconnected"]
    created, up, down = events
    assert created["annotations"]["iothub-message-source"] == "deviceLifecycleEvents"
    assert created["payload"]["deviceId"] == "dev1" and "properties" in created["payload"]
    assert up["annotations"]["iothub-message-source"] == "deviceConnectionStateEvents"
    first, second = up["payload"]["sequenceNumber"], down["payload"]["sequenceNumber"]
    assert len(first) == 64 and first < second  # string order is time order (ref §10.5)
