"""``gateway modbus probe``: read a register block and show every interpretation of it.

A technician with an undocumented (or wrongly documented) device reads a block once and sees,
one row per interpretation (type and byte/word order) and one column per starting register,
what each choice would decode to; the row that shows plausible values is the register map.
Orders use the ``ABCD`` notation of :mod:`hw.modbus.registers`.

    gateway modbus probe (--tcp HOST:PORT | --serial DEVICE [--baud N] | --bus NAME) --unit N
                         --address N --count N [--input]

``--bus`` reads through the running gateway's Modbus bridge (:mod:`hw.modbus.live`) instead of
opening the port.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from gateway.errors import DeviceError, GatewayError
from hw.modbus import live
from hw.modbus.config import Link, SerialLink, TcpLink
from hw.modbus.registers import (
    MAX_READ_REGISTERS,
    DataType,
    Order,
    Table,
    decode_raw,
    order_label,
)

_NUMERIC = (DataType.INT16, DataType.UINT16, DataType.INT32, DataType.UINT32,
            DataType.FLOAT32, DataType.INT64, DataType.UINT64, DataType.FLOAT64)


@dataclass(frozen=True, slots=True)
class Interpretation:
    """One row: ``values[i]`` is the value that starts at register ``address + i`` (None where
    too few registers remain)."""

    type: str
    order: str
    values: tuple[str | None, ...]


def _fmt(value: object, type_: DataType, scale: float) -> str:
    if isinstance(value, float) or (scale != 1.0 and isinstance(value, int)):
        number = float(value) * scale
        if math.isnan(number):
            return "nan"
        digits = 15 if type_ is DataType.FLOAT64 else 7
        return f"{number:.{digits}g}"
    return str(value)


def _orders(type_: DataType) -> list[tuple[Order, Order]]:
    if type_.registers == 1:
        return [(Order.BIG, Order.BIG), (Order.LITTLE, Order.BIG)]
    return [(Order.BIG, Order.BIG), (Order.BIG, Order.LITTLE), (Order.LITTLE, Order.BIG),
            (Order.LITTLE, Order.LITTLE)]


def interpret(words: Sequence[int], *, scale: float = 1.0) -> list[Interpretation]:
    """Every interpretation of ``words``, as rows of text. Pure."""
    n = len(words)
    rows = [
        Interpretation("hex", "AB", tuple(f"{w:04x}" for w in words)),
        Interpretation("bits", "15..0", tuple(f"{w:016b}" for w in words)),
    ]
    for type_ in _NUMERIC:
        width = type_.registers
        for byte_order, word_order in _orders(type_):
            values = tuple(
                _fmt(decode_raw(words[i:i + width], type_, byte_order, word_order), type_, scale)
                if i + width <= n else None
                for i in range(n))
            rows.append(Interpretation(str(type_), order_label(2 * width, byte_order, word_order),
                                       values))
    for byte_order in (Order.BIG, Order.LITTLE):
        chars = tuple(
            "".join(chr(c) if 32 <= c < 127 else "." for c in
                    (((w >> 8) & 0xFF, w & 0xFF) if byte_order is Order.BIG
                     else (w & 0xFF, (w >> 8) & 0xFF)))
            for w in words)
        rows.append(Interpretation("string", order_label(2, byte_order, Order.BIG), chars))
    return rows


def render(address: int, rows: Sequence[Interpretation], *, columns: int = 8) -> str:
    """A fixed-width table, ``columns`` registers per section."""
    n = len(rows[0].values) if rows else 0
    out: list[str] = []
    for first in range(0, n, columns):
        span = range(first, min(n, first + columns))
        cells = [[row.type, row.order] + [row.values[i] or "" for i in span] for row in rows]
        header = ["type", "order"] + [str(address + i) for i in span]
        widths = [max(len(header[c]), *(len(r[c]) for r in cells)) for c in range(len(header))]

        if out:
            out.append("")
        out.append(_line(header, widths))
        out.append(_line(["-" * w for w in widths], widths))
        out.extend(_line(r, widths) for r in cells)
    return "\n".join(out)


def _line(items: Sequence[str], widths: Sequence[int]) -> str:
    return "  ".join(item.ljust(widths[c]) if c < 2 else item.rjust(widths[c])
                     for c, item in enumerate(items)).rstrip()


async def read_block(link: Link, *, unit: int, address: int, count: int, table: Table,
                     timeout: float) -> list[int]:
    """One read with a short-lived transport."""
    from hw.modbus.client import Transport  # the pymodbus import stays out of the pure part

    transport = Transport(link, timeout=timeout)
    try:
        await transport.connect()
        return [int(v) for v in await transport.read(table, unit, address, count)]
    finally:
        transport.close()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gateway modbus probe",
        description="Read a register block and print every type and byte/word-order "
                    "interpretation side by side (one row per interpretation, one column per "
                    "starting register). Addresses are 0-based protocol addresses: holding "
                    "register 40001 is --address 0.")
    live.add_arguments(p)
    p.add_argument("--baud", type=int, default=19200, help="serial baud rate (19200)")
    p.add_argument("--parity", choices=("N", "E", "O"), default="E", help="serial parity (E)")
    p.add_argument("--stopbits", type=int, choices=(1, 2), default=1)
    p.add_argument("--unit", type=int, required=True, help="unit id (slave address)")
    p.add_argument("--address", type=int, required=True, help="first register (0-based)")
    p.add_argument("--count", type=int, required=True, help=f"registers, 1..{MAX_READ_REGISTERS}")
    p.add_argument("--input", action="store_true",
                   help="read input registers (FC 4) instead of holding registers (FC 3)")
    p.add_argument("--scale", type=float, default=1.0, help="multiply numeric rows by this")
    p.add_argument("--timeout", type=float, default=1.0, help="seconds to wait for an answer")
    p.add_argument("--columns", type=int, default=8, help="registers per table section")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not 1 <= args.count <= MAX_READ_REGISTERS:
        parser.error(f"--count must be 1..{MAX_READ_REGISTERS}")
    if not 0 <= args.address <= 0xFFFF or args.address + args.count > 0x10000:
        parser.error("--address must be 0..65535 and the block must end by 65535")
    if not 0 <= args.unit <= 255:
        parser.error("--unit must be 0..255")
    table = Table.INPUT if args.input else Table.HOLDING
    if args.bus:
        try:
            answer = live.invoke(args, "read_registers", {
                "bus": args.bus, "unit": args.unit, "address": args.address,
                "count": args.count, "table": str(table)}, timeout=30)
        except GatewayError as exc:
            print(f"gateway modbus probe: bus {args.bus} unit {args.unit}: {exc}",
                  file=sys.stderr)
            return 1
        _print_table(f"bus {args.bus}", args, table, [int(v) for v in answer["values"]])
        return 0
    link: TcpLink | SerialLink
    if args.tcp:
        try:
            link = live.tcp_link(args.tcp)
        except ValueError as exc:
            parser.error(str(exc))
    else:
        link = SerialLink(port=args.serial, baud=args.baud, parity=args.parity,
                          stopbits=args.stopbits)
    try:
        words = asyncio.run(read_block(link, unit=args.unit, address=args.address,
                                       count=args.count, table=table, timeout=args.timeout))
    except DeviceError as exc:
        print(f"gateway modbus probe: {link.describe()} unit {args.unit}: {exc}",
              file=sys.stderr)
        return 1
    _print_table(link.describe(), args, table, words)
    return 0


def _print_table(where: str, args: argparse.Namespace, table: Table, words: list[int]) -> None:
    fc = 4 if table is Table.INPUT else 3
    print(f"{where} unit {args.unit}, {table} registers (FC {fc}) "
          f"{args.address}..{args.address + args.count - 1}")
    print(render(args.address, interpret(words, scale=args.scale), columns=args.columns))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
