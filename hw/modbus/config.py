"""The Modbus bridge's configuration: frozen dataclasses parsed from the module twin's desired
properties (or a profile file). Pure: profiles come in through a resolver function.

Shape (every key optional unless marked)::

    {
      "buses": {
        "rs485": {"serial": {"port": "/dev/serial/by-id/usb-FTDI_..-if00-port0",   # required
                             "baud": 19200, "parity": "E", "stopbits": 1, "bytesize": 8},
                  "timeout": 0.5, "extra_gap_ms": 0,
                  "breaker": {"threshold": 3, "backoff": 1.0, "max_backoff": 60.0}},
        "plc":   {"tcp": {"host": "192.0.2.10", "port": 502}, "timeout": 1.0}
      },
      "devices": {
        "meter1": {"bus": "rs485", "unit": 1, "profile": "eastron-sdm120", "interval": 10},
        "tank":   {"bus": "plc", "unit": 7, "interval": 1,
                   "registers": {"level": {"table": "holding", "address": 0, "type": "int16",
                                           "scale": 0.1, "unit": "cm"}}},
        "tt1":    {"bus": "rs485", "unit": 3, "profile": "transmitter-4-20ma-waveshare-ai8",
                   "overrides": {"temperature": {"scale": 0.00625, "offset": -25.0}}}
      },
      "writes": {"tt1": {"range_mode": 3}}
    }

Serial defaults follow Modbus over Serial Line V1.02 §2.5.1: 19200 baud, even parity.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from gateway.errors import ConfigError
from hw.modbus.registers import (
    MAX_READ_REGISTERS,
    Block,
    DataType,
    Order,
    Point,
    Table,
    Value,
    encode_point,
    plan_blocks,
)
from hw.modbus.schedule import BreakerConfig, JobSpec

NAME = re.compile(r"^[A-Za-z0-9_\-:]{1,64}$")


@dataclass(frozen=True, slots=True, kw_only=True)
class TcpLink:
    host: str
    port: int = 502

    def describe(self) -> str:
        return f"tcp:{self.host}:{self.port}"


@dataclass(frozen=True, slots=True, kw_only=True)
class SerialLink:
    port: str
    baud: int = 19200
    parity: Literal["N", "E", "O"] = "E"
    stopbits: int = 1
    bytesize: int = 8

    def describe(self) -> str:
        return f"serial:{self.port}@{self.baud}/{self.bytesize}{self.parity}{self.stopbits}"


Link = TcpLink | SerialLink


@dataclass(frozen=True, slots=True, kw_only=True)
class BusConfig:
    name: str
    link: Link
    timeout: float = 0.5  # seconds to wait for an answer
    extra_gap: float = 0.0  # seconds of silence added to t3.5 after each transaction
    breaker: BreakerConfig = field(default_factory=BreakerConfig)


@dataclass(frozen=True, slots=True, kw_only=True)
class Profile:
    """A reusable register map for one device model (``hw/profiles/<name>.toml``)."""

    name: str
    title: str
    datasheet: str
    points: tuple[Point, ...]
    max_registers: int = MAX_READ_REGISTERS
    max_gap: int = 0
    interval: float = 10.0
    goldens: tuple[Mapping[str, Any], ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceConfig:
    name: str
    bus: str
    unit: int
    interval: float
    points: tuple[Point, ...]
    max_registers: int = MAX_READ_REGISTERS
    max_gap: int = 0
    source: str = "inline"  # or "profile:<name>"

    def point(self, name: str) -> Point | None:
        return next((p for p in self.points if p.name == name), None)

    def blocks(self) -> tuple[Block, ...]:
        return plan_blocks(self.points, max_registers=self.max_registers, max_gap=self.max_gap)

    def jobs(self) -> tuple[JobSpec, ...]:
        """One job per distinct interval (points may poll slower or faster than the device)."""
        groups: dict[float, list[Point]] = {}
        for p in self.points:
            groups.setdefault(p.interval or self.interval, []).append(p)
        return tuple(
            JobSpec(self.name, self.unit, interval,
                    plan_blocks(pts, max_registers=self.max_registers, max_gap=self.max_gap))
            for interval, pts in sorted(groups.items()))


@dataclass(frozen=True, slots=True, kw_only=True)
class ModbusConfig:
    buses: Mapping[str, BusConfig] = field(default_factory=dict)
    devices: Mapping[str, DeviceConfig] = field(default_factory=dict)
    writes: Mapping[str, Mapping[str, Value]] = field(default_factory=dict)

    def devices_on(self, bus: str) -> tuple[DeviceConfig, ...]:
        return tuple(d for d in self.devices.values() if d.bus == bus)

    def unwritable(self, bus: str, unit: int, table: Table, address: int,
                   count: int = 1) -> int | None:
        """The first address of ``address .. address+count-1`` in ``table`` of ``unit`` on
        ``bus`` that no configured point marked ``writable`` covers, or None when all are."""
        covered: set[int] = set()
        for device in self.devices_on(bus):
            if device.unit == unit:
                for p in device.points:
                    if p.writable and p.table is table:
                        covered.update(range(p.address, p.end))
        return next((a for a in range(address, address + count) if a not in covered), None)


ProfileResolver = Callable[[str], Profile]


# ---------------------------------------------------------------------------------------------
# A small typed reader over JSON/TOML dicts that names the key path in every error


class Section:
    def __init__(self, raw: Any, path: str) -> None:
        if not isinstance(raw, Mapping):
            raise ConfigError("must be an object", path=path)
        self.raw, self.path, self.used = raw, path, set[str]()

    def _at(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def has(self, key: str) -> bool:
        return key in self.raw

    def get(self, key: str) -> Any:
        self.used.add(key)
        return self.raw.get(key)

    def section(self, key: str, *, required: bool = False) -> Section | None:
        value = self.get(key)
        if value is None:
            if required:
                raise ConfigError("is required", path=self._at(key))
            return None
        return Section(value, self._at(key))

    def string(self, key: str, default: str | None = None) -> str:
        value = self.get(key)
        if value is None and default is not None:
            return default
        if not isinstance(value, str) or not value:
            raise ConfigError(f"must be a non-empty string, not {value!r}", path=self._at(key))
        return value

    def integer(self, key: str, default: int | None = None, *, lo: int = 0,
                hi: int = 2**31) -> int:
        value = self.get(key)
        if value is None and default is not None:
            return default
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"must be an integer, not {value!r}", path=self._at(key))
        if not lo <= value <= hi:
            raise ConfigError(f"must be {lo}..{hi}, not {value}", path=self._at(key))
        return value

    def number(self, key: str, default: float | None = None, *, lo: float = -math.inf,
               positive: bool = False) -> float:
        value = self.get(key)
        if value is None and default is not None:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float) \
                or not math.isfinite(value):
            raise ConfigError(f"must be a number, not {value!r}", path=self._at(key))
        if value < lo or (positive and value <= 0):
            raise ConfigError(f"must be {'> 0' if positive else f'>= {lo:g}'}",
                              path=self._at(key))
        return float(value)

    def boolean(self, key: str, default: bool) -> bool:
        value = self.get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise ConfigError(f"must be true or false, not {value!r}", path=self._at(key))
        return value

    def choice(self, key: str, choices: tuple[str, ...], default: str) -> str:
        value = self.get(key)
        if value is None:
            return default
        if value not in choices:
            raise ConfigError(f"must be one of {', '.join(choices)}, not {value!r}",
                              path=self._at(key))
        return str(value)

    def items(self) -> Iterator[tuple[str, Any]]:
        for key, value in self.raw.items():
            self.used.add(key)
            yield key, value

    def done(self) -> None:
        """Unknown keys are errors: a typo never silently falls back to a default."""
        for key in self.raw:
            if key not in self.used:
                raise ConfigError("unknown key", path=self._at(key))


@contextmanager
def under(prefix: str) -> Iterator[None]:
    """Re-raise a ConfigError from a nested parser with ``prefix`` in front of its path."""
    try:
        yield
    except ConfigError as exc:
        if not prefix:
            raise
        path = f"{prefix}.{exc.path}" if exc.path else prefix
        message = str(exc).removeprefix(f"{exc.path}: ") if exc.path else str(exc)
        raise ConfigError(message, path=path) from None


# ---------------------------------------------------------------------------------------------
# Register maps


def parse_point(name: str, raw: Any, path: str) -> Point:
    s = Section(raw, path)
    table = Table(s.choice("table", tuple(Table), Table.HOLDING))
    default_type = DataType.BOOL if table.is_bits else DataType.UINT16
    bit = s.integer("bit", lo=0, hi=15) if s.has("bit") else None
    fields: dict[str, Any] = {
        "name": name,
        "table": table,
        "address": s.integer("address", lo=0, hi=0xFFFF),
        "type": DataType(s.choice("type", tuple(DataType), default_type)),
        "byte_order": Order(s.choice("byte_order", tuple(Order), Order.BIG)),
        "word_order": Order(s.choice("word_order", tuple(Order), Order.BIG)),
        "scale": s.number("scale", 1.0),
        "offset": s.number("offset", 0.0),
        "unit": s.string("unit") if s.has("unit") else None,
        "bit": bit,
        "length": s.integer("length", 1, lo=1, hi=MAX_READ_REGISTERS),
        "writable": s.boolean("writable", False),
        "interval": s.number("interval", positive=True) if s.has("interval") else None,
    }
    s.done()
    with under(path.removesuffix(f"registers.{name}").rstrip(".")):
        return Point(**fields)


def parse_points(raw: Any, path: str) -> tuple[Point, ...]:
    s = Section(raw, path)
    points = []
    for name, value in s.items():
        if not NAME.match(name):
            raise ConfigError("point names are 1-64 of A-Z a-z 0-9 _ - :", path=f"{path}.{name}")
        points.append(parse_point(name, value, f"{path}.{name}"))
    if not points:
        raise ConfigError("needs at least one register", path=path)
    return tuple(points)


def parse_profile(raw: Mapping[str, Any], name: str) -> Profile:
    """A profile document (the TOML file's content)."""
    top = Section(raw, "")
    head = top.section("profile")
    if head is None:
        raise ConfigError("not a Modbus profile (no [profile] table)", path="profile")
    max_registers = head.integer("max_registers", MAX_READ_REGISTERS, lo=1, hi=MAX_READ_REGISTERS)
    if head.get("bus") != "modbus":
        raise ConfigError("not a Modbus profile (needs bus = \"modbus\")", path="profile.bus")
    profile = Profile(
        name=head.string("name"),
        title=head.string("title"),
        datasheet=head.string("datasheet"),
        max_registers=max_registers,
        max_gap=head.integer("max_gap", 0, lo=0, hi=MAX_READ_REGISTERS),
        interval=head.number("interval", 10.0, positive=True),
        points=parse_points(top.get("registers"), "registers"),
        goldens=tuple(top.get("golden") or ()),
    )
    head.done()
    top.done()
    if profile.name != name:
        raise ConfigError(f"file is named {name!r} but declares {profile.name!r}",
                          path="profile.name")
    plan_blocks(profile.points, max_registers=profile.max_registers, max_gap=profile.max_gap)
    return profile


# ---------------------------------------------------------------------------------------------
# Buses, devices, writes


def _parse_link(s: Section) -> Link:
    tcp, serial = s.section("tcp"), s.section("serial")
    if (tcp is None) == (serial is None):
        raise ConfigError("needs exactly one of tcp or serial", path=s.path)
    link: Link
    if tcp is not None:
        link = TcpLink(host=tcp.string("host"), port=tcp.integer("port", 502, lo=1, hi=65535))
        tcp.done()
        return link
    assert serial is not None
    port = serial.string("port")
    if not port.startswith("/"):
        raise ConfigError("must be an absolute device path", path=f"{serial.path}.port")
    link = SerialLink(
        port=port,
        baud=serial.integer("baud", 19200, lo=300, hi=4_000_000),
        parity=serial.choice("parity", ("N", "E", "O"), "E"),  # type: ignore[arg-type]
        stopbits=serial.integer("stopbits", 1, lo=1, hi=2),
        bytesize=serial.integer("bytesize", 8, lo=7, hi=8),
    )
    serial.done()
    return link


def parse_bus(name: str, raw: Any, path: str) -> BusConfig:
    s = Section(raw, path)
    link = _parse_link(s)
    breaker = BreakerConfig()
    b = s.section("breaker")
    if b is not None:
        breaker = BreakerConfig(threshold=b.integer("threshold", 3, lo=1, hi=1000),
                                backoff=b.number("backoff", 1.0, positive=True),
                                max_backoff=b.number("max_backoff", 60.0, positive=True))
        b.done()
    bus = BusConfig(
        name=name,
        link=link,
        timeout=s.number("timeout", 0.5 if isinstance(link, SerialLink) else 1.0,
                         positive=True),
        extra_gap=s.number("extra_gap_ms", 0.0, lo=0.0) / 1000.0,
        breaker=breaker,
    )
    s.done()
    return bus


_OVERRIDABLE = ("scale", "offset", "unit", "interval")


def _override(point: Point, raw: Any, path: str) -> Point:
    s = Section(raw, path)
    changes: dict[str, Any] = {}
    if s.has("scale"):
        changes["scale"] = s.number("scale")
    if s.has("offset"):
        changes["offset"] = s.number("offset")
    if s.has("unit"):
        changes["unit"] = s.string("unit")
    if s.has("interval"):
        changes["interval"] = s.number("interval", positive=True)
    for key in s.raw:
        if key not in _OVERRIDABLE:
            raise ConfigError(f"only {', '.join(_OVERRIDABLE)} can be overridden",
                              path=f"{path}.{key}")
    try:
        return replace(point, **changes)
    except ConfigError as exc:
        raise ConfigError(str(exc).removeprefix(f"{exc.path}: "),
                          path=f"{path}.{exc.path.rsplit('.', 1)[-1]}") from None


def parse_device(name: str, raw: Any, path: str, buses: Mapping[str, BusConfig],
                 profiles: ProfileResolver) -> DeviceConfig:
    s = Section(raw, path)
    bus_name = s.string("bus")
    bus = buses.get(bus_name)
    if bus is None:
        raise ConfigError(f"no bus named {bus_name!r}", path=f"{path}.bus")
    hi = 247 if isinstance(bus.link, SerialLink) else 255  # §2.2: 1..247 on a serial line
    unit = s.integer("unit", lo=0 if hi == 255 else 1, hi=hi)
    if s.has("profile") == s.has("registers"):
        raise ConfigError("needs exactly one of profile or registers", path=path)
    max_registers, max_gap, interval, source = MAX_READ_REGISTERS, 0, 10.0, "inline"
    if s.has("profile"):
        profile_name = s.string("profile")
        try:
            profile = profiles(profile_name)
        except ConfigError as exc:
            raise ConfigError(str(exc), path=f"{path}.profile") from None
        points = profile.points
        max_registers, max_gap = profile.max_registers, profile.max_gap
        interval, source = profile.interval, f"profile:{profile.name}"
    else:
        points = parse_points(s.get("registers"), f"{path}.registers")
    overrides = s.section("overrides")
    if overrides is not None:
        by_name = {p.name: p for p in points}
        for point_name, value in overrides.items():
            if point_name not in by_name:
                raise ConfigError("no such point", path=f"{overrides.path}.{point_name}")
            by_name[point_name] = _override(by_name[point_name], value,
                                            f"{overrides.path}.{point_name}")
        points = tuple(by_name[p.name] for p in points)
    device = DeviceConfig(
        name=name,
        bus=bus_name,
        unit=unit,
        interval=s.number("interval", interval, positive=True),
        points=points,
        max_registers=s.integer("max_registers", max_registers, lo=1, hi=MAX_READ_REGISTERS),
        max_gap=s.integer("max_gap", max_gap, lo=0, hi=MAX_READ_REGISTERS),
        source=source,
    )
    s.done()
    with under(path):
        device.jobs()  # plans every block now, so an impossible map fails at apply time
    return device


def parse_writes(raw: Any, devices: Mapping[str, DeviceConfig]) -> dict[str, dict[str, Value]]:
    top = Section(raw, "writes")
    out: dict[str, dict[str, Value]] = {}
    for device_name, values in top.items():
        device = devices.get(device_name)
        path = f"writes.{device_name}"
        if device is None:
            raise ConfigError("no such device", path=path)
        section = Section(values, path)
        for point_name, value in section.items():
            point = device.point(point_name)
            if point is None or not point.writable:
                raise ConfigError("no writable point of that name", path=f"{path}.{point_name}")
            if point.type is DataType.BOOL:
                if not isinstance(value, bool):
                    raise ConfigError("must be true or false", path=f"{path}.{point_name}")
            else:
                if isinstance(value, bool) or not isinstance(value, int | float | str) or (
                        point.type is DataType.STRING) != isinstance(value, str):
                    raise ConfigError(f"must be a {point.type} value",
                                      path=f"{path}.{point_name}")
                try:
                    encode_point(point, value)
                except ValueError as exc:
                    raise ConfigError(str(exc), path=f"{path}.{point_name}") from None
            out.setdefault(device_name, {})[point_name] = value
    return out


def parse_config(desired: Mapping[str, Any], profiles: ProfileResolver) -> ModbusConfig:
    """The whole desired document (``$version``/``$metadata`` are ignored)."""
    raw = {k: v for k, v in desired.items() if not k.startswith("$")}
    top = Section(raw, "")
    buses: dict[str, BusConfig] = {}
    bus_section = top.section("buses")
    if bus_section is not None:
        for name, value in bus_section.items():
            if not NAME.match(name):
                raise ConfigError("bus names are 1-64 of A-Z a-z 0-9 _ - :", path=f"buses.{name}")
            buses[name] = parse_bus(name, value, f"buses.{name}")
    devices: dict[str, DeviceConfig] = {}
    device_section = top.section("devices")
    if device_section is not None:
        for name, value in device_section.items():
            if not NAME.match(name):
                raise ConfigError("device names are 1-64 of A-Z a-z 0-9 _ - :",
                                  path=f"devices.{name}")
            devices[name] = parse_device(name, value, f"devices.{name}", buses, profiles)
    writes = parse_writes(top.get("writes") or {}, devices)
    top.done()
    return ModbusConfig(buses=buses, devices=devices, writes=writes)
