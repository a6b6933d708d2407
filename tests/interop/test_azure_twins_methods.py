"""Twins and direct methods between the unmodified azure-iot-device SDK (device and module
clients) and the unmodified azure-iot-hub registry manager, through our hub."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.hubproc import HubProcess
from tests.interop.conftest import DeviceSession, service

pytestmark = pytest.mark.interop


@pytest.fixture
def device_id(iot_hub: HubProcess) -> str:
    device_id = f"tw-{uuid.uuid4().hex[:8]}"
    iot_hub.cli("device", "create", device_id)
    return device_id


@pytest.fixture
def session(iot_hub: HubProcess, azure_python: Path, device_id: str) -> Iterator[DeviceSession]:
    cs = iot_hub.connection_string(device_id, gateway_host="localhost")
    s = DeviceSession(azure_python, cs, iot_hub.ca_file)
    yield s
    s.close()


def test_twin_reported_get_and_desired_from_registry_manager(
    iot_hub: HubProcess, azure_python: Path, device_id: str, session: DeviceSession
) -> None:
    session.send(cmd="report", patch={"firmware": "2.1", "battery": {"level": 80}})
    session.expect("reported_ok")
    session.send(cmd="get_twin")
    twin = session.expect("twin")["twin"]
    assert twin["reported"]["firmware"] == "2.1" and twin["reported"]["$version"] == 2
    [result] = service(azure_python, iot_hub, {"op": "update_twin", "device": device_id,
                                               "patch": {"desired": {"interval": 15},
                                                         "tags": {"site": "plant-7"}}})
    assert "error" not in result, result
    assert result["desired"]["interval"] == 15
    desired = session.expect("desired")["desired"]
    assert desired["interval"] == 15 and desired["$version"] == 2
    [seen] = service(azure_python, iot_hub, {"op": "get_twin", "device": device_id})
    assert seen["reported"]["battery"] == {"level": 80}
    assert seen["tags"] == {"site": "plant-7"}


def test_direct_method_from_registry_manager(
    iot_hub: HubProcess, azure_python: Path, device_id: str, session: DeviceSession
) -> None:
    [result] = service(azure_python, iot_hub, {"op": "invoke", "device": device_id,
                                               "method": "reboot", "payload": {"delay": 3},
                                               "timeout": 20})
    assert result == {"status": 200, "payload": {"echo": {"delay": 3}, "method": "reboot"}}
    assert session.expect("method")["payload"] == {"delay": 3}


def test_method_to_offline_device_is_404(iot_hub: HubProcess, azure_python: Path,
                                         device_id: str) -> None:
    [result] = service(azure_python, iot_hub, {"op": "invoke", "device": device_id,
                                               "method": "reboot", "payload": None, "timeout": 5})
    assert result["status"] == 404, result


def test_reconnect_keeps_subscriptions_for_desired_and_methods(
    iot_hub: HubProcess, azure_python: Path, device_id: str, session: DeviceSession
) -> None:
    # The SDK subscribes once and never again after a reconnect (ref §1.6); the hub keeps them.
    session.send(cmd="disconnect")
    session.expect("disconnected")
    session.send(cmd="connect")
    session.expect("connected")
    service(azure_python, iot_hub, {"op": "update_twin", "device": device_id,
                                    "patch": {"desired": {"mode": "eco"}}})
    assert session.expect("desired")["desired"]["mode"] == "eco"
    [result] = service(azure_python, iot_hub, {"op": "invoke", "device": device_id,
                                               "method": "ping", "payload": 1, "timeout": 20})
    assert result["status"] == 200


def test_module_twin_and_method(iot_hub: HubProcess, azure_python: Path, device_id: str) -> None:
    iot_hub.cli("module", "create", device_id, "sensor")
    cs = iot_hub.connection_string(device_id, "sensor", gateway_host="localhost")
    s = DeviceSession(azure_python, cs, iot_hub.ca_file, module=True)
    try:
        s.send(cmd="report", patch={"state": "running"})
        s.expect("reported_ok")
        service(azure_python, iot_hub, {"op": "update_twin", "device": device_id,
                                        "module": "sensor", "patch": {"desired": {"rate": 2}}})
        assert s.expect("desired")["desired"]["rate"] == 2
        [result] = service(azure_python, iot_hub, {"op": "invoke", "device": device_id,
                                                   "module": "sensor", "method": "calibrate",
                                                   "payload": {"offset": 0.5}, "timeout": 20})
        assert result["status"] == 200 and result["payload"]["method"] == "calibrate"
        [twin] = service(azure_python, iot_hub, {"op": "get_twin", "device": device_id,
                                                 "module": "sensor"})
        assert twin["reported"]["state"] == "running"
    finally:
        s.close()


def test_registry_manager_manages_identities(iot_hub: HubProcess, azure_python: Path) -> None:
    name = f"rm-{uuid.uuid4().hex[:8]}"
    created, got, deleted, missing = service(
        azure_python, iot_hub,
        {"op": "create_device", "device": name}, {"op": "get_device", "device": name},
        {"op": "delete_device", "device": name}, {"op": "get_device", "device": name})
    assert created["deviceId"] == name and len(created["primaryKey"]) >= 40
    assert got == {"deviceId": name, "status": "enabled", "connectionState": "Disconnected"}
    assert deleted == {"deleted": name}
    assert missing["status"] == 404
