"""Desired properties -> typed configuration; errors name the key path (hw/modbus/config.py)."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from gateway.errors import ConfigError
from hw.modbus.config import SerialLink, TcpLink, parse_config
from hw.modbus.profiles import ProfileLibrary
from hw.modbus.registers import DataType, Table

LIB = ProfileLibrary()

EXAMPLE: dict[str, Any] = {
    "$version": 7,
    "buses": {
        "rs485": {"serial": {"port": "/dev/serial/by-id/usb-FTDI_FT232R-if00-port0",
                             "baud": 9600, "parity": "N"},
                  "extra_gap_ms": 5, "breaker": {"threshold": 2, "backoff": 2}},
        "plc": {"tcp": {"host": "127.0.0.1", "port": 5020}, "timeout": 2},
    },
    "devices": {
        "meter1": {"bus": "rs485", "unit": 1, "profile": "eastron-sdm120", "interval": 15},
        "tank": {"bus": "plc", "unit": 7, "interval": 1, "registers": {
            "level": {"table": "holding", "address": 0, "type": "int16", "scale": 0.1,
                      "unit": "cm"},
            "alarm": {"table": "holding", "address": 1, "type": "bits", "bit": 3},
            "pump": {"table": "coil", "address": 0, "writable": True},
            "name": {"table": "holding", "address": 10, "type": "string", "length": 4,
                     "interval": 3600}}},
        "tt1": {"bus": "rs485", "unit": 3, "profile": "transmitter-4-20ma-waveshare-ai8",
                "overrides": {"temperature": {"scale": 0.00625, "offset": -25.0}}},
    },
    "writes": {"tt1": {"range_mode": 3}, "tank": {"pump": True}},
}


def test_the_example_parses() -> None:
    cfg = parse_config(EXAMPLE, LIB)
    rs485 = cfg.buses["rs485"]
    assert rs485.link == SerialLink(port="/dev/serial/by-id/usb-FTDI_FT232R-if00-port0",
                                    baud=9600, parity="N")
    assert rs485.extra_gap == 0.005 and rs485.timeout == 0.5
    assert rs485.breaker.threshold == 2 and rs485.breaker.backoff == 2.0
    assert cfg.buses["plc"].link == TcpLink(host="127.0.0.1", port=5020)
    meter = cfg.devices["meter1"]
    assert meter.source == "profile:eastron-sdm120" and meter.interval == 15.0
    assert meter.max_registers == 60 and len(meter.blocks()) == 3
    tank = cfg.devices["tank"]
    assert [p.name for p in tank.points] == ["level", "alarm", "pump", "name"]
    assert tank.point("pump").table is Table.COIL  # type: ignore[union-attr]
    assert tank.point("pump").type is DataType.BOOL  # type: ignore[union-attr]
    assert [(j.interval, len(j.blocks)) for j in tank.jobs()] == [(1.0, 2), (3600.0, 1)]
    temperature = cfg.devices["tt1"].point("temperature")
    assert temperature is not None and temperature.scale == 0.00625
    assert cfg.writes == {"tt1": {"range_mode": 3}, "tank": {"pump": True}}
    assert [d.name for d in cfg.devices_on("rs485")] == ["meter1", "tt1"]


def test_serial_defaults_follow_the_serial_line_spec() -> None:
    cfg = parse_config({"buses": {"b": {"serial": {"port": "/dev/ttyS0"}}}}, LIB)
    assert cfg.buses["b"].link == SerialLink(port="/dev/ttyS0", baud=19200, parity="E",
                                             stopbits=1, bytesize=8)


def _with(path: str, value: Any) -> dict[str, Any]:
    doc = copy.deepcopy(EXAMPLE)
    *parents, last = path.split(".")
    node = doc
    for key in parents:
        node = node[key]
    if value is KeyError:
        del node[last]
    else:
        node[last] = value
    return doc


@pytest.mark.parametrize(("path", "value", "error_path"), [
    ("colour", "blue", "colour"),
    ("buses.plc.tcp", KeyError, "buses.plc"),
    ("buses.plc.serial", {"port": "/dev/ttyS1"}, "buses.plc"),
    ("buses.plc.tcp.port", 70000, "buses.plc.tcp.port"),
    ("buses.rs485.serial.parity", "X", "buses.rs485.serial.parity"),
    ("buses.rs485.serial.port", "ttyS0", "buses.rs485.serial.port"),
    ("buses.rs485.timeout", 0, "buses.rs485.timeout"),
    ("buses.rs485.breaker.threshold", 0, "buses.rs485.breaker.threshold"),
    ("buses.rs485.retries", 3, "buses.rs485.retries"),
    ("devices.meter1.bus", "nope", "devices.meter1.bus"),
    ("devices.meter1.unit", 0, "devices.meter1.unit"),
    ("devices.meter1.unit", 248, "devices.meter1.unit"),
    ("devices.meter1.unit", True, "devices.meter1.unit"),
    ("devices.meter1.profile", "no-such-meter", "devices.meter1.profile"),
    ("devices.meter1.interval", -1, "devices.meter1.interval"),
    ("devices.meter1.registers", {"x": {"address": 0}}, "devices.meter1"),
    ("devices.tank.registers.level.type", "int24", "devices.tank.registers.level.type"),
    ("devices.tank.registers.level.table", "input", None),  # fine
    ("devices.tank.registers.alarm.bit", 16, "devices.tank.registers.alarm.bit"),
    ("devices.tank.registers.pump.type", "uint16", "devices.tank.registers.pump.type"),
    ("devices.tank.registers.level.writable", "yes", "devices.tank.registers.level.writable"),
    ("devices.tank.registers.level.colour", 1, "devices.tank.registers.level.colour"),
    ("devices.tank.registers.name.length", 200, "devices.tank.registers.name.length"),
    ("devices.tank.max_registers", 3, "devices.tank.registers.name"),
    ("devices.tt1.overrides.temperature.address", 5,
     "devices.tt1.overrides.temperature.address"),
    ("devices.tt1.overrides.temperature.scale", 0, "devices.tt1.overrides.temperature.scale"),
    ("devices.tt1.overrides.humidity", {"scale": 1}, "devices.tt1.overrides.humidity"),
    ("writes.tt1.temperature", 20, "writes.tt1.temperature"),
    ("writes.tt1.range_mode", 70000, "writes.tt1.range_mode"),
    ("writes.tt1.range_mode", "3", "writes.tt1.range_mode"),
    ("writes.tank.pump", 1, "writes.tank.pump"),
    ("writes.ghost", {"x": 1}, "writes.ghost"),
])
def test_errors_name_the_key_path(path: str, value: Any, error_path: str | None) -> None:
    doc = _with(path, value)
    if error_path is None:
        parse_config(doc, LIB)
        return
    with pytest.raises(ConfigError) as err:
        parse_config(doc, LIB)
    assert err.value.path == error_path, str(err.value)


def test_tcp_allows_unit_0_and_255_but_serial_does_not() -> None:
    doc = _with("devices.tank.unit", 255)
    assert parse_config(doc, LIB).devices["tank"].unit == 255
    with pytest.raises(ConfigError):
        parse_config(_with("devices.meter1.unit", 255), LIB)
