"""The parent side of on-behalf-of (gateway/hub/onbehalf.py): an edge device registers its
origins, sends their telemetry over its own connection, the parent stamps the origin and the
gateway path, and drops resends at or below the durable high-water mark, also across a
SIGKILL of the parent."""

from __future__ import annotations

import json

import pytest

from gateway.hub.onbehalf import register_topic
from gateway.mqtt.packets import Connack, Puback, Publish
from tests.hubproc import HubProcess, create_device, device_token, username
from tests.mqttraw import Closed, RawClient


def _gateway(hub: HubProcess, device_id: str = "gw1") -> RawClient:
    key = create_device(hub, device_id, "--edge")["authentication"]["symmetricKey"]["primaryKey"]
    return _connect(hub, device_id, key)


def _connect(hub: HubProcess, device_id: str, key: str) -> RawClient:
    client = RawClient(hub.port("mqtt_local_port"), host="127.0.0.1")
    ack = client.connect(device_id, username(hub, device_id), device_token(hub, device_id, key),
                         clean=True)
    assert isinstance(ack, Connack) and ack.return_code == 0
    return client


def _send(client: RawClient, pid: int, topic: str, body: bytes = b"{}") -> None:
    client.send(Publish(topic=topic, payload=body, qos=1, packet_id=pid))
    ack = client.recv()
    assert isinstance(ack, Puback) and ack.packet_id == pid


def _events(hub: HubProcess) -> list[dict]:  # type: ignore[type-arg]
    out = hub.cli("monitor-events", "--from-beginning", "--timeout", "2", "--json").stdout
    return [json.loads(line)["event"] for line in out.splitlines() if line.strip()]


def test_origin_stamped_registered_and_resends_dropped(tmp_path) -> None:  # type: ignore[no-untyped-def]
    hub = HubProcess(tmp_path / "parent", log_level="info").start()
    try:
        client = _gateway(hub)
        _send(client, 1, register_topic("leaf-1", None))
        _send(client, 2, register_topic("gw1", "modbus"))
        leaf = json.loads(hub.cli("device", "show", "leaf-1").stdout)
        gw = json.loads(hub.cli("device", "show", "gw1").stdout)
        assert leaf["parentScopes"] == [gw["deviceScope"]]
        assert leaf["authentication"]["type"] == "none"
        for pid, seq in ((3, 10), (4, 12), (5, 12), (6, 11), (7, 13)):  # 12 twice, 11 late
            _send(client, pid, f"devices/leaf-1/messages/events/%24.gwe=E1&%24.gws={seq}&a=1",
                  json.dumps({"n": seq}).encode())
        _send(client, 8, "devices/gw1/modules/modbus/messages/events/%24.gwe=E1&%24.gws=5&%24.gwp=gw0")
        client.sock.close()
        hub.kill()
        hub.start()
        client = _connect(hub, "gw1", gw["authentication"]["symmetricKey"]["primaryKey"])
        _send(client, 1, "devices/leaf-1/messages/events/%24.gwe=E1&%24.gws=13", b'{"n": 13}')
        _send(client, 2, "devices/leaf-1/messages/events/%24.gwe=E1&%24.gws=14", b'{"n": 14}')
        # a new epoch (the child's store was recreated) starts afresh
        _send(client, 3, "devices/leaf-1/messages/events/%24.gwe=E2&%24.gws=1", b'{"n": 1}')
        telemetry = [e for e in _events(hub) if e["annotations"].get("iothub-message-source") == "Telemetry"]
        leaf_msgs = [e for e in telemetry if e["origin"] == "leaf-1"]
        assert [e["payload"]["n"] for e in leaf_msgs] == [10, 12, 13, 14, 1]
        first = leaf_msgs[0]
        assert first["annotations"]["iothub-connection-device-id"] == "leaf-1"
        assert first["annotations"]["iothub-gateway-path"] == "gw1"
        assert first["properties"]["application"] == {"a": "1"}
        module = [e for e in telemetry if e["module"] == "modbus"]
        assert len(module) == 1
        assert module[0]["annotations"]["iothub-connection-module-id"] == "modbus"
        assert module[0]["annotations"]["iothub-gateway-path"] == "gw0;gw1"
    finally:
        hub.stop()


@pytest.mark.parametrize("case", ["not-edge", "out-of-scope", "unregistered"])
def test_on_behalf_refused(tmp_path, case: str) -> None:  # type: ignore[no-untyped-def]
    hub = HubProcess(tmp_path / "parent", log_level="info").start()
    try:
        flags = () if case == "not-edge" else ("--edge",)
        key = create_device(hub, "gw1", *flags)["authentication"]["symmetricKey"]["primaryKey"]
        create_device(hub, "other")
        client = _connect(hub, "gw1", key)
        target = {"not-edge": "leaf", "out-of-scope": "other", "unregistered": "nobody"}[case]
        topic = (register_topic(target, None) if case != "unregistered"
                 else f"devices/{target}/messages/events/")
        client.send(Publish(topic=topic, payload=b"{}", qos=1, packet_id=1))
        with pytest.raises(Closed):
            client.recv(timeout=5)
        # a plain device gets IoT Hub's usual refusal; a gateway is told why
        assert ("topic not allowed" if case == "not-edge" else "may not act for") in hub.log_text()
    finally:
        hub.stop()


def test_stamped_messages_are_routed_by_their_own_body_and_message_id(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Stamped messages of one topic share a compiled split while no condition reads the
    message id (the only property that differs between them), and each is still routed by its
    own body; once a condition reads the message id, by that too (IoT Hub ref §10.2)."""
    routes = ('[routing]\nfallback = false\n[routes]\nhot = { source = "DeviceMessages", '
              'condition = "$body.n > 11", endpoint = "events" }\n')
    hub = HubProcess(tmp_path / "parent", log_level="info", extra_config=routes).start()
    try:
        client = _gateway(hub)
        _send(client, 1, register_topic("leaf-1", None))
        topic = ("devices/leaf-1/messages/events/%24.gwe=E1&%24.gws={seq}&%24.mid={mid}"
                 "&%24.ct=application%2Fjson&%24.ce=utf-8&a=1")
        for pid, n in ((2, 10), (3, 12), (4, 11), (5, 13)):
            _send(client, pid, topic.format(seq=n, mid=f"m{n}"), json.dumps({"n": n}).encode())
        hub.cli("route", "create", "byid", "--endpoint", "events", "--condition",
                "$messageId = 'm20'")
        for pid, n in ((6, 20), (7, 1), (8, 21)):
            _send(client, pid, topic.format(seq=n, mid=f"m{n}"), json.dumps({"n": n}).encode())
        leaf = [e for e in _events(hub) if e.get("origin") == "leaf-1"]
        assert [e["payload"]["n"] for e in leaf] == [12, 13, 20, 21]
        ids = [e["properties"]["system"]["message_id"] for e in leaf]
        assert ids == ["m12", "m13", "m20", "m21"]
    finally:
        hub.stop()
