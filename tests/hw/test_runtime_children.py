"""The bridge runtime's side of identity translation (hw.runtime with a real Modbus bridge,
not running: only how configuration is composed and refused)."""

from __future__ import annotations

import base64

from gateway.client import ClientSettings
from gateway.translation import ChildSpec, encode_document
from hw.modbus.bridge import ModbusBridge
from hw.runtime import ModuleRuntime

KEY = base64.b64encode(b"k" * 32).decode()
DESIRED = {
    "buses": {"plc": {"tcp": {"host": "127.0.0.1", "port": 5020}}},
    "devices": {"m1": {"bus": "plc", "unit": 1, "profile": "eastron-sdm120", "interval": 10},
                "m2": {"bus": "plc", "unit": 2, "profile": "eastron-sdm120", "interval": 10}},
    "children": {"m1": {"deviceId": "meter-1"}, "m2": {"deviceId": "meter-2"}},
}


def runtime() -> tuple[ModuleRuntime, ModbusBridge]:
    bridge = ModbusBridge()
    settings = ClientSettings.from_string(
        f"HostName=hub;DeviceId=gw;ModuleId=modbus;SharedAccessKey={KEY}")
    rt = ModuleRuntime(bridge, settings)
    rt._twin_read = True
    return rt, bridge


def read_twin(rt: ModuleRuntime, desired: dict[str, object]) -> None:
    """What a twin GET does: the whole desired document, applied."""
    rt.twin_desired, rt.desired_version = dict(desired), 1
    rt._apply()


def document(m1: dict[str, object], m2: dict[str, object]) -> bytes:
    return encode_document([ChildSpec("m1", "meter-1", m1), ChildSpec("m2", "meter-2", m2)])


def test_child_desired_properties_configure_their_sensor() -> None:
    rt, bridge = runtime()
    read_twin(rt, DESIRED)
    rt._children_document(document({"interval": 2}, {}))
    assert bridge.config.devices["m1"].interval == 2
    assert bridge.config.devices["m2"].interval == 10
    assert rt.children == {"m1": "meter-1", "m2": "meter-2"}
    assert rt._config_error is None and rt._child_errors == {}


def test_a_refused_child_is_left_out_and_the_others_apply() -> None:
    rt, bridge = runtime()
    read_twin(rt, DESIRED)
    rt._children_document(document({"interval": "soon"}, {"interval": 3}))
    assert "devices.m1.interval" in rt._child_errors["m1"]
    assert bridge.config.devices["m1"].interval == 10  # the module's own setting stays
    assert bridge.config.devices["m2"].interval == 3
    assert rt._config_error is None


def test_a_bad_module_document_is_refused_whole_and_the_previous_stays() -> None:
    rt, bridge = runtime()
    read_twin(rt, DESIRED)
    rt._desired_patch({"buses": {"plc": {"tcp": {"port": "x"}}}, "$version": 2})
    assert rt._config_error is not None and "buses.plc" in rt._config_error
    assert set(bridge.config.devices) == {"m1", "m2"}


def test_a_child_for_an_unconfigured_sensor_is_reported() -> None:
    rt, _ = runtime()
    read_twin(rt, {k: v for k, v in DESIRED.items() if k != "devices"})
    rt._children_document(document({"interval": 2}, {}))
    assert rt._child_errors == {"m1": "no sensor 'm1' in the bridge's configuration"}
