"""BLE advertisement and GATT value decoders, and per-device de-duplication. Pure.

Formats (facts from the public specs; the code is ours):

* **BTHome v2** -- service data, 16-bit UUID 0xFCD2 (bthome.io/format): one device-information
  byte (bit 0 encryption, bit 2 trigger-based, bits 5-7 version = 2), then objects, each an
  object id and a fixed-size little-endian value scaled by a factor (table below). Encrypted
  payloads (bthome.io/encryption): ciphertext, 4-byte counter (LE), 4-byte MIC; AES-CCM with the
  16-byte bindkey and nonce = MAC (6) + UUID (``D2 FC``) + device-information byte + counter.
* **Ruuvi RAWv2 / data format 5** -- manufacturer data of company 0x0499 (docs.ruuvi.com,
  "Data format 5 (RAWv2)"): 24 bytes big-endian; temperature 0.005 degC, humidity 0.0025 %,
  pressure Pa - 50000, acceleration mG, battery mV - 1600 (11 bits) with TX power
  -40 dBm + 2 dBm steps (5 bits), movement counter, measurement sequence, MAC.
* **pvvx custom** -- service data 0x181A, 15 bytes little-endian (github.com/pvvx/ATC_MiThermometer,
  "Custom format"): MAC (reversed), temperature 0.01 degC, humidity 0.01 %, battery mV,
  battery %, measurement counter, flags.
* **ATC1441** -- service data 0x181A, 13 bytes big-endian (same README, "atc1441 format"): MAC,
  temperature 0.1 degC, humidity %, battery %, battery mV, frame counter.
* **GATT Environmental Sensing** (GATT Specification Supplement §3.204, §3.124, §3.181):
  Temperature 0x2A6E sint16 0.01 degC, Humidity 0x2A6F uint16 0.01 %, Pressure 0x2A6D
  uint32 0.1 Pa.

Units are UCUM-style ("Cel", "%", "hPa", "V"); pressure is always reported in hPa.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum, StrEnum
from typing import NamedTuple

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESCCM

from gateway.errors import RemoteProtocolError
from hw.readings import Reading, Value


def uuid16(short: int) -> str:
    """The 128-bit form of a 16-bit Bluetooth UUID, as BlueZ and bleak spell it."""
    return f"0000{short:04x}-0000-1000-8000-00805f9b34fb"


BTHOME_UUID = uuid16(0xFCD2)
ENV_SENSING_UUID = uuid16(0x181A)
RUUVI_COMPANY_ID = 0x0499
TEMPERATURE_UUID = uuid16(0x2A6E)
HUMIDITY_UUID = uuid16(0x2A6F)
PRESSURE_UUID = uuid16(0x2A6D)


class DecoderKind(StrEnum):
    BTHOME = "bthome"
    RUUVI = "ruuvi"  # data format 5 (RAWv2)
    ATC = "atc"  # 0x181A service data: pvvx custom or ATC1441, told apart by length
    PVVX = "pvvx"
    ATC1441 = "atc1441"


class AdvertisementError(RemoteProtocolError):
    """An advertisement payload is malformed or of an unsupported format version."""


class DecryptError(AdvertisementError):
    """An encrypted BTHome payload could not be decrypted (no bindkey, or MIC mismatch)."""


@dataclass(frozen=True, slots=True)
class Advertisement:
    """One advertisement as heard by the central, stamped when it was received."""

    address: str  # "A4:C1:38:12:34:56", upper case
    rssi: int
    received: float  # epoch seconds
    manufacturer_data: Mapping[int, bytes]
    service_data: Mapping[str, bytes]  # 128-bit UUID (lower case) -> payload after the UUID
    name: str | None = None


class Measure(NamedTuple):
    name: str
    value: Value
    unit: str | None


@dataclass(frozen=True, slots=True)
class Decoded:
    """What one payload said. ``counter`` is the format's packet counter (BTHome packet id or
    encryption counter, pvvx/ATC frame counter, Ruuvi measurement sequence), or None when the
    payload carries none; ``raw`` is the payload, the de-duplication key in that case."""

    kind: DecoderKind
    measures: tuple[Measure, ...]
    counter: int | None
    raw: bytes
    encrypted: bool = False

    def readings(self, sensor: str, acquired: float) -> list[Reading]:
        return [Reading(sensor, m.name, m.value, m.unit, acquired) for m in self.measures]


class BindKey:
    """A 16-byte AES-CCM key with its cipher prepared once. Its repr never shows the key."""

    __slots__ = ("_aead",)

    def __init__(self, key: bytes) -> None:
        if len(key) != 16:
            raise ValueError("a bindkey is 16 bytes (32 hex digits)")
        self._aead = AESCCM(key, tag_length=4)

    @classmethod
    def from_hex(cls, text: str) -> BindKey:
        try:
            key = bytes.fromhex(text)
        except ValueError:
            raise ValueError("a bindkey is 32 hex digits") from None
        return cls(key)

    def decrypt(self, nonce: bytes, ciphertext_and_mic: bytes) -> bytes:
        return self._aead.decrypt(nonce, ciphertext_and_mic, None)

    def encrypt(self, nonce: bytes, plaintext: bytes) -> bytes:
        """Ciphertext + 4-byte MIC (for building test frames and benchmarks)."""
        return self._aead.encrypt(nonce, plaintext, None)

    def __repr__(self) -> str:
        return "BindKey(<redacted>)"


def mac_bytes(address: str) -> bytes:
    """``"A4:C1:38:12:34:56"`` -> 6 bytes in the order written (the BTHome nonce order)."""
    raw = bytes.fromhex(address.replace(":", "").replace("-", ""))
    if len(raw) != 6:
        raise ValueError(f"not a MAC address: {address!r}")
    return raw


# --- BTHome v2 ---------------------------------------------------------------------------------

class _Kind(Enum):
    NUMBER = 0
    BINARY = 1
    TEXT = 2
    RAW = 3
    BUTTON = 4
    DIMMER = 5


@dataclass(frozen=True, slots=True)
class _Obj:
    name: str
    size: int
    signed: bool = False
    mul: int = 1  # value = raw * mul / div (div 1 keeps integers exact)
    div: int = 1
    unit: str | None = None
    kind: _Kind = _Kind.NUMBER


def _n(name: str, size: int, unit: str | None = None, *, signed: bool = False, div: int = 1,
       mul: int = 1) -> _Obj:
    return _Obj(name, size, signed, mul, div, unit)


def _b(name: str) -> _Obj:
    return _Obj(name, 1, kind=_Kind.BINARY)


# bthome.io/format, "Sensor data", "Binary sensor data", "Events". 0x00 (packet id) is the
# de-duplication counter and is not reported as a reading.
BTHOME_OBJECTS: dict[int, _Obj] = {
    0x01: _n("battery", 1, "%"),
    0x02: _n("temperature", 2, "Cel", signed=True, div=100),
    0x03: _n("humidity", 2, "%", div=100),
    0x04: _n("pressure", 3, "hPa", div=100),
    0x05: _n("illuminance", 3, "lx", div=100),
    0x06: _n("mass", 2, "kg", div=100),
    0x07: _n("mass", 2, "[lb_av]", div=100),
    0x08: _n("dewPoint", 2, "Cel", signed=True, div=100),
    0x09: _n("count", 1),
    0x0A: _n("energy", 3, "kWh", div=1000),
    0x0B: _n("power", 3, "W", div=100),
    0x0C: _n("voltage", 2, "V", div=1000),
    0x0D: _n("pm25", 2, "ug/m3"),
    0x0E: _n("pm10", 2, "ug/m3"),
    0x0F: _b("generic"),
    0x10: _b("powerOn"),
    0x11: _b("opening"),
    0x12: _n("co2", 2, "[ppm]"),
    0x13: _n("tvoc", 2, "ug/m3"),
    0x14: _n("moisture", 2, "%", div=100),
    0x15: _b("batteryLow"),
    0x16: _b("batteryCharging"),
    0x17: _b("carbonMonoxide"),
    0x18: _b("cold"),
    0x19: _b("connectivity"),
    0x1A: _b("door"),
    0x1B: _b("garageDoor"),
    0x1C: _b("gasDetected"),
    0x1D: _b("heat"),
    0x1E: _b("light"),
    0x1F: _b("lock"),
    0x20: _b("moistureDetected"),
    0x21: _b("motion"),
    0x22: _b("moving"),
    0x23: _b("occupancy"),
    0x24: _b("plug"),
    0x25: _b("presence"),
    0x26: _b("problem"),
    0x27: _b("running"),
    0x28: _b("safety"),
    0x29: _b("smoke"),
    0x2A: _b("sound"),
    0x2B: _b("tamper"),
    0x2C: _b("vibration"),
    0x2D: _b("window"),
    0x2E: _n("humidity", 1, "%"),
    0x2F: _n("moisture", 1, "%"),
    0x3A: _Obj("button", 1, kind=_Kind.BUTTON),
    0x3C: _Obj("dimmer", 2, kind=_Kind.DIMMER),
    0x3D: _n("count", 2),
    0x3E: _n("count", 4),
    0x3F: _n("rotation", 2, "deg", signed=True, div=10),
    0x40: _n("distance", 2, "mm"),
    0x41: _n("distance", 2, "m", div=10),
    0x42: _n("duration", 3, "s", div=1000),
    0x43: _n("current", 2, "A", div=1000),
    0x44: _n("speed", 2, "m/s", div=100),
    0x45: _n("temperature", 2, "Cel", signed=True, div=10),
    0x46: _n("uvIndex", 1, None, div=10),
    0x47: _n("volume", 2, "L", div=10),
    0x48: _n("volume", 2, "mL"),
    0x49: _n("volumeFlowRate", 2, "m3/h", div=1000),
    0x4A: _n("voltage", 2, "V", div=10),
    0x4B: _n("gas", 3, "m3", div=1000),
    0x4C: _n("gas", 4, "m3", div=1000),
    0x4D: _n("energy", 4, "kWh", div=1000),
    0x4E: _n("volume", 4, "L", div=1000),
    0x4F: _n("water", 4, "L", div=1000),
    0x50: _n("timestamp", 4, "s"),
    0x51: _n("acceleration", 2, "m/s2", div=1000),
    0x52: _n("gyroscope", 2, "deg/s", div=1000),
    0x53: _Obj("text", 0, kind=_Kind.TEXT),
    0x54: _Obj("raw", 0, kind=_Kind.RAW),
    0x55: _n("volumeStorage", 4, "L", div=1000),
    0x56: _n("conductivity", 2, "uS/cm"),
    0x57: _n("temperature", 1, "Cel", signed=True),
    0x58: _n("temperature", 1, "Cel", signed=True, mul=35, div=100),
    0x59: _n("count", 1, signed=True),
    0x5A: _n("count", 2, signed=True),
    0x5B: _n("count", 4, signed=True),
    0x5C: _n("power", 4, "W", signed=True, div=100),
    0x5D: _n("current", 2, "A", signed=True, div=1000),
    0x5E: _n("direction", 2, "deg", div=100),
    0x5F: _n("precipitation", 2, "mm", div=10),
    0x60: _n("channel", 1),
    0x61: _n("rotationalSpeed", 2, "1/min"),
    0x62: _n("speed", 4, "m/s", signed=True, div=1_000_000),
    0x63: _n("acceleration", 4, "m/s2", signed=True, div=1_000_000),
    0x64: _n("lightLevel", 1),
}
# Device information objects (device type id, firmware version): skipped, not readings.
_BTHOME_SKIP = {0xF0: 2, 0xF1: 4, 0xF2: 3}
_PACKET_ID = 0x00
_BUTTON_EVENTS = {1: "press", 2: "double_press", 3: "triple_press", 4: "long_press",
                  5: "long_double_press", 6: "long_triple_press", 0x80: "hold_press",
                  0xFE: "hold_press"}
_DIMMER_EVENTS = {1: "rotate_left", 2: "rotate_right"}
_BTHOME_UUID_LE = b"\xd2\xfc"


def decode_bthome(data: bytes, mac: bytes, key: BindKey | None = None) -> Decoded:
    """Decode BTHome v2 service data (the bytes after the UUID). ``mac`` is the sender's
    address (6 bytes as written), needed for the nonce of encrypted payloads."""
    if not data:
        raise AdvertisementError("BTHome: empty service data")
    info = data[0]
    version = info >> 5
    if version != 2:
        raise AdvertisementError(f"BTHome: version {version} not supported")
    counter: int | None = None
    encrypted = bool(info & 0x01)
    if encrypted:
        if len(data) < 1 + 8:  # info, counter, MIC (the ciphertext may be empty)
            raise AdvertisementError("BTHome: encrypted payload too short")
        if key is None:
            raise DecryptError("BTHome: encrypted payload but no bindkey")
        ctr = data[-8:-4]
        nonce = mac + _BTHOME_UUID_LE + data[:1] + ctr
        try:
            plain = key.decrypt(nonce, data[1:-8] + data[-4:])
        except InvalidTag:
            raise DecryptError("BTHome: MIC mismatch (wrong bindkey or corrupted)") from None
        counter = int.from_bytes(ctr, "little")
    else:
        plain = data[1:]
    measures, packet_id = _bthome_objects(plain)
    if counter is None:
        counter = packet_id
    return Decoded(DecoderKind.BTHOME, measures, counter, data, encrypted)


def _bthome_objects(p: bytes) -> tuple[tuple[Measure, ...], int | None]:
    out: list[Measure] = []
    seen: dict[str, int] = {}
    packet_id: int | None = None
    i, n = 0, len(p)
    while i < n:
        oid = p[i]
        i += 1
        obj = BTHOME_OBJECTS.get(oid)
        if obj is None:
            if oid == _PACKET_ID:
                if i + 1 > n:
                    raise AdvertisementError("BTHome: truncated packet id")
                packet_id = p[i]
                i += 1
                continue
            skip = _BTHOME_SKIP.get(oid)
            if skip is None:
                break  # bthome.io: a receiver stops at the first object id it does not know
            i += skip
            if i > n:
                raise AdvertisementError(f"BTHome: truncated object 0x{oid:02x}")
            continue
        size = obj.size
        if obj.kind is _Kind.TEXT or obj.kind is _Kind.RAW:
            if i >= n:
                raise AdvertisementError(f"BTHome: truncated object 0x{oid:02x}")
            size = p[i]
            i += 1
        end = i + size
        if end > n:
            raise AdvertisementError(f"BTHome: truncated object 0x{oid:02x}")
        value: Value
        kind = obj.kind
        if kind is _Kind.NUMBER:
            raw = int.from_bytes(p[i:end], "little", signed=obj.signed)
            value = raw * obj.mul / obj.div if obj.div != 1 else raw * obj.mul
        elif kind is _Kind.BINARY:
            value = p[i] != 0
        elif kind is _Kind.BUTTON:
            event = _BUTTON_EVENTS.get(p[i])
            i = end
            if event is None:
                continue  # 0x00: no event
            value = event
        elif kind is _Kind.DIMMER:
            event = _DIMMER_EVENTS.get(p[i])
            steps = p[i + 1]
            i = end
            if event is None:
                continue
            value = f"{event}:{steps}"
        elif kind is _Kind.TEXT:
            value = p[i:end].decode("utf-8", "replace")
        else:
            value = p[i:end].hex()
        i = end
        name = obj.name
        count = seen.get(name, 0) + 1
        seen[name] = count
        out.append(Measure(name if count == 1 else f"{name}{count}", value, obj.unit))
    return tuple(out), packet_id


def encode_bthome(measures: bytes, *, mac: bytes | None = None, key: BindKey | None = None,
                  counter: int = 0, trigger: bool = False) -> bytes:
    """Build BTHome v2 service data from raw object bytes (``02CA09 03BF13``): plain, or
    encrypted when ``key`` is given. The inverse of :func:`decode_bthome`, for tests, benches
    and simulators."""
    info = 0x40 | (0x04 if trigger else 0)
    if key is None:
        return bytes([info]) + measures
    if mac is None:
        raise ValueError("an encrypted BTHome payload needs the MAC for its nonce")
    info |= 0x01
    ctr = counter.to_bytes(4, "little")
    sealed = key.encrypt(mac + _BTHOME_UUID_LE + bytes([info]) + ctr, measures)
    return bytes([info]) + sealed[:-4] + ctr + sealed[-4:]


# --- Ruuvi data format 5 -------------------------------------------------------------------------

_DF5 = struct.Struct(">BhHHhhhHBH6s")


def decode_ruuvi(data: bytes) -> Decoded:
    """Decode Ruuvi RAWv2 (data format 5) manufacturer data (the bytes after company 0x0499).
    Fields at their "not available" value are left out."""
    if len(data) < _DF5.size:
        if data and data[0] != 5:
            raise AdvertisementError(f"Ruuvi: data format {data[0]} not supported")
        raise AdvertisementError(f"Ruuvi: data format 5 is 24 bytes, got {len(data)}")
    fmt, t, h, p, ax, ay, az, power, moves, seq, _mac = _DF5.unpack_from(data)
    if fmt != 5:
        raise AdvertisementError(f"Ruuvi: data format {fmt} not supported")
    out: list[Measure] = []
    if t != -0x8000:
        out.append(Measure("temperature", t / 200, "Cel"))
    if h != 0xFFFF:
        out.append(Measure("humidity", h / 400, "%"))
    if p != 0xFFFF:
        out.append(Measure("pressure", (p + 50000) / 100, "hPa"))
    if ax != -0x8000:
        out.append(Measure("accelerationX", ax / 1000, "[g]"))
    if ay != -0x8000:
        out.append(Measure("accelerationY", ay / 1000, "[g]"))
    if az != -0x8000:
        out.append(Measure("accelerationZ", az / 1000, "[g]"))
    mv = power >> 5
    if mv != 0x7FF:
        out.append(Measure("batteryVoltage", (mv + 1600) / 1000, "V"))
    tx = power & 0x1F
    if tx != 0x1F:
        out.append(Measure("txPower", tx * 2 - 40, "dBm"))
    if moves != 0xFF:
        out.append(Measure("movementCounter", moves, None))
    return Decoded(DecoderKind.RUUVI, tuple(out), None if seq == 0xFFFF else seq, data[:24])


# --- Xiaomi LYWSD03MMC custom firmware (pvvx / ATC1441) -----------------------------------------

_PVVX = struct.Struct("<6shHHBBB")
_ATC1441 = struct.Struct(">6shBBHB")


def decode_pvvx(data: bytes) -> Decoded:
    """pvvx custom format (15 bytes, little-endian)."""
    if len(data) != _PVVX.size:
        raise AdvertisementError(f"pvvx: custom format is 15 bytes, got {len(data)}")
    _mac, t, h, mv, pct, counter, _flags = _PVVX.unpack(data)
    return Decoded(DecoderKind.PVVX, (
        Measure("temperature", t / 100, "Cel"),
        Measure("humidity", h / 100, "%"),
        Measure("battery", pct, "%"),
        Measure("batteryVoltage", mv / 1000, "V"),
    ), counter, data)


def decode_atc1441(data: bytes) -> Decoded:
    """ATC1441 format (13 bytes, big-endian)."""
    if len(data) != _ATC1441.size:
        raise AdvertisementError(f"ATC1441: format is 13 bytes, got {len(data)}")
    _mac, t, h, pct, mv, counter = _ATC1441.unpack(data)
    return Decoded(DecoderKind.ATC1441, (
        Measure("temperature", t / 10, "Cel"),
        Measure("humidity", h, "%"),
        Measure("battery", pct, "%"),
        Measure("batteryVoltage", mv / 1000, "V"),
    ), counter, data)


def decode_atc(data: bytes) -> Decoded:
    """0x181A service data from ATC_MiThermometer firmware: pvvx (15 bytes) or ATC1441 (13)."""
    if len(data) == _PVVX.size:
        return decode_pvvx(data)
    if len(data) == _ATC1441.size:
        return decode_atc1441(data)
    raise AdvertisementError(f"ATC: 0x181A service data of {len(data)} bytes is neither "
                             "pvvx (15) nor ATC1441 (13)")


# --- dispatch ----------------------------------------------------------------------------------

def payload_for(kind: DecoderKind, adv: Advertisement) -> bytes | None:
    """The part of an advertisement a decoder reads, or None when the advertisement has none
    (a device may alternate formats or advertise other data)."""
    if kind is DecoderKind.BTHOME:
        return adv.service_data.get(BTHOME_UUID)
    if kind is DecoderKind.RUUVI:
        return adv.manufacturer_data.get(RUUVI_COMPANY_ID)
    return adv.service_data.get(ENV_SENSING_UUID)


def decode(kind: DecoderKind, payload: bytes, mac: bytes, key: BindKey | None = None) -> Decoded:
    """Decode ``payload`` (from :func:`payload_for`) with the decoder ``kind``."""
    if kind is DecoderKind.BTHOME:
        return decode_bthome(payload, mac, key)
    if kind is DecoderKind.RUUVI:
        return decode_ruuvi(payload)
    if kind is DecoderKind.ATC:
        return decode_atc(payload)
    if kind is DecoderKind.PVVX:
        return decode_pvvx(payload)
    return decode_atc1441(payload)


def detect_kinds(adv: Advertisement) -> tuple[DecoderKind, ...]:
    """Which decoders an advertisement looks like it is for (for the technician's scan list)."""
    kinds: list[DecoderKind] = []
    bthome = adv.service_data.get(BTHOME_UUID)
    if bthome and bthome[0] >> 5 == 2:
        kinds.append(DecoderKind.BTHOME)
    ruuvi = adv.manufacturer_data.get(RUUVI_COMPANY_ID)
    if ruuvi and ruuvi[0] == 5 and len(ruuvi) >= _DF5.size:
        kinds.append(DecoderKind.RUUVI)
    env = adv.service_data.get(ENV_SENSING_UUID)
    if env is not None and len(env) in (_PVVX.size, _ATC1441.size):
        kinds.append(DecoderKind.PVVX if len(env) == _PVVX.size else DecoderKind.ATC1441)
    return tuple(kinds)


# AD types for BlueZ advertisement-monitor or_patterns (Bluetooth Assigned Numbers §2.3).
AD_SERVICE_DATA_UUID16 = 0x16
AD_MANUFACTURER_DATA = 0xFF


def or_pattern(kind: DecoderKind) -> tuple[int, int, bytes]:
    """The BlueZ or-pattern (start, AD type, content) that matches a decoder's advertisements,
    for passive scanning (org.bluez.AdvertisementMonitor1 ``Patterns``)."""
    if kind is DecoderKind.BTHOME:
        return (0, AD_SERVICE_DATA_UUID16, _BTHOME_UUID_LE)
    if kind is DecoderKind.RUUVI:
        return (0, AD_MANUFACTURER_DATA, RUUVI_COMPANY_ID.to_bytes(2, "little"))
    return (0, AD_SERVICE_DATA_UUID16, b"\x1a\x18")


# --- GATT Environmental Sensing ----------------------------------------------------------------

_S16 = struct.Struct("<h")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
ENV_CHARACTERISTICS = (TEMPERATURE_UUID, HUMIDITY_UUID, PRESSURE_UUID)


def decode_gatt(char_uuid: str, data: bytes) -> Measure | None:
    """Decode one Environmental Sensing characteristic value; None for "value is not known"
    (0x8000 temperature, 0xFFFF humidity) or a characteristic we do not read."""
    try:
        if char_uuid == TEMPERATURE_UUID:
            (t,) = _S16.unpack_from(data)
            return None if t == -0x8000 else Measure("temperature", t / 100, "Cel")
        if char_uuid == HUMIDITY_UUID:
            (h,) = _U16.unpack_from(data)
            return None if h == 0xFFFF else Measure("humidity", h / 100, "%")
        if char_uuid == PRESSURE_UUID:
            (p,) = _U32.unpack_from(data)
            return Measure("pressure", p / 1000, "hPa")  # 0.1 Pa units -> hPa
    except struct.error:
        raise AdvertisementError(
            f"GATT: value of {char_uuid} too short ({len(data)} bytes)") from None
    return None


# --- de-duplication ----------------------------------------------------------------------------

class Verdict(StrEnum):
    NEW = "new"
    DUPLICATE = "duplicate"
    REPLAY = "replay"


class Dedup:
    """De-duplication for one sensor and one format.

    BlueZ reports an advertisement again whenever any Device1 property changes (RSSI alone
    will do), and sensors repeat each measurement in several advertisements. A payload is a
    duplicate when its packet counter (or, for formats without one, its bytes) equals the last
    accepted one and that was less than ``window`` seconds ago. Encrypted BTHome counters must
    also increase (bthome.io/encryption: replay protection is the receiver's job); a counter
    that goes back is a ``REPLAY`` until :meth:`reset` (a device that restarted).
    """

    __slots__ = ("_at", "_enc_counter", "_key", "replay_protection", "window")

    def __init__(self, window: float, *, replay_protection: bool = True) -> None:
        self.window = window
        self.replay_protection = replay_protection
        self._key: int | bytes | None = None
        self._at = float("-inf")
        self._enc_counter: int | None = None

    def check(self, decoded: Decoded, now: float) -> Verdict:
        counter = decoded.counter
        if decoded.encrypted and counter is not None:
            last = self._enc_counter
            if last is not None:
                if counter == last:
                    return Verdict.DUPLICATE
                if counter < last and self.replay_protection:
                    return Verdict.REPLAY
            self._enc_counter = counter
            self._key, self._at = counter, now
            return Verdict.NEW
        key: int | bytes = counter if counter is not None else decoded.raw
        if key == self._key and now - self._at < self.window:
            return Verdict.DUPLICATE
        self._key, self._at = key, now
        return Verdict.NEW

    def reset(self) -> None:
        self._key, self._at, self._enc_counter = None, float("-inf"), None
