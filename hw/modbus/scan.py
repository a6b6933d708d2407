"""``gateway modbus scan``: find which unit ids answer on a bus, and at which serial settings.

A technician facing an RS-485 line with unknown slaves, or a slave of unknown baud rate and
parity, asks every unit id in a range to read one register, once per serial setting tried.
A unit counts as present when it answers at all: values, or a Modbus exception (an illegal
address still proves a live slave), except the two gateway exceptions 10 and 11, which a
TCP-to-RTU gateway sends for a slave that is *not* there (Modbus Application Protocol V1.1b3
§7). A garbled answer is reported apart: something is on the line at another setting.

    gateway modbus scan (--tcp HOST:PORT | --serial DEVICE [--baud N,N...] [--parity E,N,O]
                         | --bus NAME) [--units 1-247] [--address N] [--input] [--timeout S]

``--bus`` scans through the running gateway's Modbus bridge (:mod:`hw.modbus.live`): the bridge
keeps the port, its polling goes on in between, and its own bus settings apply.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from itertools import product
from typing import Literal, cast

from gateway.errors import DeviceError, GatewayError
from hw.modbus import live
from hw.modbus.client import ExceptionResponse, NoResponse, Transport
from hw.modbus.config import Link, SerialLink
from hw.modbus.registers import Table

GATEWAY_NO_PATH, GATEWAY_NO_TARGET = 10, 11


@dataclass(frozen=True, slots=True)
class Answer:
    """What one unit id did: ``kind`` is ``value``, ``exception`` or ``garbled``."""

    unit: int
    kind: str
    detail: str


def parse_units(text: str) -> list[int]:
    """``"1-10,17,20-22"`` -> the unit ids, in order, each once (1..247, §2.2 of the serial
    line spec; 0 is broadcast and never answers). Raises ValueError."""
    units: list[int] = []
    for part in text.split(","):
        first, sep, last = part.strip().partition("-")
        if not first.isdigit() or (sep and not last.isdigit()):
            raise ValueError(f"bad unit range {part!r} (e.g. 1-247 or 1,5,9-12)")
        low, high = int(first), int(last) if sep else int(first)
        if not 1 <= low <= high <= 247:
            raise ValueError(f"unit ids are 1..247, not {part.strip()!r}")
        units.extend(u for u in range(low, high + 1) if u not in units)
    return units


def parse_list(text: str, allowed: Callable[[str], bool], what: str) -> list[str]:
    items = [item.strip().upper() for item in text.split(",") if item.strip()]
    bad = [item for item in items if not allowed(item)]
    if not items or bad:
        raise ValueError(f"bad {what}: {', '.join(bad) or text!r}")
    return items


def settings(port: str, bauds: Sequence[int], parities: Sequence[str],
             stopbits: int) -> list[SerialLink]:
    """Every serial setting to try, the most common first as given."""
    return [SerialLink(port=port, baud=b, parity=cast(Literal["N", "E", "O"], p),
                       stopbits=stopbits)
            for b, p in product(bauds, parities)]


def describe_setting(link: Link) -> str:
    if isinstance(link, SerialLink):
        return f"{link.port} {link.baud} {link.bytesize}{link.parity}{link.stopbits}"
    return link.describe()


Read = Callable[[int], Awaitable[Sequence[int] | Sequence[bool]]]
"""``await read(unit)``: one register (or bit) of that unit, raising the client's errors."""


async def scan_units(read: Read, units: Sequence[int], *, table: Table, address: int,
                     found: Callable[[Answer], None] | None = None,
                     deadline: float | None = None) -> tuple[list[Answer], int]:
    """Ask each unit in turn; returns the answers and how many units were asked (fewer than
    ``len(units)`` when the monotonic ``deadline`` passed). Link failures propagate."""
    answers: list[Answer] = []
    asked = 0
    for unit in units:
        if deadline is not None and time.monotonic() >= deadline:
            break
        asked += 1
        try:
            values = await read(unit)
            answer = Answer(unit, "value", f"{table} {address} = {int(values[0])} "
                                           f"(0x{int(values[0]):04x})")
        except ExceptionResponse as exc:
            if exc.exception_code in (GATEWAY_NO_PATH, GATEWAY_NO_TARGET):
                continue
            answer = Answer(unit, "exception", str(exc))
        except NoResponse as exc:
            if str(exc).startswith("no response"):
                continue
            answer = Answer(unit, "garbled", str(exc))
            await asyncio.sleep(0.05)  # let the rest of a stray frame pass
        answers.append(answer)
        if found is not None:
            found(answer)
    return answers, asked


