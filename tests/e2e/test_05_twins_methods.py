"""Twins and direct methods over MQTT (our raw client) and the service REST API."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import pytest

from gateway.hubclient import ApiError, HubClient
from gateway.mqtt.packets import Puback, Publish, Suback, Subscribe
from tests.e2e.test_01_connect import tls
from tests.hubproc import HubProcess, create_device, device_token, username
from tests.mqttraw import RawClient


@pytest.fixture
def device(hub: HubProcess) -> tuple[str, str]:
    info = create_device(hub, "dev1")
    return "dev1", info["authentication"]["symmetricKey"]["primaryKey"]


def connect(hub: HubProcess, device: tuple[str, str], *filters: str) -> RawClient:
    c = tls(hub)
    assert c.connect(device[0], username(hub, device[0]), device_token(hub, *device)).return_code == 0  # type: ignore[union-attr]
    if filters:
        c.send(Subscribe(packet_id=1, topics=tuple((f, 1) for f in filters)))
        assert c.recv() == Suback(1, tuple(1 for _ in filters))
    return c


def test_twin_get_and_reported_patch(hub: HubProcess, device: tuple[str, str]) -> None:
    c = connect(hub, device, "$iothub/twin/res/#")
    c.send(Publish(topic="$iothub/twin/GET/?$rid=1", payload=b" ", qos=1, packet_id=2))
    packets = [c.recv(), c.recv()]
    response = next(p for p in packets if isinstance(p, Publish))
    assert Puback(2) in packets
    assert response.topic == "$iothub/twin/res/200/?$rid=1"
    doc = json.loads(response.payload)
    assert doc["desired"]["$version"] == 1 and doc["reported"]["$version"] == 1
    c.send(Publish(topic="$iothub/twin/PATCH/properties/reported/?$rid=2",
                   payload=json.dumps({"firmware": "1.2", "battery": 87}).encode(), qos=1, packet_id=3))
    packets = [c.recv(), c.recv()]
    response = next(p for p in packets if isinstance(p, Publish))
    assert response.topic == "$iothub/twin/res/204/?$rid=2&$version=2"
    twin = HubClient(hub.data_dir).request("GET", "/twins/dev1")
    assert twin["properties"]["reported"]["firmware"] == "1.2"
    assert twin["properties"]["reported"]["$version"] == 2
    assert "$lastUpdated" in twin["properties"]["reported"]["$metadata"]["battery"]


def test_malformed_reported_patch_gets_400(hub: HubProcess, device: tuple[str, str]) -> None:
    c = connect(hub, device, "$iothub/twin/res/#")
    c.send(Publish(topic="$iothub/twin/PATCH/properties/reported/?$rid=9", payload=b"{not json",
                   qos=1, packet_id=4))
    packets = [c.recv(), c.recv()]
    response = next(p for p in packets if isinstance(p, Publish))
    assert response.topic.startswith("$iothub/twin/res/400/?$rid=9")
    big = {"k": "x" * 4000, **{f"k{i}": "y" * 4000 for i in range(9)}}  # > 32 KB reported
    c.send(Publish(topic="$iothub/twin/PATCH/properties/reported/?$rid=10",
                   payload=json.dumps(big).encode(), qos=1, packet_id=5))
    packets = [c.recv(), c.recv()]
    response = next(p for p in packets if isinstance(p, Publish))
    assert response.topic.startswith("$iothub/twin/res/400/?$rid=10")
    # the connection is still usable
    c.send(Publish(topic="$iothub/twin/GET/?$rid=11", payload=b"", qos=0))
    assert c.recv().topic == "$iothub/twin/res/200/?$rid=11"  # type: ignore[union-attr]


def test_desired_patch_is_pushed_and_survives_restart(hub: HubProcess, device: tuple[str, str]) -> None:
    c = connect(hub, device, "$iothub/twin/PATCH/properties/desired/#")
    api = HubClient(hub.data_dir)
    twin = api.request("PATCH", "/twins/dev1", {"properties": {"desired": {"interval": 30}},
                                                 "tags": {"site": "plant-7"}},
                       headers={"If-Match": "*"})
    assert twin["properties"]["desired"]["interval"] == 30
    push = c.recv()
    assert isinstance(push, Publish)
    assert push.topic == "$iothub/twin/PATCH/properties/desired/?$version=2"
    assert json.loads(push.payload) == {"interval": 30, "$version": 2}
    with pytest.raises(ApiError) as err:
        api.request("PATCH", "/twins/dev1", {"tags": {"x": 1}}, headers={"If-Match": '"stale"'})
    assert err.value.status == 412
    hub.stop()
    hub.start()
    again = HubClient(hub.data_dir).request("GET", "/twins/dev1")
    assert again["tags"] == {"site": "plant-7"}
    assert again["properties"]["desired"]["interval"] == 30


def test_direct_method_round_trip_and_errors(hub: HubProcess, device: tuple[str, str]) -> None:
    api = HubClient(hub.data_dir)
    with pytest.raises(ApiError) as err:
        api.request("POST", "/twins/dev1/methods", {"methodName": "reboot", "payload": {}})
    assert err.value.status == 404  # not connected
    c = connect(hub, device, "$iothub/methods/POST/#")
    result: dict[str, Any] = {}

    def call() -> None:
        result["r"] = api.request("POST", "/twins/dev1/methods",
                                  {"methodName": "reboot", "payload": {"delay": 5},
                                   "responseTimeoutInSeconds": 10})

    t = threading.Thread(target=call)
    t.start()
    request = c.recv()
    assert isinstance(request, Publish) and request.topic.startswith("$iothub/methods/POST/reboot/?$rid=")
    assert json.loads(request.payload) == {"delay": 5}
    rid = request.topic.split("$rid=")[1]
    c.send(Publish(topic=f"$iothub/methods/res/200/?$rid={rid}", payload=b'{"ok": true}', qos=0))
    t.join(10)
    assert result["r"] == {"status": 200, "payload": {"ok": True}}
    started = time.monotonic()
    with pytest.raises(ApiError) as err:
        api.request("POST", "/twins/dev1/methods",
                    {"methodName": "slow", "payload": None, "responseTimeoutInSeconds": 5})
    assert err.value.status == 504
    assert time.monotonic() - started >= 4.9
