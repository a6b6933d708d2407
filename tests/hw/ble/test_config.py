"""The BLE bridge configuration: parsed from the desired properties, errors name the key path,
and the bindkey stays out of every message and repr."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.errors import ConfigError
from hw.ble.config import GattMode, ScanMode, parse_config
from hw.ble.decoders import DecoderKind

KEY = "231d39c1d7cc1ab1aee224cd096db932"


def test_defaults_and_a_full_document() -> None:
    assert parse_config({}).sensors == ()
    cfg = parse_config({
        "adapter": "hci1", "scanMode": "active", "watchdogSeconds": 0, "maxConnections": 3,
        "sensors": {
            "kitchen": {"address": "a4-c1-38-12-34-56", "profile": "xiaomi-lywsd03mmc"},
            "porch": {"address": "54:48:E6:8F:80:A5", "decoder": "bthome", "bindkey": KEY,
                      "replayProtection": False},
            "fridge": {"address": "C0:FF:EE:00:00:01",
                       "gatt": {"mode": "read", "intervalSeconds": 300}},
            "gone": None,
        }})
    assert (cfg.adapter, cfg.scan_mode, cfg.watchdog_s, cfg.max_connections) == (
        "hci1", ScanMode.ACTIVE, 0.0, 3)
    kitchen, porch, fridge = cfg.sensors
    assert kitchen.address == "A4:C1:38:12:34:56"
    assert kitchen.decoders == (DecoderKind.ATC, DecoderKind.BTHOME)
    assert porch.bindkey is not None and not porch.replay_protection
    assert fridge.gatt is not None and fridge.gatt.mode is GattMode.READ
    assert fridge.gatt.interval_s == 300 and fridge.decoders == ()
    assert KEY not in repr(cfg)


@pytest.mark.parametrize(("doc", "path"), [
    ({"scanmode": "active"}, "scanmode"),
    ({"scanMode": "loud"}, "scanMode"),
    ({"adapter": "/dev/hci0"}, "adapter"),
    ({"watchdogSeconds": -1}, "watchdogSeconds"),
    ({"maxConnections": 1.5}, "maxConnections"),
    ({"maxConnections": True}, "maxConnections"),
    ({"sensors": []}, "sensors"),
    ({"sensors": {"a": {"decoder": "ruuvi"}}}, "sensors.a.address"),
    ({"sensors": {"a": {"address": "A4:C1:38:12:34", "decoder": "ruuvi"}}}, "sensors.a.address"),
    ({"sensors": {"a": {"address": "A4:C1:38:12:34:56"}}}, "sensors.a"),
    ({"sensors": {"a": {"address": "A4:C1:38:12:34:56", "decoder": "mibeacon"}}},
     "sensors.a.decoder"),
    ({"sensors": {"a": {"address": "A4:C1:38:12:34:56", "decoder": ["atc", "atc"]}}},
     "sensors.a.decoder"),
    ({"sensors": {"a": {"address": "A4:C1:38:12:34:56", "profile": "toaster"}}},
     "sensors.a.profile"),
    ({"sensors": {"a": {"address": "A4:C1:38:12:34:56", "decoder": "ruuvi", "colour": 1}}},
     "sensors.a.colour"),
    ({"sensors": {"a": {"address": "A4:C1:38:12:34:56", "gatt": {"mode": "stream"}}}},
     "sensors.a.gatt.mode"),
    ({"sensors": {"a": {"address": "A4:C1:38:12:34:56", "gatt": {"intervalSeconds": 0}}}},
     "sensors.a.gatt.intervalSeconds"),
    ({"sensors": {"a": {"address": "A4:C1:38:12:34:56", "decoder": "ruuvi"},
                  "b": {"address": "a4:c1:38:12:34:56", "decoder": "atc"}}},
     "sensors.b.address"),
])
def test_errors_name_the_key_path(doc: dict[str, Any], path: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(doc)
    assert e.value.path == path


@pytest.mark.parametrize("bad_key", [KEY[:-2], KEY + "zz", "z" * 32, 1234])
def test_a_bad_bindkey_is_refused_without_echoing_it(bad_key: Any) -> None:
    doc = {"sensors": {"porch": {"address": "54:48:E6:8F:80:A5", "decoder": "bthome",
                                 "bindkey": bad_key}}}
    with pytest.raises(ConfigError) as e:
        parse_config(doc)
    assert e.value.path == "sensors.porch.bindkey"
    assert str(bad_key) not in str(e.value)


def test_a_changed_bindkey_makes_a_different_sensor_config() -> None:
    def porch(key: str) -> Any:
        return parse_config({"sensors": {"porch": {
            "address": "54:48:E6:8F:80:A5", "decoder": "bthome", "bindkey": key}}}).sensors[0]

    assert porch(KEY) == porch(KEY.upper())
    assert porch(KEY) != porch("00" * 16)
