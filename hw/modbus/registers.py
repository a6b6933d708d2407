"""Typed Modbus register maps: decoding, encoding and block planning. Pure.

The Modbus data model (Modbus Application Protocol V1.1b3 §4.3) has four tables: coils and
discrete inputs (one bit per address), holding and input registers (16 bits per address).
Everything wider than 16 bits is a vendor convention over consecutive registers, so a
:class:`Point` names its type, its byte order (within each register) and its word order
(between registers). Orders are written the usual way as letters, ``A`` the most significant
byte of the value: big/big is ``ABCD`` (the Modbus default, §4.2 "big-endian"), word-little is
``CDAB``, byte-little is ``BADC``, both little is ``DCBA``.

Reads are planned as blocks: adjacent points of one table coalesce into one request of at most
125 registers (FC 3/4, §6.3-6.4) or 2000 bits (FC 1/2, §6.1-6.2), optionally bridging small
holes, so a meter with 30 values costs one or two bus transactions instead of thirty.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum

from gateway.errors import ConfigError

MAX_READ_REGISTERS = 125  # FC 3/4 quantity limit, Modbus Application Protocol §6.3
MAX_READ_BITS = 2000  # FC 1/2 quantity limit, §6.1
MAX_WRITE_REGISTERS = 123  # FC 16 quantity limit, §6.12

Value = float | int | bool | str


class Table(StrEnum):
    COIL = "coil"
    DISCRETE = "discrete"
    HOLDING = "holding"
    INPUT = "input"

    @property
    def is_bits(self) -> bool:
        return self in (Table.COIL, Table.DISCRETE)

    @property
    def function_code(self) -> int:
        """The read function code (§6.1-6.4)."""
        return _READ_FC[self]

    @property
    def writable(self) -> bool:
        return self in (Table.COIL, Table.HOLDING)


_READ_FC = {Table.COIL: 1, Table.DISCRETE: 2, Table.HOLDING: 3, Table.INPUT: 4}


class DataType(StrEnum):
    BOOL = "bool"  # one coil or discrete input
    BITS = "bits"  # one bit of a register (``bit`` 0 = least significant)
    INT16 = "int16"
    UINT16 = "uint16"
    INT32 = "int32"
    UINT32 = "uint32"
    FLOAT32 = "float32"
    INT64 = "int64"
    UINT64 = "uint64"
    FLOAT64 = "float64"
    STRING = "string"  # ``length`` registers, two characters each

    @property
    def registers(self) -> int:
        """Registers one value occupies (strings: see :attr:`Point.size`)."""
        return _WIDTH.get(self, 1)

    @property
    def numeric(self) -> bool:
        return self not in (DataType.BOOL, DataType.BITS, DataType.STRING)


_WIDTH = {
    DataType.INT32: 2, DataType.UINT32: 2, DataType.FLOAT32: 2,
    DataType.INT64: 4, DataType.UINT64: 4, DataType.FLOAT64: 4,
}
_STRUCT = {
    DataType.INT16: "h", DataType.UINT16: "H", DataType.INT32: "i", DataType.UINT32: "I",
    DataType.FLOAT32: "f", DataType.INT64: "q", DataType.UINT64: "Q", DataType.FLOAT64: "d",
}


class Order(StrEnum):
    BIG = "big"
    LITTLE = "little"


def order_label(size_bytes: int, byte_order: Order, word_order: Order) -> str:
    """``ABCD``-style label of a byte/word order for a value of ``size_bytes`` bytes."""
    letters = "ABCDEFGH"[:size_bytes]
    words = [letters[i:i + 2] for i in range(0, size_bytes, 2)]
    if word_order is Order.LITTLE:
        words.reverse()
    if byte_order is Order.LITTLE:
        words = [w[::-1] for w in words]
    return "".join(words)


@dataclass(frozen=True, slots=True, kw_only=True)
class Point:
    """One named value in a register map. ``value = raw * scale + offset``."""

    name: str
    table: Table = Table.HOLDING
    address: int
    type: DataType = DataType.UINT16
    byte_order: Order = Order.BIG
    word_order: Order = Order.BIG
    scale: float = 1.0
    offset: float = 0.0
    unit: str | None = None
    bit: int | None = None  # BITS only
    length: int = 1  # STRING only: registers
    writable: bool = False
    interval: float | None = None  # overrides the device's polling interval

    def __post_init__(self) -> None:
        path = f"registers.{self.name}"
        if not 0 <= self.address <= 0xFFFF:
            raise ConfigError("address must be 0..65535", path=f"{path}.address")
        if self.table.is_bits != (self.type is DataType.BOOL):
            raise ConfigError(
                "coils and discrete inputs are type bool; registers are not", path=f"{path}.type")
        if (self.type is DataType.BITS) != (self.bit is not None):
            raise ConfigError("bit is required for type bits, and only for it", path=f"{path}.bit")
        if self.bit is not None and not 0 <= self.bit <= 15:
            raise ConfigError("bit must be 0..15", path=f"{path}.bit")
        if self.type is DataType.STRING:
            if not 1 <= self.length <= MAX_READ_REGISTERS:
                raise ConfigError("length must be 1..125 registers", path=f"{path}.length")
        elif self.length != 1:
            raise ConfigError("length is only for type string", path=f"{path}.length")
        if not self.type.numeric and (self.scale != 1.0 or self.offset != 0.0):
            raise ConfigError(f"scale/offset do not apply to {self.type}", path=f"{path}.scale")
        if self.scale == 0 or not math.isfinite(self.scale) or not math.isfinite(self.offset):
            raise ConfigError("scale must be finite and non-zero", path=f"{path}.scale")
        if self.writable and (not self.table.writable or self.type is DataType.BITS):
            raise ConfigError("only coils and whole holding registers are writable",
                              path=f"{path}.writable")
        if self.address + self.size > 0x10000:
            raise ConfigError("value runs past address 65535", path=f"{path}.address")
        if self.interval is not None and not self.interval > 0:
            raise ConfigError("interval must be > 0", path=f"{path}.interval")

    @property
    def size(self) -> int:
        """Addresses occupied (registers, or bits for coils/discrete inputs)."""
        return self.length if self.type is DataType.STRING else self.type.registers

    @property
    def end(self) -> int:
        return self.address + self.size


# ---------------------------------------------------------------------------------------------
# Decoding and encoding


def _arrange(words: Sequence[int], byte_order: Order, word_order: Order) -> bytes:
    """Registers as received -> the value's bytes, most significant first."""
    ordered = list(words)[::-1] if word_order is Order.LITTLE else words
    return struct.pack(("<" if byte_order is Order.LITTLE else ">") + "H" * len(ordered),
                       *ordered)


