"""Typed register decoding/encoding and block planning (hw/modbus/registers.py)."""

from __future__ import annotations

import math
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.errors import ConfigError
from hw.modbus.registers import (
    Block,
    DataType,
    Order,
    Point,
    Table,
    decode_point,
    decode_raw,
    encode_point,
    encode_raw,
    order_label,
    plan_blocks,
)

B, L = Order.BIG, Order.LITTLE


@pytest.mark.parametrize(("byte_order", "word_order", "words", "label"), [
    (B, B, [0x4366, 0x6666], "ABCD"),
    (B, L, [0x6666, 0x4366], "CDAB"),
    (L, B, [0x6643, 0x6666], "BADC"),
    (L, L, [0x6666, 0x6643], "DCBA"),
])
def test_float32_230_4_decodes_in_each_order(byte_order: Order, word_order: Order,
                                             words: list[int], label: str) -> None:
    assert decode_raw(words, DataType.FLOAT32, byte_order, word_order) == 230.4
    assert encode_raw(230.4, DataType.FLOAT32, byte_order, word_order) == words
    assert order_label(4, byte_order, word_order) == label


def test_integer_types_known_vectors() -> None:
    assert decode_raw([0xFFFF], DataType.INT16) == -1
    assert decode_raw([0xFFFF], DataType.UINT16) == 65535
    assert decode_raw([0x3412], DataType.UINT16, L) == 0x1234
    assert decode_raw([0xFFFF, 0xFFFE], DataType.INT32) == -2
    assert decode_raw([0x5678, 0x1234], DataType.UINT32, B, L) == 0x12345678
    assert decode_raw([0x0102, 0x0304, 0x0506, 0x0708], DataType.UINT64) == 0x0102030405060708
    assert decode_raw([0x0708, 0x0506, 0x0304, 0x0102], DataType.UINT64, B, L) \
        == 0x0102030405060708
    assert decode_raw([0xFFFF] * 4, DataType.INT64) == -1
    assert decode_raw([0x3FF8, 0, 0, 0], DataType.FLOAT64) == 1.5
    assert decode_raw([0, 0, 0, 0xF83F], DataType.FLOAT64, L, L) == 1.5
    assert order_label(8, B, L) == "GHEFCDAB"


def test_bits_and_strings() -> None:
    assert decode_raw([0b1010], DataType.BITS, bit=1) is True
    assert decode_raw([0b1010], DataType.BITS, bit=0) is False
    assert decode_raw([0x8000], DataType.BITS, bit=15) is True
    assert decode_raw([0x4142, 0x4300], DataType.STRING) == "ABC"
    assert decode_raw([0x4241, 0x0043], DataType.STRING, L) == "ABC"
    assert decode_raw([0x5341, 0x4D20, 0x2020], DataType.STRING) == "SAM"
    assert encode_raw("ABC", DataType.STRING, length=2) == [0x4142, 0x4300]
    with pytest.raises(ValueError, match="longer"):
        encode_raw("ABCDE", DataType.STRING, length=2)


def test_float32_values_read_back_as_their_shortest_decimal() -> None:
    for value in (0.95, 49.98, 1234.56, -368.2, 18.19, 1e-7, 3.4028235e38):
        words = list(struct.unpack(">HH", struct.pack(">f", value)))
        assert decode_raw(words, DataType.FLOAT32) == value
    nan = decode_raw([0x7FC0, 0], DataType.FLOAT32)
    assert isinstance(nan, float) and math.isnan(nan)


_INT_RANGES = {
    DataType.INT16: (-(2**15), 2**15 - 1), DataType.UINT16: (0, 2**16 - 1),
    DataType.INT32: (-(2**31), 2**31 - 1), DataType.UINT32: (0, 2**32 - 1),
    DataType.INT64: (-(2**63), 2**63 - 1), DataType.UINT64: (0, 2**64 - 1),
}


@given(st.sampled_from(sorted(_INT_RANGES)), st.data(), st.sampled_from(list(Order)),
       st.sampled_from(list(Order)))
def test_integers_round_trip_in_every_order(type_: DataType, data: st.DataObject,
                                            byte_order: Order, word_order: Order) -> None:
    lo, hi = _INT_RANGES[type_]
    value = data.draw(st.integers(lo, hi))
    words = encode_raw(value, type_, byte_order, word_order)
    assert len(words) == type_.registers and all(0 <= w <= 0xFFFF for w in words)
    assert decode_raw(words, type_, byte_order, word_order) == value


@given(st.floats(width=32, allow_nan=False), st.sampled_from(list(Order)),
       st.sampled_from(list(Order)))
def test_float32_round_trips(value: float, byte_order: Order, word_order: Order) -> None:
    words = encode_raw(value, DataType.FLOAT32, byte_order, word_order)
    decoded = decode_raw(words, DataType.FLOAT32, byte_order, word_order)
    assert isinstance(decoded, float)  # the same float32, printed as its shortest decimal
    assert struct.pack(">f", decoded) == struct.pack(">f", value)
    assert len(repr(decoded)) <= len(repr(value))


@given(st.floats(allow_nan=False), st.sampled_from(list(Order)), st.sampled_from(list(Order)))
def test_float64_round_trips(value: float, byte_order: Order, word_order: Order) -> None:
    words = encode_raw(value, DataType.FLOAT64, byte_order, word_order)
    assert decode_raw(words, DataType.FLOAT64, byte_order, word_order) == value


@given(st.lists(st.integers(0, 0xFFFF), min_size=4, max_size=4))
def test_word_order_little_is_the_reverse_of_big(words: list[int]) -> None:
    for type_ in (DataType.UINT32, DataType.UINT64):
        n = type_.registers
        assert decode_raw(words[:n], type_, B, L) == decode_raw(words[:n][::-1], type_, B, B)


