"""The serial bridge's configuration: frozen dataclasses parsed from desired properties.

Shape of the module twin's desired properties (keys are camelCase; twin keys may not contain
``.``, so JSON field paths use ``/``)::

    {"ports": {
        "gps": {"path": "/dev/serial/by-id/usb-u-blox_AG_-_www.u-blox.com_u-blox_7_-_GPS_GNSS_Recei
                         ver-if00",  (one string; wrapped here)
                "baud": 9600, "format": "nmea", "decoder": {"sentences": ["GGA", "RMC"]}},
        "meter": {"match": {"vendorId": "0403", "serial": "A9J3K2"}, "baud": 115200,
                  "format": "jsonl", "sensor": "boiler",
                  "decoder": {"fields": {"t": {"name": "temperature", "unit": "Cel"}}}},
        "scale": {"path": "/dev/gateway/ch34x-path-pci-0000_00_14_0-usb-0_2_1_0-if00",
                  "format": "regex",
                  "decoder": {"pattern": "W:(?P<weight>[-0-9.]+)kg",
                              "fields": {"weight": {"unit": "kg"}}}},
        "logger": {"path": "/dev/serial/by-id/...", "format": "delimited",
                   "decoder": {"separator": ";", "columns": ["temperature", null, "humidity"]}}}}

A port is named either by ``path`` (opened and reopened with backoff for as long as it is
configured) or by ``match`` (a USB vendor id/product id/serial rule: the port runs while such an
adapter is plugged in; see :mod:`hw.hotplug`). Unknown keys are errors, so typos do not pass
silently. Every :class:`ConfigError` names its key path (``ports.gps.baud``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, cast, get_args

from gateway.errors import ConfigError
from hw.hotplug import MatchRule, parse_rule
from hw.serial.framing import (
    Decoder,
    DelimitedDecoder,
    DelimitedOptions,
    FieldKind,
    FieldSpec,
    FrameReader,
    JsonLinesDecoder,
    JsonOptions,
    RegexDecoder,
    RegexOptions,
)
from hw.serial.nmea import SENTENCES, NmeaDecoder, NmeaOptions
from hw.serial.port import LinkSettings, Parity

__all__ = ["Format", "PortConfig", "SerialConfig", "parse_config"]

Format = Literal["nmea", "jsonl", "regex", "delimited"]
DecoderOptions = NmeaOptions | JsonOptions | RegexOptions | DelimitedOptions

_MAX_LINE = {"nmea": 164, "jsonl": 4096, "regex": 1024, "delimited": 1024}  # 164: 2x NMEA §5.3
_TERMINATORS = {"lf": b"\n", "cr": b"\r"}
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


@dataclass(frozen=True, slots=True, kw_only=True)
class PortConfig:
    name: str  # the key under "ports"
    sensor: str  # the sensor the readings belong to (defaults to the port name)
    path: str | None = None
    match: MatchRule | None = None
    link: LinkSettings = field(default_factory=LinkSettings)
    format: Format = "nmea"
    decoder: DecoderOptions = field(default_factory=NmeaOptions)
    max_line: int = 164
    terminator: bytes = b"\n"
    reconnect_min: float = 0.5  # seconds before the first reopen; doubles up to reconnect_max
    reconnect_max: float = 30.0
    silence_timeout: float | None = None  # reopen when nothing arrived for this long
    enabled: bool = True

    def same_link(self, other: PortConfig) -> bool:
        """Whether ``other`` opens the same port the same way (so no reopen is needed)."""
        return (
            self.path == other.path
            and self.match == other.match
            and self.link == other.link
            and self.reconnect_min == other.reconnect_min
            and self.reconnect_max == other.reconnect_max
            and self.silence_timeout == other.silence_timeout
            and self.enabled == other.enabled
        )

    def make_decoder(self) -> Decoder:
        options = self.decoder
        if isinstance(options, NmeaOptions):
            return NmeaDecoder(options)
        if isinstance(options, JsonOptions):
            return JsonLinesDecoder(options)
        if isinstance(options, RegexOptions):
            return RegexDecoder(options)
        return DelimitedDecoder(options)

    def make_reader(self, reader: FrameReader | None = None) -> FrameReader:
        """A frame reader for this config; given the previous one, its counters carry over."""
        new = FrameReader(
            self.sensor, self.make_decoder(), max_line=self.max_line, terminator=self.terminator
        )
        if reader is not None:
            new.counters = reader.counters
        return new


@dataclass(frozen=True, slots=True, kw_only=True)
class SerialConfig:
    ports: Mapping[str, PortConfig] = field(default_factory=dict)

    @property
    def rules(self) -> tuple[MatchRule, ...]:
        return tuple(p.match for p in self.ports.values() if p.match is not None and p.enabled)


# ---------------------------------------------------------------------------------------------

T = TypeVar("T")


def _obj(raw: Any, path: str, known: frozenset[str]) -> Mapping[str, Any]:
    if not isinstance(raw, Mapping):
        raise ConfigError("must be an object", path=path)
    for key in raw:
        if key not in known:
            known_keys = ", ".join(sorted(known))
            raise ConfigError(f"unknown key (known: {known_keys})", path=_at(path, key))
    return raw


def _at(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _get(obj: Mapping[str, Any], key: str, kind: type[T] | tuple[type, ...], path: str,
         default: T) -> T:
    value = obj.get(key)
    if value is None:
        return default
    ok = isinstance(value, kind) and not (isinstance(value, bool) and bool not in _types(kind))
    if not ok:
        names = "/".join(t.__name__ for t in _types(kind))
        raise ConfigError(f"must be {names}, got {type(value).__name__}", path=_at(path, key))
    return cast(T, value)


def _types(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _positive(obj: Mapping[str, Any], key: str, path: str, default: float) -> float:
    value = float(_get(obj, key, (int, float), path, default))
    if not value > 0:
        raise ConfigError("must be positive", path=_at(path, key))
    return value


def _choice(obj: Mapping[str, Any], key: str, path: str, choices: tuple[T, ...], default: T) -> T:
    value = obj.get(key, default)
    if value is None:
        return default
    if value not in choices or isinstance(value, bool):
        raise ConfigError(f"must be one of {', '.join(map(str, choices))}", path=_at(path, key))
    return cast(T, value)


_FIELD_KEYS = frozenset({"name", "unit", "scale", "offset", "kind"})


def _field_spec(raw: Any, path: str) -> FieldSpec:
    obj = _obj(raw, path, _FIELD_KEYS)
    scale = float(_get(obj, "scale", (int, float), path, 1.0))
    offset = float(_get(obj, "offset", (int, float), path, 0.0))
    kind = _choice(obj, "kind", path, cast(tuple[FieldKind, ...], get_args(FieldKind)), "number")
    return FieldSpec(
        name=_get(obj, "name", str, path, cast(str | None, None)) or None,
        unit=_get(obj, "unit", str, path, cast(str | None, None)) or None,
        scale=scale,
        offset=offset,
        kind=kind,
    )


def _fields(obj: Mapping[str, Any], path: str) -> dict[str, FieldSpec]:
    raw = obj.get("fields")
    if raw is None:
        return {}
    fields_path = _at(path, "fields")
    if not isinstance(raw, Mapping):
        raise ConfigError("must be an object of field specs", path=fields_path)
    return {key: _field_spec(value, _at(fields_path, key)) for key, value in raw.items()}


def _nmea(raw: Any, path: str) -> NmeaOptions:
    obj = _obj(raw, path, frozenset({"sentences", "requireChecksum"}))
    sentences = SENTENCES
    listed = obj.get("sentences")
    if listed is not None:
        if not isinstance(listed, list) or not all(isinstance(s, str) for s in listed):
            raise ConfigError("must be a list of sentence types", path=_at(path, "sentences"))
        unknown = sorted(set(listed) - SENTENCES)
        if unknown:
            raise ConfigError(
                f"cannot decode {', '.join(unknown)} (known: {', '.join(sorted(SENTENCES))})",
                path=_at(path, "sentences"),
            )
        sentences = frozenset(listed)
    return NmeaOptions(
        sentences=sentences,
        require_checksum=_get(obj, "requireChecksum", bool, path, True),
    )


def _jsonl(raw: Any, path: str) -> JsonOptions:
    obj = _obj(raw, path, frozenset({"fields", "onlyMapped"}))
    return JsonOptions(
        fields=_fields(obj, path), only_mapped=_get(obj, "onlyMapped", bool, path, False)
    )


def _regex(raw: Any, path: str) -> RegexOptions:
    obj = _obj(raw, path, frozenset({"pattern", "fields"}))
    source = _get(obj, "pattern", str, path, "")
    if not source:
        raise ConfigError("a regex decoder needs a pattern", path=_at(path, "pattern"))
    try:
        pattern = re.compile(source)
    except re.error as exc:
        raise ConfigError(f"invalid regular expression: {exc}", path=_at(path, "pattern")) from None
    if not pattern.groupindex:
        raise ConfigError("needs at least one named group (?P<name>...)", path=_at(path, "pattern"))
    fields = _fields(obj, path)
    for key in fields:
        if key not in pattern.groupindex:
            raise ConfigError("no such group in the pattern", path=_at(_at(path, "fields"), key))
    return RegexOptions(pattern=pattern, fields=fields)


def _delimited(raw: Any, path: str) -> DelimitedOptions:
    obj = _obj(raw, path, frozenset({"separator", "columns", "fields"}))
    separator = _get(obj, "separator", str, path, ",")
    if not separator:
        raise ConfigError("must not be empty", path=_at(path, "separator"))
    columns = obj.get("columns")
    if (
        not isinstance(columns, list)
        or not columns
        or not all(c is None or isinstance(c, str) for c in columns)
    ):
        raise ConfigError("must be a list of column names (null skips a column)",
                          path=_at(path, "columns"))
    named = [c for c in columns if c]
    if len(set(named)) != len(named):
        raise ConfigError("column names must be unique", path=_at(path, "columns"))
    fields = _fields(obj, path)
    for key in fields:
        if key not in named:
            raise ConfigError("no such column", path=_at(_at(path, "fields"), key))
    return DelimitedOptions(
        columns=tuple(c or None for c in columns), separator=separator, fields=fields
    )


_DECODERS: dict[str, Callable[[Any, str], DecoderOptions]] = {
    "nmea": _nmea, "jsonl": _jsonl, "regex": _regex, "delimited": _delimited,
}

_PORT_KEYS = frozenset({
    "path", "match", "sensor", "baud", "dataBits", "parity", "stopBits", "format", "decoder",
    "maxLine", "terminator", "reconnectMin", "reconnectMax", "silenceTimeout", "enabled",
})


def _port(name: str, raw: Any, path: str) -> PortConfig:
    obj = _obj(raw, path, _PORT_KEYS)
    port_path = _get(obj, "path", str, path, cast(str | None, None))
    rule = parse_rule(name, obj["match"], _at(path, "match")) if obj.get("match") else None
    if (port_path is None) == (rule is None):
        raise ConfigError("give either path or match", path=path)
    if port_path is not None and not port_path.startswith("/"):
        raise ConfigError("must be an absolute path", path=_at(path, "path"))
    fmt = _choice(obj, "format", path, cast(tuple[Format, ...], get_args(Format)), "nmea")
    if fmt in ("regex", "delimited") and not obj.get("decoder"):
        raise ConfigError(f"the {fmt} format needs decoder options", path=_at(path, "decoder"))
    decoder = _DECODERS[fmt](obj.get("decoder") or {}, _at(path, "decoder"))
    baud = _get(obj, "baud", int, path, 9600)
    if not 50 <= baud <= 4_000_000:
        raise ConfigError("must be between 50 and 4000000", path=_at(path, "baud"))
    link = LinkSettings(
        baud=baud,
        data_bits=_choice(obj, "dataBits", path, (5, 6, 7, 8), 8),
        parity=_choice(obj, "parity", path, cast(tuple[Parity, ...], get_args(Parity)), "N"),
        stop_bits=float(_choice(obj, "stopBits", path, (1, 1.5, 2), 1)),
    )
    max_line = _get(obj, "maxLine", int, path, _MAX_LINE[fmt])
    if not 8 <= max_line <= 65536:
        raise ConfigError("must be between 8 and 65536", path=_at(path, "maxLine"))
    terminator = _choice(obj, "terminator", path, ("lf", "cr"), "lf")
    reconnect_min = _positive(obj, "reconnectMin", path, 0.5)
    reconnect_max = _positive(obj, "reconnectMax", path, 30.0)
    if reconnect_max < reconnect_min:
        raise ConfigError("must not be below reconnectMin", path=_at(path, "reconnectMax"))
    silence = obj.get("silenceTimeout")
    sensor = _get(obj, "sensor", str, path, name)
    if not sensor:
        raise ConfigError("must not be empty", path=_at(path, "sensor"))
    return PortConfig(
        name=name,
        sensor=sensor,
        path=port_path,
        match=rule,
        link=link,
        format=fmt,
        decoder=decoder,
        max_line=max_line,
        terminator=_TERMINATORS[terminator],
        reconnect_min=reconnect_min,
        reconnect_max=reconnect_max,
        silence_timeout=None if silence is None else _positive(obj, "silenceTimeout", path, 1.0),
        enabled=_get(obj, "enabled", bool, path, True),
    )


def parse_config(desired: Mapping[str, Any]) -> SerialConfig:
    """The bridge config from the module twin's desired properties (without ``$version`` and
    ``$metadata``). Raises :class:`ConfigError` naming the offending key path."""
    top = _obj(desired, "", frozenset({"ports"}))
    raw_ports = top.get("ports")
    if raw_ports is None:
        raw_ports = {}
    if not isinstance(raw_ports, Mapping):
        raise ConfigError("must be an object of named ports", path="ports")
    ports: dict[str, PortConfig] = {}
    for name, raw in raw_ports.items():
        if raw is None:
            continue  # a twin patch's null: the port was removed
        if not _NAME.fullmatch(name):
            raise ConfigError("port names are 1-64 letters, digits, - or _", path=f"ports.{name}")
        ports[name] = _port(name, raw, f"ports.{name}")
    paths: dict[str, str] = {}
    for port in ports.values():
        if port.path is not None and port.enabled:
            other = paths.setdefault(port.path, port.name)
            if other != port.name:
                raise ConfigError(f"same path as ports.{other}", path=f"ports.{port.name}.path")
    return SerialConfig(ports=ports)