def _disarrange(data: bytes, byte_order: Order, word_order: Order) -> list[int]:
    """The value's bytes, most significant first -> registers to send (inverse of _arrange)."""
    words = list(struct.unpack(("<" if byte_order is Order.LITTLE else ">")
                               + "H" * (len(data) // 2), data))
    return words[::-1] if word_order is Order.LITTLE else words


def _short_float32(value: float) -> float:
    """The shortest decimal that reads back as the same float32 (so 230.4 stays 230.4)."""
    if not math.isfinite(value):
        return value
    packed = struct.pack(">f", value)
    for digits in range(6, 10):
        candidate = float(f"{value:.{digits}g}")
        if struct.pack(">f", candidate) == packed:
            return candidate
    return value


def decode_raw(words: Sequence[int], type_: DataType, byte_order: Order = Order.BIG,
               word_order: Order = Order.BIG, *, bit: int | None = None) -> Value:
    """Decode ``words`` (exactly the registers of one value) without scale/offset."""
    if type_ is DataType.BITS:
        return bool((words[0] >> (bit or 0)) & 1)
    if type_ is DataType.STRING:
        data = _arrange(words, byte_order, Order.BIG)
        return data.split(b"\x00", 1)[0].decode("latin-1").rstrip(" ")
    if type_ is DataType.BOOL:
        return bool(words[0])
    (value,) = struct.unpack(">" + _STRUCT[type_], _arrange(words, byte_order, word_order))
    if type_ is DataType.FLOAT32:
        return _short_float32(value)
    return value  # type: ignore[no-any-return]


def scaled(point: Point, raw: Value) -> Value:
    """Apply ``scale`` and ``offset``; integers stay integers when both are neutral."""
    if not point.type.numeric or (point.scale == 1.0 and point.offset == 0.0):
        return raw
    value = float(raw) * point.scale + point.offset
    # 12 significant digits hide binary noise such as 3 * 0.1 = 0.30000000000000004.
    return float(f"{value:.12g}") if math.isfinite(value) else value


def decode_point(point: Point, words: Sequence[int]) -> Value:
    return scaled(point, decode_raw(words, point.type, point.byte_order, point.word_order,
                                    bit=point.bit))


def encode_raw(value: Value, type_: DataType, byte_order: Order = Order.BIG,
               word_order: Order = Order.BIG, *, length: int = 1) -> list[int]:
    """Encode one raw value into the registers to write. Raises ``ValueError`` when it does
    not fit the type."""
    if type_ is DataType.STRING:
        data = str(value).encode("latin-1")
        if len(data) > 2 * length:
            raise ValueError(f"string longer than {2 * length} characters")
        return _disarrange(data.ljust(2 * length, b"\x00"), byte_order, Order.BIG)
    if type_ in (DataType.BOOL, DataType.BITS):
        raise ValueError(f"{type_} values are written as coils, not registers")
    code = _STRUCT[type_]
    number: float | int
    if type_ in (DataType.FLOAT32, DataType.FLOAT64):
        number = float(value)
    else:
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(f"{value} is not an integer")
        number = int(value)
    try:
        data = struct.pack(">" + code, number)
    except (struct.error, OverflowError) as exc:
        raise ValueError(f"{value} does not fit {type_}") from exc
    return _disarrange(data, byte_order, word_order)


def encode_point(point: Point, value: Value) -> list[int]:
    """Engineering value -> registers: inverts ``scale``/``offset``, rounds integers."""
    if point.type.numeric and (point.scale != 1.0 or point.offset != 0.0):
        raw = (float(value) - point.offset) / point.scale
        value = raw if point.type in (DataType.FLOAT32, DataType.FLOAT64) else round(raw)
    return encode_raw(value, point.type, point.byte_order, point.word_order,
                      length=point.length)


# ---------------------------------------------------------------------------------------------
# Block planning


@dataclass(frozen=True, slots=True)
class Block:
    """One read request: ``count`` addresses of ``table`` from ``address``, and the points it
    serves."""

    table: Table
    address: int
    count: int
    points: tuple[Point, ...]

    def decode(self, values: Sequence[int] | Sequence[bool]) -> list[tuple[Point, Value]]:
        """Decode a response (registers, or bits for coils/discrete inputs)."""
        if len(values) < self.count:
            raise ValueError(f"short response: {len(values)} of {self.count}")
        out: list[tuple[Point, Value]] = []
        base = self.address
        if self.table.is_bits:
            for p in self.points:
                out.append((p, bool(values[p.address - base])))
            return out
        for p in self.points:
            i = p.address - base
            out.append((p, decode_point(p, values[i:i + p.size])))
        return out


def plan_blocks(points: Iterable[Point], *, max_registers: int = MAX_READ_REGISTERS,
                max_bits: int = MAX_READ_BITS, max_gap: int = 0) -> tuple[Block, ...]:
    """Coalesce points into the fewest read requests.

    Points of one table are sorted by address and joined while the block stays within
    ``max_registers`` (or ``max_bits``) and the hole to the next point is at most ``max_gap``
    addresses (holes are read and ignored; some devices answer "illegal data address" for
    unmapped registers, so the default bridges none). Points may overlap (two views of one
    register)."""
    by_table: dict[Table, list[Point]] = {}
    for p in points:
        by_table.setdefault(p.table, []).append(p)
    blocks: list[Block] = []
    for table in Table:  # a stable order: coils, discrete, holding, input
        members = sorted(by_table.get(table, ()), key=lambda p: (p.address, p.end))
        limit = max_bits if table.is_bits else max_registers
        start = end = -1
        current: list[Point] = []
        for p in members:
            if p.size > limit:
                raise ConfigError(f"{p.size} addresses exceed the {limit} per request",
                                  path=f"registers.{p.name}")
            if current and p.address - end <= max_gap and max(end, p.end) - start <= limit:
                current.append(p)
                end = max(end, p.end)
                continue
            if current:
                blocks.append(Block(table, start, end - start, tuple(current)))
            current, start, end = [p], p.address, p.end
        if current:
            blocks.append(Block(table, start, end - start, tuple(current)))
    return tuple(blocks)
