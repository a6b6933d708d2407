"""Pure serial framing: bytes in, lines out, lines decoded into readings. No I/O.

A serial device sends a byte stream. :class:`LineSplitter` cuts it into lines (bounded: a line
longer than ``max_line`` is dropped and counted, never buffered without limit). A decoder turns
one line into :class:`~hw.readings.Reading` s or raises :class:`FrameError`. Four decoders exist:
NMEA 0183 (:mod:`hw.serial.nmea`), JSON lines, a regular expression with named groups, and
delimited columns. :class:`FrameReader` joins a splitter, a decoder and the counters the bridge
reports (bad checksum, malformed, oversize, ...).

The decoders take ``now`` (epoch seconds at acquisition) from the caller; nothing here reads a
clock, a file or a port.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from gateway.errors import RemoteProtocolError
from hw.readings import Reading, Value

__all__ = [
    "ChecksumError",
    "Counters",
    "Decoder",
    "DelimitedDecoder",
    "DelimitedOptions",
    "FieldSpec",
    "FrameError",
    "FrameReader",
    "JsonLinesDecoder",
    "JsonOptions",
    "LineSplitter",
    "MalformedLine",
    "RegexDecoder",
    "RegexOptions",
    "parse_number",
]


class FrameError(RemoteProtocolError):
    """A line from the device cannot be decoded. Not raised directly: use a subclass."""


class MalformedLine(FrameError):
    """The line breaks its format (bad syntax, wrong field count, a non-number, bad UTF-8)."""


class ChecksumError(FrameError):
    """The line's checksum is wrong or missing (NMEA 0183 §5.3.1: ``*hh`` is required)."""


class Decoder(Protocol):
    """Turns one line (terminator removed) into readings.

    Returns the readings (possibly none), or ``None`` when the line is valid but of a kind this
    decoder does not decode (an NMEA GSV sentence, say). Raises :class:`FrameError` otherwise.
    """

    def decode(self, line: bytes, sensor: str, now: float) -> Sequence[Reading] | None: ...


# ---------------------------------------------------------------------------------------------
# Lines


class LineSplitter:
    """Cuts a byte stream into lines at ``terminator`` (LF by default; a CR before it is
    dropped, so CRLF works too). Memory is bounded by ``max_line``: a longer line is discarded
    up to its terminator and counted once in :attr:`oversize`. Empty lines are skipped."""

    __slots__ = ("_buf", "_discarding", "_max", "_strip", "_term", "oversize")

    def __init__(self, max_line: int = 1024, terminator: bytes = b"\n") -> None:
        if max_line < 1:
            raise ValueError("max_line must be positive")
        if terminator not in (b"\n", b"\r"):
            raise ValueError("terminator must be LF or CR")
        self._max = max_line
        self._term = terminator
        self._strip = b"\r" if terminator == b"\n" else b"\n"
        self._buf = b""
        self._discarding = False
        self.oversize = 0

    def feed(self, data: bytes) -> list[bytes]:
        """Add received bytes; return the lines they complete (without terminators)."""
        buf = self._buf + data if self._buf else data
        term = self._term
        if self._discarding:
            end = buf.find(term)
            if end < 0:
                self._buf = b""
                return []
            buf = buf[end + 1 :]
            self._discarding = False
        parts = buf.split(term)
        tail = parts.pop()
        if len(tail) > self._max:
            self.oversize += 1
            self._discarding = True
            tail = b""
        self._buf = tail
        out: list[bytes] = []
        limit = self._max
        strip = self._strip
        for part in parts:
            if strip == b"\r":
                if part.endswith(b"\r"):
                    part = part[:-1]
            elif part.startswith(b"\n"):
                part = part[1:]
            if len(part) > limit:
                self.oversize += 1
            elif part:
                out.append(part)
        return out

    def reset(self) -> None:
        """Forget a partial line (after the port was reopened)."""
        self._buf = b""
        self._discarding = False


# ---------------------------------------------------------------------------------------------
# Counters and the reader


@dataclass(slots=True)
class Counters:
    """What happened to the lines of one port. Mutable, owned by one :class:`FrameReader`."""

    lines: int = 0  # complete, non-empty lines within the size limit
    decoded: int = 0  # lines that gave readings (or validly gave none)
    ignored: int = 0  # valid lines of a kind not decoded (NMEA GSV, proprietary sentences)
    readings: int = 0
    bad_checksum: int = 0
    malformed: int = 0
    oversize: int = 0

    def as_dict(self) -> dict[str, int]:
        return {
            "lines": self.lines,
            "decoded": self.decoded,
            "ignored": self.ignored,
            "readings": self.readings,
            "badChecksum": self.bad_checksum,
            "malformed": self.malformed,
            "oversize": self.oversize,
        }


