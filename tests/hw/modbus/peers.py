"""Real Modbus peers for the bridge tests: pymodbus servers over TCP and over a socat pty pair.

A *dead* unit is simulated the way a powered-off slave behaves on a line: the request goes out,
nothing comes back. The server still decodes the request, but its answer is dropped on the way
out (``trace_packet`` returns no bytes), so the client waits for its full timeout.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from pymodbus.server import ModbusSerialServer, ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from tests import waiting

# table -> {start address: values}; coils/discrete take bools, registers take ints
Tables = Mapping[str, Mapping[int, Sequence[int] | Sequence[bool]]]
_ORDER = ("coil", "discrete", "holding", "input")


def rtu_crc(data: bytes) -> bytes:
    """CRC-16/MODBUS (Modbus over Serial Line V1.02 §6.2.2), low byte first."""
    crc = 0xFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return bytes((crc & 0xFF, crc >> 8))


def sim_device(unit: int, tables: Tables) -> SimDevice:
    blocks: list[list[SimData]] = []
    for name in _ORDER:
        segments = []
        for address, values in sorted(tables.get(name, {}).items()):
            if name in ("coil", "discrete"):
                segments.append(SimData(address, values=[bool(v) for v in values],
                                        datatype=DataType.BITS))
            else:
                segments.append(SimData(address, values=[int(v) for v in values],
                                        datatype=DataType.REGISTERS))
        if not segments:  # pymodbus wants every table non-empty
            segments.append(SimData(0xFFF0, values=[False] if name in ("coil", "discrete")
                                    else [0], datatype=DataType.BITS if name in
                                    ("coil", "discrete") else DataType.REGISTERS))
        blocks.append(segments)
    return SimDevice(id=unit, simdata=(blocks[0], blocks[1], blocks[2], blocks[3]))


@dataclass
class Peer:
    """A running server. ``dead`` units get no answer; ``requests`` counts requests per unit."""

    server: ModbusTcpServer | ModbusSerialServer
    dead: set[int] = field(default_factory=set)
    requests: dict[int, int] = field(default_factory=dict)
    port: int = 0  # TCP
    device: str = ""  # RTU: the client's end of the pty pair

    async def get(self, unit: int, table: str, address: int, count: int = 1) -> list[int]:
        fc = {"coil": 1, "discrete": 2, "holding": 3, "input": 4}[table]
        values = await self.server.context.async_getValues(unit, fc, address, count)
        return [int(v) for v in values]  # type: ignore[union-attr]


def _tracer(peer: Peer, unit_at: int):  # type: ignore[no-untyped-def]
    def trace(sending: bool, data: bytes) -> bytes:
        if len(data) > unit_at:
            unit = data[unit_at]
            if not sending:
                peer.requests[unit] = peer.requests.get(unit, 0) + 1
            elif unit in peer.dead:
                return b""
        return data
    return trace


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _serve(server: ModbusTcpServer | ModbusSerialServer) -> asyncio.Task[None]:
    task = asyncio.create_task(server.serve_forever())
    await asyncio.sleep(0.1)
    return task


@asynccontextmanager
async def tcp_peer(devices: Mapping[int, Tables], dead: Iterable[int] = (),
                   port: int | None = None) -> AsyncIterator[Peer]:
    peer = Peer(server=None, dead=set(dead), port=port or free_port())  # type: ignore[arg-type]
    peer.server = ModbusTcpServer([sim_device(u, t) for u, t in devices.items()],
                                  address=("127.0.0.1", peer.port),
                                  trace_packet=_tracer(peer, 6))
    task = await _serve(peer.server)
    try:
        yield peer
    finally:
        await peer.server.shutdown()
        task.cancel()


def require_socat() -> str:
    path = shutil.which("socat")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("socat is required under CI (dev.sh installs it)")
        pytest.skip("socat not installed (apt-get install socat)")
    return path


@asynccontextmanager
async def pty_pair(tmp: Path) -> AsyncIterator[tuple[str, str]]:
    """Two linked ptys (a null-modem cable) made by socat."""
    socat = require_socat()
    a, b = tmp / "ttyA", tmp / "ttyB"
    proc = await asyncio.create_subprocess_exec(
        socat, f"pty,raw,echo=0,link={a}", f"pty,raw,echo=0,link={b}",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    try:
        for _ in range(200):
            if a.exists() and b.exists():
                break
            await asyncio.sleep(0.01)
        else:
            raise RuntimeError("socat did not create the pty pair")
        yield str(a), str(b)
    finally:
        proc.terminate()
        await proc.wait()


@asynccontextmanager
async def rtu_peer(tmp: Path, devices: Mapping[int, Tables], dead: Iterable[int] = (),
                   baud: int = 19200) -> AsyncIterator[Peer]:
    async with pty_pair(tmp) as (server_end, client_end):
        peer = Peer(server=None, dead=set(dead), device=client_end)  # type: ignore[arg-type]
        peer.server = ModbusSerialServer([sim_device(u, t) for u, t in devices.items()],
                                         port=server_end, baudrate=baud,
                                         trace_packet=_tracer(peer, 0))
        task = await _serve(peer.server)
        try:
            yield peer
        finally:
            await peer.server.shutdown()
            task.cancel()


# ---------------------------------------------------------------------------------------------
# Golden frames from the profile files


@dataclass(frozen=True)
class Golden:
    description: str
    unit: int
    function: int
    address: int
    count: int
    registers: list[int]
    expected: dict[str, object]


def _hex(text: str) -> bytes:
    return bytes.fromhex("".join(text.split()))


def parse_golden(raw: Mapping[str, object]) -> Golden:
    """Check both RTU frames (CRC, unit, function, byte count) and return their content."""
    request, response = _hex(str(raw["request"])), _hex(str(raw["response"]))
    assert rtu_crc(request[:-2]) == request[-2:], "request CRC"
    assert rtu_crc(response[:-2]) == response[-2:], "response CRC"
    unit, function = request[0], request[1]
    address, count = int.from_bytes(request[2:4], "big"), int.from_bytes(request[4:6], "big")
    assert len(request) == 8 and response[0] == unit and response[1] == function
    assert response[2] == 2 * count == len(response) - 5, "byte count"
    data = response[3:-2]
    registers = [int.from_bytes(data[i:i + 2], "big") for i in range(0, len(data), 2)]
    assert raw["unit"] == unit
    return Golden(str(raw["description"]), unit, function, address, count, registers,
                  dict(raw["expected"]))  # type: ignore[call-overload]


def golden_tables(goldens: Iterable[Mapping[str, object]]) -> dict[str, dict[int, list[int]]]:
    """Server register contents that answer every golden request with its golden response
    (the first golden of each request wins)."""
    tables: dict[str, dict[int, list[int]]] = {}
    seen: set[tuple[int, int, int]] = set()
    for raw in goldens:
        g = parse_golden(raw)
        if (g.function, g.address, g.count) in seen:
            continue
        seen.add((g.function, g.address, g.count))
        table = {3: "holding", 4: "input"}[g.function]
        tables.setdefault(table, {})[g.address] = g.registers
    return tables


def first_goldens(goldens: Iterable[Mapping[str, object]]) -> dict[str, object]:
    """The values a device serving :func:`golden_tables` must decode to."""
    out: dict[str, object] = {}
    seen: set[tuple[int, int, int]] = set()
    for raw in goldens:
        g = parse_golden(raw)
        if (g.function, g.address, g.count) not in seen:
            seen.add((g.function, g.address, g.count))
            out.update(g.expected)
    return out


# ---------------------------------------------------------------------------------------------
# Running a bridge


@asynccontextmanager
async def running(bridge: object) -> AsyncIterator[list[tuple[str, list[object]]]]:
    """Run ``bridge`` with a list-collecting ``emit``; cancel it on exit."""
    got: list[tuple[str, list[object]]] = []

    async def emit(sensor: str, readings: Sequence[object]) -> None:
        got.append((sensor, list(readings)))

    task = asyncio.create_task(bridge.run(emit))  # type: ignore[attr-defined]
    try:
        yield got
    finally:
        await waiting.stop(task)


def latest(got: Sequence[tuple[str, Sequence[object]]], sensor: str) -> dict[str, object]:
    """The most recent value of every reading of ``sensor``."""
    out: dict[str, object] = {}
    for name, readings in got:
        if name == sensor:
            out.update({r.name: r.value for r in readings})  # type: ignore[attr-defined]
    return out
