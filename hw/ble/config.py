"""The BLE bridge's configuration: frozen dataclasses parsed from the module twin's desired
properties. Pure.

Desired document (camelCase, as twin properties usually are)::

    {
      "adapter": "hci0",              # the BlueZ adapter that scans and connects
      "scanMode": "passive",          # or "active"; passive falls back to active if BlueZ can't
      "watchdogSeconds": 90,          # silence while sensors are expected -> restart scan, reset
      "dedupWindowSeconds": 60,       # same counter (or bytes) within this window is a duplicate
      "maxConnections": 2,            # GATT connections at once (controllers allow few)
      "sensors": {
        "kitchen": {"address": "A4:C1:38:12:34:56", "profile": "xiaomi-lywsd03mmc"},
        "porch":   {"address": "54:48:E6:8F:80:A5", "decoder": "bthome",
                    "bindkey": "231d39c1d7cc1ab1aee224cd096db932"},
        "fridge":  {"address": "C0:FF:EE:00:00:01",
                    "gatt": {"mode": "notify"}}          # or {"mode": "read", "intervalSeconds": 300}
      }
    }

``decoder`` is one kind or a list (``bthome``, ``ruuvi``, ``atc`` = pvvx or ATC1441 by length,
``pvvx``, ``atc1441``); ``profile`` names a file in ``hw/profiles/`` that supplies the decoders. A
sensor needs decoders, ``gatt``, or both. Unknown keys are errors: a typo must not be ignored.
The bindkey never appears in a repr, an error message or the status.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, TypeVar

from gateway.errors import ConfigError
from hw.ble.decoders import BindKey, DecoderKind
from hw.ble.profiles import ProfileError, load_profile


class ScanMode(StrEnum):
    PASSIVE = "passive"
    ACTIVE = "active"


class GattMode(StrEnum):
    NOTIFY = "notify"  # stay connected, read once, then take notifications
    READ = "read"  # connect every interval, read, disconnect (kinder to batteries)


@dataclass(frozen=True, slots=True, kw_only=True)
class GattConfig:
    mode: GattMode = GattMode.NOTIFY
    interval_s: float = 60.0  # READ: poll period; failures retry after 1 s, doubling to 300 s
    timeout_s: float = 20.0  # connect + service discovery (BlueZ resolves services on connect)


@dataclass(frozen=True, slots=True, kw_only=True)
class SensorConfig:
    name: str
    address: str  # upper case, colon separated
    decoders: tuple[DecoderKind, ...] = ()
    bindkey: BindKey | None = field(default=None, repr=False, compare=False)
    bindkey_hex: str | None = field(default=None, repr=False)  # for change detection only
    gatt: GattConfig | None = None
    replay_protection: bool = True
    stale_s: float = 600.0  # not heard for this long -> "stale" in the status, logged once


@dataclass(frozen=True, slots=True, kw_only=True)
class BleConfig:
    adapter: str = "hci0"
    scan_mode: ScanMode = ScanMode.PASSIVE
    watchdog_s: float = 90.0
    dedup_window_s: float = 60.0
    max_connections: int = 2
    sensors: tuple[SensorConfig, ...] = ()

    def sensor(self, name: str) -> SensorConfig | None:
        for s in self.sensors:
            if s.name == name:
                return s
        return None


E = TypeVar("E", bound=StrEnum)

_MAC = re.compile(r"^[0-9A-F]{2}(:[0-9A-F]{2}){5}$")
_ADAPTER = re.compile(r"^hci[0-9]+$")
_TOP = {"adapter", "scanMode", "watchdogSeconds", "dedupWindowSeconds", "maxConnections",
        "sensors"}
_SENSOR = {"address", "decoder", "profile", "bindkey", "gatt", "replayProtection",
           "staleSeconds"}
_GATT = {"mode", "intervalSeconds", "timeoutSeconds"}


def parse_config(desired: Mapping[str, Any]) -> BleConfig:
    """Parse the desired properties; raises :class:`ConfigError` naming the key path."""
    if not isinstance(desired, Mapping):
        raise ConfigError("expected an object", path="")
    _no_unknown(desired, _TOP, "")
    adapter = _str(desired, "adapter", "hci0", "adapter")
    if not _ADAPTER.match(adapter):
        raise ConfigError("expected an adapter name like hci0", path="adapter")
    mode = _enum(ScanMode, desired.get("scanMode", "passive"), "scanMode")
    sensors_doc = desired.get("sensors", {})
    if not isinstance(sensors_doc, Mapping):
        raise ConfigError("expected an object of sensors by name", path="sensors")
    sensors = []
    addresses: dict[str, str] = {}
    for name, doc in sensors_doc.items():
        if doc is None:  # a twin patch deleting the sensor
            continue
        sensor = _parse_sensor(str(name), doc, f"sensors.{name}")
        if sensor.address in addresses:
            raise ConfigError(f"address already used by sensor {addresses[sensor.address]!r}",
                              path=f"sensors.{name}.address")
        addresses[sensor.address] = sensor.name
        sensors.append(sensor)
    return BleConfig(
        adapter=adapter,
        scan_mode=mode,
        watchdog_s=_number(desired, "watchdogSeconds", 90.0, "watchdogSeconds", minimum=0),
        dedup_window_s=_number(desired, "dedupWindowSeconds", 60.0, "dedupWindowSeconds",
                               minimum=0),
        max_connections=int(_number(desired, "maxConnections", 2, "maxConnections", minimum=1,
                                    integer=True)),
        sensors=tuple(sensors),
    )


def _parse_sensor(name: str, doc: Any, path: str) -> SensorConfig:
    if not isinstance(doc, Mapping):
        raise ConfigError("expected an object", path=path)
    _no_unknown(doc, _SENSOR, path)
    if not name or len(name) > 64:
        raise ConfigError("a sensor name is 1 to 64 characters", path=path)
    address = _str(doc, "address", None, f"{path}.address").upper().replace("-", ":")
    if not _MAC.match(address):
        raise ConfigError("expected a MAC address like A4:C1:38:12:34:56",
                          path=f"{path}.address")
    decoders: tuple[DecoderKind, ...] = ()
    if "profile" in doc:
        if "decoder" in doc:
            raise ConfigError("give either decoder or profile", path=f"{path}.profile")
        try:
            decoders = load_profile(_str(doc, "profile", None, f"{path}.profile")).decoders
        except ProfileError as e:
            raise ConfigError(str(e), path=f"{path}.profile") from None
    elif "decoder" in doc:
        raw = doc["decoder"]
        items = raw if isinstance(raw, list) else [raw]
        if not items:
            raise ConfigError("expected at least one decoder", path=f"{path}.decoder")
        decoders = tuple(_enum(DecoderKind, d, f"{path}.decoder") for d in items)
        if len(set(decoders)) != len(decoders):
            raise ConfigError("decoder listed twice", path=f"{path}.decoder")
    key: BindKey | None = None
    key_hex: str | None = None
    if doc.get("bindkey") is not None:
        text = doc["bindkey"]
        if not isinstance(text, str):
            raise ConfigError("expected 32 hex digits", path=f"{path}.bindkey")
        try:
            key = BindKey.from_hex(text)
        except ValueError as e:
            raise ConfigError(str(e), path=f"{path}.bindkey") from None  # never echo the key
        key_hex = text.lower()
    gatt: GattConfig | None = None
    if doc.get("gatt") is not None:
        gatt = _parse_gatt(doc["gatt"], f"{path}.gatt")
    if not decoders and gatt is None:
        raise ConfigError("a sensor needs a decoder, a profile or gatt", path=path)
    replay = doc.get("replayProtection", True)
    if not isinstance(replay, bool):
        raise ConfigError("expected true or false", path=f"{path}.replayProtection")
    return SensorConfig(
        name=name, address=address, decoders=decoders, bindkey=key, bindkey_hex=key_hex,
        gatt=gatt, replay_protection=replay,
        stale_s=_number(doc, "staleSeconds", 600.0, f"{path}.staleSeconds", minimum=1))


def _parse_gatt(doc: Any, path: str) -> GattConfig:
    if not isinstance(doc, Mapping):
        raise ConfigError("expected an object", path=path)
    _no_unknown(doc, _GATT, path)
    return GattConfig(
        mode=_enum(GattMode, doc.get("mode", "notify"), f"{path}.mode"),
        interval_s=_number(doc, "intervalSeconds", 60.0, f"{path}.intervalSeconds",
                           minimum=0.01),
        timeout_s=_number(doc, "timeoutSeconds", 20.0, f"{path}.timeoutSeconds", minimum=0.1),
    )


def _no_unknown(doc: Mapping[str, Any], known: set[str], path: str) -> None:
    for key in doc:
        if key not in known:
            where = f"{path}.{key}" if path else str(key)
            raise ConfigError(f"unknown key (expected one of {', '.join(sorted(known))})",
                              path=where)


def _str(doc: Mapping[str, Any], key: str, default: str | None, path: str) -> str:
    value = doc.get(key, default)
    if value is None:
        raise ConfigError("required", path=path)
    if not isinstance(value, str):
        raise ConfigError("expected a string", path=path)
    return value


def _number(doc: Mapping[str, Any], key: str, default: float, path: str, *, minimum: float,
            integer: bool = False) -> float:
    value = doc.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError("expected a number", path=path)
    if integer and not float(value).is_integer():
        raise ConfigError("expected an integer", path=path)
    if value < minimum:
        raise ConfigError(f"must be at least {minimum:g}", path=path)
    return float(value)


def _enum(cls: type[E], value: Any, path: str) -> E:
    try:
        return cls(value)
    except ValueError:
        raise ConfigError(f"expected one of {', '.join(m.value for m in cls)}",
                          path=path) from None