class FrameReader:
    """A splitter, a decoder and the counters of one port: bytes in, one batch of readings per
    decoded line out. Bad lines are counted and skipped, never forwarded."""

    __slots__ = ("_decoder", "_splitter", "counters", "last_error", "last_line", "sensor")

    def __init__(
        self,
        sensor: str,
        decoder: Decoder,
        *,
        max_line: int = 1024,
        terminator: bytes = b"\n",
    ) -> None:
        self.sensor = sensor
        self._decoder = decoder
        self._splitter = LineSplitter(max_line, terminator)
        self.counters = Counters()
        self.last_line: bytes | None = None
        self.last_error: str | None = None

    def feed(self, data: bytes, now: float) -> list[Sequence[Reading]]:
        splitter = self._splitter
        lines = splitter.feed(data)
        counters = self.counters
        counters.oversize = splitter.oversize
        if not lines:
            return []
        decode = self._decoder.decode
        sensor = self.sensor
        out: list[Sequence[Reading]] = []
        for line in lines:
            try:
                readings = decode(line, sensor, now)
            except ChecksumError as exc:
                counters.bad_checksum += 1
                self.last_error = str(exc)
                continue
            except FrameError as exc:
                counters.malformed += 1
                self.last_error = str(exc)
                continue
            if readings is None:
                counters.ignored += 1
                continue
            counters.decoded += 1
            if readings:
                counters.readings += len(readings)
                out.append(readings)
        counters.lines += len(lines)
        self.last_line = lines[-1]
        return out

    def reset(self) -> None:
        """Drop a partial line; counters stay (they describe the port, not one connection)."""
        self._splitter.reset()


# ---------------------------------------------------------------------------------------------
# Field specs shared by the JSON, regex and delimited decoders

FieldKind = Literal["number", "string", "bool"]

_TRUE = frozenset({"1", "true", "on", "yes"})
_FALSE = frozenset({"0", "false", "off", "no"})


def parse_number(text: str) -> int | float:
    """A decimal integer or float as devices print them (``21``, ``-0.5``, ``1e3``). Rejects
    what Python would also accept but no sensor means (``nan``, ``inf``, ``1_000``, non-ASCII
    digits)."""
    if "_" in text or not text.isascii():
        raise MalformedLine(f"not a number: {text[:40]!r}")
    try:
        if "." in text or "e" in text or "E" in text:
            value = float(text)
            if not math.isfinite(value):
                raise ValueError
            return value
        return int(text)
    except ValueError:
        raise MalformedLine(f"not a number: {text[:40]!r}") from None


@dataclass(frozen=True, slots=True, kw_only=True)
class FieldSpec:
    """How one raw field becomes a reading: its name, unit, and ``value * scale + offset``."""

    name: str | None = None  # None: the field's own key, group or column name
    unit: str | None = None
    scale: float = 1.0
    offset: float = 0.0
    kind: FieldKind = "number"

    def convert(self, raw: object) -> Value:
        """The reading's value from a raw field (a string, or a JSON value). Raises
        :class:`MalformedLine` when it does not fit ``kind``."""
        if self.kind == "string":
            if isinstance(raw, str | int | float) and not isinstance(raw, bool):
                return str(raw)
            raise MalformedLine(f"not a string: {raw!r:.40}")
        if self.kind == "bool":
            if isinstance(raw, bool):
                return raw
            if isinstance(raw, int) and raw in (0, 1):
                return bool(raw)
            if isinstance(raw, str):
                low = raw.strip().lower()
                if low in _TRUE:
                    return True
                if low in _FALSE:
                    return False
            raise MalformedLine(f"not a boolean: {raw!r:.40}")
        number: int | float
        if isinstance(raw, bool):
            raise MalformedLine(f"not a number: {raw!r}")
        if isinstance(raw, int | float):
            number = raw
        elif isinstance(raw, str):
            number = parse_number(raw)
        else:
            raise MalformedLine(f"not a number: {raw!r:.40}")
        if self.scale != 1.0 or self.offset != 0.0:
            try:
                number = number * self.scale + self.offset
            except OverflowError:  # an integer too large for a float
                raise MalformedLine("number out of range") from None
        if isinstance(number, float) and not math.isfinite(number):
            raise MalformedLine("not a finite number")
        return number


_DEFAULT_SPEC = FieldSpec()


# ---------------------------------------------------------------------------------------------
# JSON lines


