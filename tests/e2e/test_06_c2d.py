"""Cloud-to-device messages: durable queue, delivery over MQTT, PUBACK completion, feedback,
limits, expiry, restart."""

from __future__ import annotations

import json
import time
import urllib.parse

import pytest

from gateway.hubclient import ApiError, HubClient
from gateway.mqtt.packets import Puback, Publish, Suback, Subscribe
from tests.e2e.test_01_connect import tls
from tests.hubproc import HubProcess, create_device, device_token, username
from tests.mqttraw import RawClient

C2D = "devices/dev1/messages/devicebound/#"


@pytest.fixture
def device(hub: HubProcess) -> tuple[str, str]:
    info = create_device(hub, "dev1")
    return "dev1", info["authentication"]["symmetricKey"]["primaryKey"]


def connect(hub: HubProcess, device: tuple[str, str], subscribe: bool = True) -> RawClient:
    c = tls(hub)
    assert c.connect(device[0], username(hub, device[0]), device_token(hub, *device)).return_code == 0  # type: ignore[union-attr]
    if subscribe:
        c.send(Subscribe(packet_id=1, topics=((C2D, 1),)))
        assert c.recv() == Suback(1, (1,))
    return c


def bag(topic: str) -> dict[str, str]:
    raw = topic.split("/", 4)[4]
    return {urllib.parse.unquote(k): urllib.parse.unquote(v)
            for k, _, v in (p.partition("=") for p in raw.split("&") if p)}


def test_send_deliver_complete_with_feedback(hub: HubProcess, device: tuple[str, str]) -> None:
    hub.cli("c2d", "send", "dev1", "--body", "open valve", "--prop", "valve=3",
            "--message-id", "m-1", "--correlation-id", "c-1", "--ack", "full")
    assert HubClient(hub.data_dir).request("GET", "/devices/dev1")["cloudToDeviceMessageCount"] == 1
    c = connect(hub, device)
    msg = c.recv()
    assert isinstance(msg, Publish) and msg.qos == 1
    assert msg.topic.startswith("devices/dev1/messages/devicebound/%24.mid=m-1")
    props = bag(msg.topic)
    assert props["$.mid"] == "m-1" and props["$.cid"] == "c-1" and props["valve"] == "3"
    assert props["$.to"] == "/devices/dev1/messages/devicebound" and props["iothub-ack"] == "full"
    assert msg.payload == b"open valve"
    c.send(Puback(msg.packet_id))  # type: ignore[arg-type]
    out = hub.cli("c2d", "feedback", "--wait", "5").stdout
    [record] = [json.loads(line) for line in out.splitlines() if line.strip()]
    assert record["originalMessageId"] == "m-1" and record["statusCode"] == "Success"
    assert record["deviceId"] == "dev1"
    c.close()
    again = connect(hub, device)  # completed: never delivered again
    with pytest.raises(TimeoutError):
        again.recv(timeout=1.5)


def test_unacknowledged_message_is_redelivered_on_reconnect(hub: HubProcess, device: tuple[str, str]) -> None:
    hub.cli("c2d", "send", "dev1", "--body", "x", "--message-id", "r-1")
    c = connect(hub, device)
    first = c.recv()
    assert isinstance(first, Publish)
    c.sock.close()  # no PUBACK
    c = connect(hub, device, subscribe=False)  # the subscription is in the session
    again = c.recv()
    assert isinstance(again, Publish) and bag(again.topic)["$.mid"] == "r-1"


def test_a_takeover_gets_the_old_connections_unacknowledged_messages_at_once(
        hub: HubProcess, device: tuple[str, str]) -> None:
    """A second connection with the same client id replaces the first while a message is in
    flight to it: the new one gets it now, not after the 60 s lock has lapsed."""
    hub.cli("c2d", "send", "dev1", "--body", "x", "--message-id", "t-1")
    old = connect(hub, device)
    first = old.recv()
    assert isinstance(first, Publish)  # no PUBACK
    new = connect(hub, device, subscribe=False)  # takes the session over
    again = new.recv(timeout=5)
    assert isinstance(again, Publish) and bag(again.topic)["$.mid"] == "t-1"
    new.send(Puback(again.packet_id))  # type: ignore[arg-type]
    old.close()
    new.close()


def test_queue_depth_limit_is_50(hub: HubProcess, device: tuple[str, str]) -> None:
    api = HubClient(hub.data_dir)
    for i in range(50):
        api.request("POST", "/devices/dev1/messages/deviceBound", {"body": str(i)})
    with pytest.raises(ApiError) as err:
        api.request("POST", "/devices/dev1/messages/deviceBound", {"body": "51"})
    assert err.value.status == 403
    assert "DeviceMaximumQueueDepthExceeded" in str(err.value) or "queue" in str(err.value).lower()
    assert api.request("DELETE", "/devices/dev1/commands")["totalMessagesPurged"] == 50


def test_expired_message_is_not_delivered_and_gets_feedback(hub: HubProcess, device: tuple[str, str]) -> None:
    api = HubClient(hub.data_dir)
    expiry = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 2))
    api.request("POST", "/devices/dev1/messages/deviceBound",
                {"body": "late", "properties": {"messageId": "e-1", "expiryTimeUtc": expiry,
                                                "ack": "negative"}})
    time.sleep(3.5)
    c = connect(hub, device)
    with pytest.raises(TimeoutError):
        c.recv(timeout=1.5)
    out = hub.cli("c2d", "feedback", "--wait", "5").stdout
    [record] = [json.loads(line) for line in out.splitlines() if line.strip()]
    assert record["statusCode"] == "Expired" and record["originalMessageId"] == "e-1"


def test_queue_survives_restart_and_oversize_is_refused(hub: HubProcess, device: tuple[str, str]) -> None:
    hub.cli("c2d", "send", "dev1", "--body", "kept", "--message-id", "k-1")
    with pytest.raises(ApiError) as err:
        HubClient(hub.data_dir).request("POST", "/devices/dev1/messages/deviceBound",
                                        {"body": "x" * 70000})
    assert err.value.status in (400, 413)
    hub.stop()
    hub.start()
    c = connect(hub, device)
    msg = c.recv()
    assert isinstance(msg, Publish) and msg.payload == b"kept"