async def scan(link: Link, units: Sequence[int], *, address: int, table: Table,
               timeout: float, found: Callable[[Answer], None]) -> list[Answer]:
    """Scan with a transport of its own (the bus must not be in use)."""
    transport = Transport(link, timeout=timeout, max_no_responses=1_000_000)
    await transport.connect()
    try:
        answers, _ = await scan_units(lambda unit: transport.read(table, unit, address, 1),
                                      units, table=table, address=address, found=found)
    finally:
        transport.close()
    return answers


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gateway modbus scan",
        description="Ask every unit id in a range to read one register and list those that "
                    "answer; on a serial line, once per baud rate and parity given.")
    live.add_arguments(p)
    p.add_argument("--baud", default="19200,9600",
                   help="baud rates to try, comma-separated (19200,9600)")
    p.add_argument("--parity", default="E,N", help="parities to try: E, N, O (E,N)")
    p.add_argument("--stopbits", type=int, choices=(1, 2), default=1)
    p.add_argument("--units", default="1-247", help="unit ids, e.g. 1-247 or 1,5,9-12")
    p.add_argument("--address", type=int, default=0, help="register to read (0-based, 0)")
    p.add_argument("--input", action="store_true",
                   help="read an input register (FC 4) instead of a holding register (FC 3)")
    p.add_argument("--timeout", type=float, default=0.25,
                   help="seconds to wait for each unit (0.25)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        units = parse_units(args.units)
        links: list[Link] = []
        if args.tcp:
            links = [live.tcp_link(args.tcp)]
        elif args.serial:
            bauds = [int(b) for b in parse_list(args.baud, str.isdigit, "baud rate")]
            parities = parse_list(args.parity, lambda x: x in ("E", "N", "O"), "parity")
            links = list(settings(args.serial, bauds, parities, args.stopbits))
    except ValueError as exc:
        parser.error(str(exc))
    if not 0 <= args.address <= 0xFFFF:
        parser.error("--address must be 0..65535")
    table = Table.INPUT if args.input else Table.HOLDING
    fc = 4 if args.input else 3
    if args.bus:
        return _through_bridge(args, units, table, fc)
    total: list[tuple[Link, Answer]] = []
    for link in links:
        print(f"scanning {describe_setting(link)}: {len(units)} unit ids, {table} register "
              f"{args.address} (FC {fc}), {args.timeout:g} s each", flush=True)
        started = time.monotonic()

        def show(answer: Answer) -> None:
            print(f"  unit {answer.unit:>3}  {answer.kind:<9}  {answer.detail}", flush=True)

        try:
            answers = asyncio.run(scan(link, units, address=args.address, table=table,
                                       timeout=args.timeout, found=show))
        except DeviceError as exc:
            print(f"gateway modbus scan: {exc}", file=sys.stderr)
            return 1
        alive = [a.unit for a in answers if a.kind != "garbled"]
        print(f"  {len(alive)} unit(s) answered in {time.monotonic() - started:.1f} s"
              + (f": {', '.join(map(str, alive))}" if alive else ""), flush=True)
        total.extend((link, a) for a in answers)
    found = [(link, a) for link, a in total if a.kind != "garbled"]
    if not found:
        print("no unit answered" + ("; garbled answers suggest another baud rate or parity"
                                    if total else ""))
        return 3
    if len(links) > 1:
        print("found:")
        for link, a in found:
            print(f"  {describe_setting(link)}  unit {a.unit}")
    return 0


def _through_bridge(args: argparse.Namespace, units: list[int], table: Table, fc: int) -> int:
    print(f"scanning bus {args.bus} through the bridge: {len(units)} unit ids, {table} register "
          f"{args.address} (FC {fc})", flush=True)
    try:
        answer = live.invoke(args, "scan", {"bus": args.bus, "units": args.units,
                                            "address": args.address, "table": str(table),
                                            "seconds": 280}, timeout=300)
    except GatewayError as exc:
        print(f"gateway modbus scan: bus {args.bus}: {exc}", file=sys.stderr)
        return 1
    found = answer.get("answered", [])
    for a in found:
        print(f"  unit {a['unit']:>3}  {a['kind']:<9}  {a['detail']}")
    alive = [str(a["unit"]) for a in found if a["kind"] != "garbled"]
    print(f"  {len(alive)} unit(s) answered" + (f": {', '.join(alive)}" if alive else ""))
    if not answer.get("complete", True):
        print(f"  stopped at the time limit after {answer.get('asked')} of {len(units)} unit ids")
    return 0 if alive else 3


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