@dataclass(frozen=True, slots=True, kw_only=True)
class JsonOptions:
    """One JSON object per line. Every numeric field becomes a reading named by its key path
    (nested objects joined with ``/``: ``{"env": {"t": 1}}`` gives ``env/t``); ``fields`` renames,
    scales, gives units, or admits string and boolean fields; ``only_mapped`` drops the rest."""

    fields: Mapping[str, FieldSpec] = field(default_factory=dict)
    only_mapped: bool = False


def _reject_constant(_name: str) -> None:
    return None  # NaN, Infinity, -Infinity: treated as an absent value


_JSON = json.JSONDecoder(parse_constant=_reject_constant)


def _flatten(obj: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in obj.items():
        path = prefix + key
        if isinstance(value, dict):
            yield from _flatten(value, path + "/")
        else:
            yield path, value


class JsonLinesDecoder:
    """JSON lines (RFC 8259 values, one object per line)."""

    __slots__ = ("_fields", "_only_mapped")

    def __init__(self, options: JsonOptions) -> None:
        self._fields = dict(options.fields)
        self._only_mapped = options.only_mapped

    def decode(self, line: bytes, sensor: str, now: float) -> Sequence[Reading] | None:
        try:
            obj = _JSON.decode(line.decode("utf-8"))
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
            raise MalformedLine(f"not JSON: {exc}") from None
        if not isinstance(obj, dict):
            raise MalformedLine("not a JSON object")
        fields = self._fields
        out: list[Reading] = []
        for key, value in _flatten(obj):
            if value is None:
                continue
            spec = fields.get(key)
            if spec is None:
                if self._only_mapped:
                    continue
                if isinstance(value, int | float) and not isinstance(value, bool):
                    out.append(Reading(sensor, key, value, None, now))
                continue
            out.append(Reading(sensor, spec.name or key, spec.convert(value), spec.unit, now))
        return out


# ---------------------------------------------------------------------------------------------
# Regular expression


@dataclass(frozen=True, slots=True, kw_only=True)
class RegexOptions:
    """A regular expression (Python syntax, searched in the line) whose named groups are the
    readings: ``T=(?P<temperature>-?[0-9.]+)`` with ``fields={"temperature": FieldSpec(unit=
    "Cel")}``. A line that does not match is malformed; a group that did not take part is
    skipped."""

    pattern: re.Pattern[str]
    fields: Mapping[str, FieldSpec] = field(default_factory=dict)


class RegexDecoder:
    __slots__ = ("_groups", "_search")

    def __init__(self, options: RegexOptions) -> None:
        self._search = options.pattern.search
        self._groups = [
            (group, spec.name or group, spec)
            for group in options.pattern.groupindex
            for spec in (options.fields.get(group, _DEFAULT_SPEC),)
        ]

    def decode(self, line: bytes, sensor: str, now: float) -> Sequence[Reading] | None:
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            raise MalformedLine("not UTF-8") from None
        match = self._search(text)
        if match is None:
            raise MalformedLine(f"no match: {text[:40]!r}")
        out: list[Reading] = []
        for group, name, spec in self._groups:
            raw = match.group(group)
            if raw is not None and raw != "":
                out.append(Reading(sensor, name, spec.convert(raw), spec.unit, now))
        return out


# ---------------------------------------------------------------------------------------------
# Delimited columns


@dataclass(frozen=True, slots=True, kw_only=True)
class DelimitedOptions:
    """Columns cut at ``separator`` (``21.5,40,1013``). ``columns`` names them in order; a
    ``None`` column is skipped. A line with another column count is malformed; an empty value
    is an absent reading. ``fields`` gives units, scale and kind per column name."""

    columns: tuple[str | None, ...]
    separator: str = ","
    fields: Mapping[str, FieldSpec] = field(default_factory=dict)


class DelimitedDecoder:
    __slots__ = ("_columns", "_count", "_sep")

    def __init__(self, options: DelimitedOptions) -> None:
        self._sep = options.separator
        self._count = len(options.columns)
        self._columns = [
            (index, spec.name or column, spec)
            for index, column in enumerate(options.columns)
            if column
            for spec in (options.fields.get(column, _DEFAULT_SPEC),)
        ]

    def decode(self, line: bytes, sensor: str, now: float) -> Sequence[Reading] | None:
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            raise MalformedLine("not UTF-8") from None
        parts = text.split(self._sep)
        if len(parts) != self._count:
            raise MalformedLine(f"{len(parts)} columns, expected {self._count}")
        out: list[Reading] = []
        for index, name, spec in self._columns:
            raw = parts[index].strip()
            if raw:
                out.append(Reading(sensor, name, spec.convert(raw), spec.unit, now))
        return out