def test_out_of_range_values_are_refused() -> None:
    with pytest.raises(ValueError):
        encode_raw(70000, DataType.UINT16)
    with pytest.raises(ValueError):
        encode_raw(-1, DataType.UINT32)
    with pytest.raises(ValueError):
        encode_raw(1.5, DataType.INT16)
    with pytest.raises(ValueError):
        encode_raw(True, DataType.BOOL)


def test_scale_and_offset_apply_both_ways() -> None:
    p = Point(name="t", address=0, type=DataType.INT16, scale=0.1, unit="Cel")
    assert decode_point(p, [2304]) == 230.4
    assert decode_point(p, [0xFFFD]) == -0.3  # no 0.30000000000000004 noise
    assert encode_point(p, 230.4) == [2304]
    q = Point(name="ma", address=0, scale=0.0125, offset=-100.0)
    assert decode_point(q, [12000]) == 50.0
    assert encode_point(q, -50.0) == [4000]
    plain = Point(name="n", address=0, type=DataType.UINT32)
    assert decode_point(plain, [0, 7]) == 7 and isinstance(decode_point(plain, [0, 7]), int)


@pytest.mark.parametrize(("kwargs", "key"), [
    ({"table": Table.HOLDING, "type": DataType.BOOL}, "type"),
    ({"table": Table.COIL, "type": DataType.UINT16}, "type"),
    ({"type": DataType.BITS}, "bit"),
    ({"type": DataType.UINT16, "bit": 3}, "bit"),
    ({"type": DataType.BITS, "bit": 16}, "bit"),
    ({"type": DataType.UINT16, "length": 4}, "length"),
    ({"type": DataType.STRING, "length": 0}, "length"),
    ({"type": DataType.STRING, "length": 2, "scale": 2.0}, "scale"),
    ({"scale": 0.0}, "scale"),
    ({"table": Table.INPUT, "writable": True}, "writable"),
    ({"type": DataType.BITS, "bit": 1, "writable": True}, "writable"),
    ({"address": 0xFFFF, "type": DataType.FLOAT32}, "address"),
    ({"interval": 0.0}, "interval"),
])
def test_invalid_points_name_the_key(kwargs: dict[str, object], key: str) -> None:
    args: dict[str, object] = {"name": "p", "address": 0, **kwargs}
    with pytest.raises(ConfigError) as err:
        Point(**args)  # type: ignore[arg-type]
    assert err.value.path == f"registers.p.{key}"


def _f32(name: str, address: int, table: Table = Table.INPUT) -> Point:
    return Point(name=name, table=table, address=address, type=DataType.FLOAT32)


def test_adjacent_points_coalesce_into_one_block() -> None:
    blocks = plan_blocks([_f32("b", 2), _f32("a", 0), _f32("c", 4)])
    assert [(b.table, b.address, b.count) for b in blocks] == [(Table.INPUT, 0, 6)]
    assert [p.name for p in blocks[0].points] == ["a", "b", "c"]


def test_holes_split_blocks_unless_max_gap_bridges_them() -> None:
    points = [_f32("a", 0), _f32("b", 6), _f32("c", 20)]
    assert [(b.address, b.count) for b in plan_blocks(points)] == [(0, 2), (6, 2), (20, 2)]
    assert [(b.address, b.count) for b in plan_blocks(points, max_gap=4)] == [(0, 8), (20, 2)]
    assert [(b.address, b.count) for b in plan_blocks(points, max_gap=12)] == [(0, 22)]


def test_blocks_respect_the_125_register_limit() -> None:
    points = [_f32(f"p{i}", 2 * i) for i in range(100)]  # 200 contiguous registers
    blocks = plan_blocks(points)
    assert [(b.address, b.count) for b in blocks] == [(0, 124), (124, 76)]
    assert sum(len(b.points) for b in blocks) == 100
    assert [(b.address, b.count) for b in plan_blocks(points, max_registers=60)][:2] \
        == [(0, 60), (60, 60)]


def test_tables_never_share_a_block_and_bits_allow_2000() -> None:
    coils = [Point(name=f"c{i}", table=Table.COIL, address=i, type=DataType.BOOL)
             for i in range(2500)]
    blocks = plan_blocks([*coils, _f32("h", 0, Table.HOLDING), _f32("i", 0)])
    assert [(b.table, b.address, b.count) for b in blocks] == [
        (Table.COIL, 0, 2000), (Table.COIL, 2000, 500), (Table.HOLDING, 0, 2),
        (Table.INPUT, 0, 2)]


def test_a_point_larger_than_a_request_is_a_config_error() -> None:
    big = Point(name="s", address=0, type=DataType.STRING, length=100)
    with pytest.raises(ConfigError) as err:
        plan_blocks([big], max_registers=60)
    assert err.value.path == "registers.s"


def test_block_decodes_overlapping_views_and_bits() -> None:
    raw = Point(name="raw", address=10, type=DataType.UINT16)
    flag = Point(name="flag", address=10, type=DataType.BITS, bit=2)
    temp = Point(name="t", address=11, type=DataType.INT16, scale=0.1)
    (block,) = plan_blocks([temp, flag, raw])
    assert (block.address, block.count) == (10, 2)
    assert {p.name: v for p, v in block.decode([0b100, 215])} == {
        "raw": 4, "flag": True, "t": 21.5}
    coils = Block(Table.COIL, 5, 3, (Point(name="x", table=Table.COIL, address=6,
                                           type=DataType.BOOL),))
    assert coils.decode([False, True, False])[0][1] is True
    with pytest.raises(ValueError, match="short"):
        block.decode([1])
