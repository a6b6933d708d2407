"""The unmodified azure-iot-device SDK with ``websockets=True`` (IoT Hub ref §15.2 (E)): MQTT
over ``wss://localhost:443/$iothub/websocket``, sub-protocol ``mqtt``. Twins, direct methods,
telemetry and C2D must behave exactly as over port 8883."""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.hubclient import HubClient
from tests.hubproc import HubProcess
from tests.interop.conftest import DeviceSession, service
from tests.interop.test_azure_device_sdk import monitor

pytestmark = pytest.mark.interop


@pytest.fixture
def device_id(iot_hub: HubProcess) -> str:
    device_id = f"ws-{uuid.uuid4().hex[:8]}"
    iot_hub.cli("device", "create", device_id)
    return device_id


@pytest.fixture
def session(iot_hub: HubProcess, azure_python: Path, device_id: str) -> Iterator[DeviceSession]:
    cs = iot_hub.connection_string(device_id, gateway_host="localhost")
    s = DeviceSession(azure_python, cs, iot_hub.ca_file, websockets=True)
    yield s
    s.close()


def assert_over_websocket(hub: HubProcess, device_id: str) -> None:
    """The hub logged this device's CONNECT on the WebSocket listener, never on TLS 8883."""
    deadline = time.monotonic() + 5
    pattern = re.compile(rf"connected client_id='{device_id}' .* listener=(\w+)")
    while time.monotonic() < deadline:
        listeners = pattern.findall(hub.log_text())
        if listeners:
            assert set(listeners) == {"websocket"}, listeners
            return
        time.sleep(0.05)
    raise AssertionError(f"no connection of {device_id} in the hub log")


def test_twin_reported_and_desired_over_websockets(
    iot_hub: HubProcess, azure_python: Path, device_id: str, session: DeviceSession
) -> None:
    session.send(cmd="report", patch={"transport": "wss"})
    session.expect("reported_ok")
    session.send(cmd="get_twin")
    twin = session.expect("twin")["twin"]
    assert twin["reported"]["transport"] == "wss" and twin["reported"]["$version"] == 2
    service(azure_python, iot_hub, {"op": "update_twin", "device": device_id,
                                    "patch": {"desired": {"interval": 30}}})
    desired = session.expect("desired")["desired"]
    assert desired["interval"] == 30 and desired["$version"] == 2
    assert_over_websocket(iot_hub, device_id)


def test_direct_method_over_websockets(
    iot_hub: HubProcess, azure_python: Path, device_id: str, session: DeviceSession
) -> None:
    [result] = service(azure_python, iot_hub, {"op": "invoke", "device": device_id,
                                               "method": "reboot", "payload": {"in": 2},
                                               "timeout": 20})
    assert result == {"status": 200, "payload": {"echo": {"in": 2}, "method": "reboot"}}
    assert session.expect("method")["payload"] == {"in": 2}
    assert_over_websocket(iot_hub, device_id)


def test_telemetry_over_websockets(iot_hub: HubProcess, device_id: str,
                                   session: DeviceSession) -> None:
    for i in range(20):
        session.send(cmd="send", body=json.dumps({"seq": i}))
        session.expect("sent")
    events = monitor(iot_hub, device_id)
    assert [e["event"]["payload"] for e in events] == [{"seq": i} for i in range(20)]
    assert events[0]["event"]["annotations"]["iothub-connection-device-id"] == device_id
    assert_over_websocket(iot_hub, device_id)


def test_c2d_over_websockets(iot_hub: HubProcess, device_id: str,
                             session: DeviceSession) -> None:
    HubClient(iot_hub.data_dir).request(
        "POST", f"/devices/{device_id}/messages/deviceBound",
        {"body": "switch on", "properties": {"messageId": "c2d-1", "correlationId": "k-1",
                                             "contentType": "text/plain", "room": "b 2"}})
    c2d = session.expect("c2d")["c2d"]
    assert c2d["body"] == "switch on"
    assert c2d["message_id"] == "c2d-1" and c2d["correlation_id"] == "k-1"
    assert c2d["content_type"] == "text/plain"
    assert c2d["props"] == {"room": "b 2"}
    # The SDK's PUBACK completed it: the queue is empty.
    deadline = time.monotonic() + 5
    while HubClient(iot_hub.data_dir).request("GET", f"/devices/{device_id}")[
            "cloudToDeviceMessageCount"]:
        assert time.monotonic() < deadline, "the C2D message was not completed"
        time.sleep(0.1)
    assert_over_websocket(iot_hub, device_id)
