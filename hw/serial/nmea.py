"""Pure NMEA 0183 decoding: GGA, RMC, GSA and VTG sentences with checksum verification.

Sentence layout (NMEA 0183 v4.10 §5.3): ``$`` + address (talker ``GP``/``GN``/``GL``/``GA``/
``GB``/``BD``... + three-letter type) + ``,``-separated fields + ``*`` + two hex digits, the XOR
of every byte between ``$`` and ``*`` (§5.3.1; required). A sentence is at most 82 characters
including ``$`` and CRLF (§5.3). Proprietary sentences (``$P...``, e.g. u-blox ``PUBX``) and
encapsulated ones (``!AIVDM``) are checked and then ignored.

Readings and units (UCUM): ``latitude``/``longitude`` in decimal degrees (``deg``, south and
west negative), ``altitude`` and ``geoidSeparation`` in ``m`` (GGA fields 9 and 11),
``speed`` in ``m/s`` (converted from knots or km/h), ``course``/``courseMagnetic``/
``magneticVariation`` in ``deg``, ``fixQuality`` (GGA field 6: 0 none, 1 GPS, 2 DGPS, 4 RTK
fixed, 5 RTK float, 6 dead reckoning...), ``fixType`` (GSA: 1 none, 2 2D, 3 3D), ``fixValid``
(RMC status ``A`` and mode not ``N``), ``satellites`` (in use), ``hdop``/``pdop``/``vdop``,
``utcTime`` (GGA, ``HH:MM:SS[.ss]``) and ``utcDateTime`` (RMC, ISO 8601 with ``Z``; the two-digit
year is taken as 1980-2079, the GPS era). Without a fix, only the fix state and time are given.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from hw.readings import Reading
from hw.serial.framing import ChecksumError, MalformedLine

__all__ = ["SENTENCES", "NmeaDecoder", "NmeaOptions", "checksum", "with_checksum"]

SENTENCES = frozenset({"GGA", "RMC", "GSA", "VTG"})

_KNOT = 1852.0 / 3600.0  # m/s
_KMH = 1.0 / 3.6  # m/s

# Folding XOR: the whole body as one integer, halved until one byte remains. About twice as
# fast as a byte loop in CPython (see tests/bench/serial_decode.py).
_FOLDS = tuple((8 * w, (1 << (8 * w)) - 1, w) for w in (128, 64, 32, 16, 8, 4, 2, 1))
_HEX = {f"{i:02X}".encode(): i for i in range(256)} | {f"{i:02x}".encode(): i for i in range(256)}


def checksum(body: bytes) -> int:
    """XOR of all bytes of ``body`` (the part between ``$`` and ``*``), NMEA 0183 §5.3.1."""
    value = int.from_bytes(body, "little")
    size = len(body)
    if size > 256:
        result = 0
        for byte in body:
            result ^= byte
        return result
    for shift, mask, width in _FOLDS:
        if size > width:
            value = (value >> shift) ^ (value & mask)
            size = width
    return value


def with_checksum(body: str) -> bytes:
    """``$body*hh`` (for tests and simulators)."""
    raw = body.encode("ascii")
    return b"$" + raw + f"*{checksum(raw):02X}".encode()


@dataclass(frozen=True, slots=True, kw_only=True)
class NmeaOptions:
    sentences: frozenset[str] = SENTENCES  # sentence types decoded; others are ignored
    require_checksum: bool = True  # NMEA 0183 v4 requires it; some old receivers omit it


Handler = Callable[[list[bytes], str, float], list[Reading]]


class NmeaDecoder:
    """One NMEA sentence (without CRLF) -> readings; see the module docstring."""

    __slots__ = ("_handlers", "_require")

    def __init__(self, options: NmeaOptions = NmeaOptions()) -> None:
        unknown = options.sentences - SENTENCES
        if unknown:
            raise ValueError(f"cannot decode {sorted(unknown)}")
        self._handlers = {name.encode(): _HANDLERS[name] for name in options.sentences}
        self._require = options.require_checksum

    def decode(self, line: bytes, sensor: str, now: float) -> Sequence[Reading] | None:
        if not line or line[0] not in (0x24, 0x21):  # "$", "!"
            raise MalformedLine(f"not an NMEA sentence: {line[:20]!r}")
        star = line.rfind(b"*")
        if star < 0:
            if self._require:
                raise ChecksumError("missing checksum")
            body = line[1:]
        else:
            body = line[1:star]
            expected = _HEX.get(line[star + 1 :])
            if expected is None:
                raise ChecksumError(f"bad checksum field {line[star + 1 :][:8]!r}")
            actual = checksum(body)
            if actual != expected:
                raise ChecksumError(f"checksum {expected:02X} given, {actual:02X} computed")
        fields = body.split(b",")
        address = fields[0]
        if address[:1] == b"P" or line[0] == 0x21:
            return None  # proprietary or encapsulated: valid, not decoded
        if len(address) != 5 or not address.isalnum():
            raise MalformedLine(f"bad address {address[:8]!r}")
        handler = self._handlers.get(address[2:])
        if handler is None:
            return None
        try:
            return handler(fields, sensor, now)
        except (ValueError, IndexError) as exc:
            raise MalformedLine(f"{address.decode()}: {exc}") from None


# ---------------------------------------------------------------------------------------------
# Field parsers. Each raises ValueError (or MalformedLine) on a bad field.


def _uint(raw: bytes) -> int:
    if not raw.isdigit():
        raise ValueError(f"not an unsigned integer: {raw!r}")
    return int(raw)


def _float(raw: bytes) -> float:
    value = float(raw)
    if not math.isfinite(value):
        raise ValueError(f"not finite: {raw!r}")
    return value


def _coord(raw: bytes, hemisphere: bytes, max_degrees: int) -> float:
    """``ddmm.mmmm`` / ``dddmm.mmmm`` plus N/S or E/W -> signed decimal degrees."""
    dot = raw.find(b".")
    end = dot if dot >= 0 else len(raw)
    if end < 3 or not raw[:end].isdigit():
        raise ValueError(f"bad coordinate {raw!r}")
    degrees = int(raw[: end - 2])
    minutes = _float(raw[end - 2 :])
    value = degrees + minutes / 60.0
    if not (minutes < 60.0 and value <= max_degrees):
        raise ValueError(f"coordinate out of range {raw!r}")
    if hemisphere in (b"S", b"W"):
        value = -value
    elif hemisphere not in (b"N", b"E"):
        raise ValueError(f"bad hemisphere {hemisphere!r}")
    return round(value, 8)


def _time(raw: bytes) -> str:
    """``hhmmss[.ss]`` -> ``HH:MM:SS[.ss]``."""
    if len(raw) < 6 or not raw[:6].isdigit():
        raise ValueError(f"bad time {raw!r}")
    hours, minutes = int(raw[0:2]), int(raw[2:4])
    seconds = raw[4:].decode("ascii")
    if not (hours < 24 and minutes < 60 and _float(raw[4:]) < 61.0):
        raise ValueError(f"time out of range {raw!r}")
    return f"{raw[0:2].decode()}:{raw[2:4].decode()}:{seconds}"


def _date(raw: bytes) -> str:
    """``ddmmyy`` -> ``YYYY-MM-DD`` (years 80-99 are 19xx, 00-79 are 20xx)."""
    if len(raw) != 6 or not raw.isdigit():
        raise ValueError(f"bad date {raw!r}")
    day, month, year = int(raw[0:2]), int(raw[2:4]), int(raw[4:6])
    if not (1 <= day <= 31 and 1 <= month <= 12):
        raise ValueError(f"date out of range {raw!r}")
    year += 1900 if year >= 80 else 2000
    return f"{year:04d}-{month:02d}-{day:02d}"


# ---------------------------------------------------------------------------------------------
# Sentence handlers (NMEA 0183 v4.10 §6.3), fields[0] is the address.


def _gga(f: list[bytes], sensor: str, now: float) -> list[Reading]:
    """GGA: time, lat, N/S, lon, E/W, quality, satellites, HDOP, altitude, M, geoid sep., M,
    DGPS age, DGPS station (14 fields)."""
    if len(f) < 15:
        raise MalformedLine(f"GGA has {len(f) - 1} fields, expected 14")
    out: list[Reading] = []
    if f[1]:
        out.append(Reading(sensor, "utcTime", _time(f[1]), None, now))
    quality = _uint(f[6]) if f[6] else 0
    out.append(Reading(sensor, "fixQuality", quality, None, now))
    if f[7]:
        out.append(Reading(sensor, "satellites", _uint(f[7]), None, now))
    if quality == 0:
        return out
    if f[2] and f[4]:
        out.append(Reading(sensor, "latitude", _coord(f[2], f[3], 90), "deg", now))
        out.append(Reading(sensor, "longitude", _coord(f[4], f[5], 180), "deg", now))
    if f[8]:
        out.append(Reading(sensor, "hdop", _float(f[8]), None, now))
    if f[9] and f[10] == b"M":
        out.append(Reading(sensor, "altitude", _float(f[9]), "m", now))
    if f[11] and f[12] == b"M":
        out.append(Reading(sensor, "geoidSeparation", _float(f[11]), "m", now))
    return out


def _rmc(f: list[bytes], sensor: str, now: float) -> list[Reading]:
    """RMC: time, status A/V, lat, N/S, lon, E/W, speed kn, course, date, mag. var., E/W,
    [mode (2.3+)], [nav. status (4.1+)]."""
    if len(f) < 12:
        raise MalformedLine(f"RMC has {len(f) - 1} fields, expected at least 11")
    out: list[Reading] = []
    if f[1] and f[9]:
        stamp = f"{_date(f[9])}T{_time(f[1])}Z"
        out.append(Reading(sensor, "utcDateTime", stamp, None, now))
    mode = f[12] if len(f) > 12 else b""
    valid = f[2] == b"A" and mode != b"N"
    if f[2] not in (b"A", b"V"):
        raise ValueError(f"bad status {f[2]!r}")
    out.append(Reading(sensor, "fixValid", valid, None, now))
    if not valid:
        return out
    if f[3] and f[5]:
        out.append(Reading(sensor, "latitude", _coord(f[3], f[4], 90), "deg", now))
        out.append(Reading(sensor, "longitude", _coord(f[5], f[6], 180), "deg", now))
    if f[7]:
        out.append(Reading(sensor, "speed", round(_float(f[7]) * _KNOT, 3), "m/s", now))
    if f[8]:
        out.append(Reading(sensor, "course", _float(f[8]), "deg", now))
    if f[10]:
        variation = _float(f[10])
        if f[11] == b"W":
            variation = -variation
        elif f[11] != b"E":
            raise ValueError(f"bad variation direction {f[11]!r}")
        out.append(Reading(sensor, "magneticVariation", variation, "deg", now))
    return out


def _gsa(f: list[bytes], sensor: str, now: float) -> list[Reading]:
    """GSA: mode M/A, fix type 1-3, 12 satellite ids, PDOP, HDOP, VDOP, [system id (4.1+)]."""
    if len(f) < 18:
        raise MalformedLine(f"GSA has {len(f) - 1} fields, expected at least 17")
    out: list[Reading] = []
    fix_type = _uint(f[2]) if f[2] else 1
    out.append(Reading(sensor, "fixType", fix_type, None, now))
    if fix_type < 2:
        return out
    for index, name in ((15, "pdop"), (16, "hdop"), (17, "vdop")):
        if f[index]:
            out.append(Reading(sensor, name, _float(f[index]), None, now))
    return out


def _vtg(f: list[bytes], sensor: str, now: float) -> list[Reading]:
    """VTG: course true, T, course magnetic, M, speed kn, N, speed km/h, K, [mode (2.3+)]."""
    if len(f) < 9 or f[2] != b"T":
        raise MalformedLine("VTG needs the NMEA 2.0+ layout (course,T,course,M,kn,N,km/h,K)")
    if len(f) > 9 and f[9] == b"N":
        return []
    out: list[Reading] = []
    if f[1]:
        out.append(Reading(sensor, "course", _float(f[1]), "deg", now))
    if f[3]:
        out.append(Reading(sensor, "courseMagnetic", _float(f[3]), "deg", now))
    if f[7]:
        out.append(Reading(sensor, "speed", round(_float(f[7]) * _KMH, 3), "m/s", now))
    elif f[5]:
        out.append(Reading(sensor, "speed", round(_float(f[5]) * _KNOT, 3), "m/s", now))
    return out


_HANDLERS: dict[str, Handler] = {"GGA": _gga, "RMC": _rmc, "GSA": _gsa, "VTG": _vtg}
