"""Reported patches and C2D outcomes made while the leaf's link is down go up in batches when
it returns (many in flight at once, acknowledged together), still coalesced per key: forty
devices at the leaf each report twice and complete a C2D message during an outage; once the
links are back the top holds every device's merged report and none of the messages, and the
leaf's log shows them sent as batches, not one at a time."""

from __future__ import annotations

import json
import re

from gateway.hubclient import ApiError, HubClient
from gateway.mqtt.packets import Connack, Puback, Publish, Suback, Subscribe
from tests.federation.hierarchy import LEAF, Hierarchy, status, wait
from tests.hubproc import device_token, username
from tests.mqttraw import RawClient

N = 40


def _raw(h: Hierarchy, device_id: str, key: str) -> RawClient:
    client = RawClient(h.leaf.port("mqtt_local_port"), host=LEAF)
    ack = client.connect(device_id, username(h.leaf, device_id),
                         device_token(h.leaf, device_id, key), clean=True)
    assert isinstance(ack, Connack) and ack.return_code == 0
    client.send(Subscribe(1, (("$iothub/twin/res/#", 0),
                              (f"devices/{device_id}/messages/devicebound/#", 1))))
    assert isinstance(client.recv(), Suback)
    return client


def _report_and_complete(client: RawClient, device_id: str, index: int) -> None:
    """Two reported patches (answered 204) and the device's C2D message, PUBACKed."""
    for rid, patch in ((1, {"a": index, "b": {"x": 1, "y": 1}}), (2, {"b": {"y": 2}})):
        client.send(Publish(topic=f"$iothub/twin/PATCH/properties/reported/?$rid={rid}",
                            payload=json.dumps(patch).encode(), qos=0))
    answers, message = 0, None
    while answers < 2 or message is None:
        packet = client.recv()
        assert isinstance(packet, Publish), packet
        if packet.topic.startswith("$iothub/twin/res/"):
            assert packet.topic.startswith("$iothub/twin/res/204/"), packet.topic
            answers += 1
        else:
            assert packet.topic.startswith(f"devices/{device_id}/messages/devicebound/")
            message = packet
    assert message.payload == f"m{index}".encode() and message.packet_id is not None
    client.send(Puback(message.packet_id))


def _batches(log: str, what: str) -> list[int]:
    return [int(n) for n in re.findall(rf"{what} up batch=(\d+) acked=\1", log)]


def test_outage_backlog_goes_up_in_batches(hierarchy: Hierarchy) -> None:
    h = hierarchy
    top, leaf = HubClient(h.top.data_dir), HubClient(h.leaf.data_dir)
    scope = top.request("GET", "/devices/leaf")["deviceScope"]
    keys = {}
    for i in range(N):
        device = top.request("PUT", f"/devices/b{i}", {"deviceId": f"b{i}",
                                                        "parentScopes": [scope]})
        keys[f"b{i}"] = device["authentication"]["symmetricKey"]["primaryKey"]
        top.request("POST", f"/devices/b{i}/messages/deviceBound",
                    {"body": f"m{i}", "properties": {"messageId": f"m{i}"}})

    def pending(api: HubClient, i: int) -> int | None:
        try:
            return int(api.request("GET", f"/devices/b{i}")["cloudToDeviceMessageCount"])
        except ApiError:
            return None

    wait(lambda: all(pending(leaf, i) == 1 for i in range(N)), 30,
         "the messages in the leaf's queue")
    h.site.stop()  # the leaf's link is down: everything below waits at the leaf
    clients = []
    try:
        for i in range(N):
            client = _raw(h, f"b{i}", keys[f"b{i}"])
            clients.append(client)
            _report_and_complete(client, f"b{i}", i)  # the reports coalesced at the leaf
        h.site.start()
        for hub in (h.site, h.leaf):
            wait(lambda hub=hub: status(hub)["state"] == "connected", 30, "links back")

        def arrived() -> bool:
            for i in range(N):
                twin = top.request("GET", f"/twins/b{i}")
                reported = {k: v for k, v in twin["properties"]["reported"].items()
                            if not k.startswith("$")}
                if reported != {"a": i, "b": {"x": 1, "y": 2}}:
                    return False
            return True

        wait(arrived, 30, "every merged report at the top", interval=1.0)
        wait(lambda: all(pending(top, i) == 0 for i in range(N)), 30,
             "every message completed at the top")
        log = h.leaf.log_text()
        reported, outcomes = _batches(log, "reported patches"), _batches(log, "c2d outcomes")
        assert max(reported) > 1 and sum(reported) >= N, reported
        assert max(outcomes) > 1 and sum(outcomes) >= N, outcomes
        assert len(reported) < N and len(outcomes) < N  # batches, not one at a time
    finally:
        for client in clients:
            client.sock.close()
