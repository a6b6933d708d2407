"""A simulated Modbus device: a real pymodbus TCP server answering a profile's register map.

Used by ``gateway demo`` (a live SDM120 energy meter on loopback) and by tests. The values
follow a slow daily-ish curve plus noise, encoded exactly as the profile says the meter encodes
them, so the Modbus bridge reads them through the same planner and decoders as a real meter.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Callable, Mapping
from typing import Self

from pymodbus.server import ModbusSerialServer, ModbusTcpServer
from pymodbus.simulator import DataType as SimType
from pymodbus.simulator import SimData, SimDevice

from hw.modbus.config import Profile
from hw.modbus.profiles import ProfileLibrary
from hw.modbus.registers import Point, Table, encode_point

_TABLES = (Table.COIL, Table.DISCRETE, Table.HOLDING, Table.INPUT)
_FC = {Table.COIL: 5, Table.DISCRETE: 2, Table.HOLDING: 6, Table.INPUT: 4}


def meter_values(t: float, rng: random.Random) -> dict[str, float]:
    """Plausible single-phase readings at time ``t``."""
    power = 1800 + 900 * math.sin(t / 40) + rng.gauss(0, 15)
    voltage = 230 + rng.gauss(0, 0.8)
    return {
        "voltage": voltage,
        "current": power / voltage,
        "active_power": power,
        "apparent_power": power / 0.95,
        "reactive_power": power * 0.33,
        "power_factor": 0.95,
        "frequency": 50 + rng.gauss(0, 0.01),
        "import_active_energy": 12840 + (t % 86400) / 3600 * 1.8,
        "export_active_energy": 0.0,
        "total_active_energy": 12840 + (t % 86400) / 3600 * 1.8,
    }


def _device(unit: int, profile: Profile) -> SimDevice:
    blocks = []
    for table in _TABLES:
        points = [p for p in profile.points if p.table is table]
        bits = table.is_bits
        if not points and table is Table.HOLDING:  # room for configuration writes
            blocks.append([SimData(0, values=[0] * 100, datatype=SimType.REGISTERS)])
            continue
        if not points:
            blocks.append([SimData(0xFFF0, values=[False] if bits else [0],
                                   datatype=SimType.BITS if bits else SimType.REGISTERS)])
            continue
        start = min(p.address for p in points)
        end = max(p.end for p in points)
        blocks.append([SimData(start, values=[False] * (end - start) if bits else
                               [0] * (end - start),
                               datatype=SimType.BITS if bits else SimType.REGISTERS)])
    return SimDevice(id=unit, simdata=(blocks[0], blocks[1], blocks[2], blocks[3]))


class SimulatedMeter:
    """``async with SimulatedMeter("eastron-sdm120", port=...) as meter`` serves on loopback
    (Modbus TCP), or over RTU on the serial device ``serial`` at ``baud``; :meth:`run`
    refreshes the values every ``period`` seconds."""

    def __init__(self, profile: str = "eastron-sdm120", *, unit: int = 1, port: int = 0,
                 values: Callable[[float, random.Random], Mapping[str, float]] = meter_values,
                 seed: int = 7, serial: str = "", baud: int = 9600) -> None:
        self.profile = ProfileLibrary()(profile)
        self.unit = unit
        self.port = port
        self._values = values
        self._rng = random.Random(seed)
        self.serial, self.baud = serial, baud
        self.server: ModbusTcpServer | ModbusSerialServer | None = None
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Self:
        if self.serial:
            self.server = ModbusSerialServer([_device(self.unit, self.profile)],
                                             port=self.serial, baudrate=self.baud)
        else:
            if not self.port:
                import socket

                with socket.socket() as s:
                    s.bind(("127.0.0.1", 0))
                    self.port = int(s.getsockname()[1])
            self.server = ModbusTcpServer([_device(self.unit, self.profile)],
                                          address=("127.0.0.1", self.port))
        self._task = asyncio.get_running_loop().create_task(self.server.serve_forever())
        await asyncio.sleep(0.1)
        await self.update()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.server is not None:
            await self.server.shutdown()  # type: ignore[no-untyped-call]
        if self._task is not None:
            self._task.cancel()

    async def update(self) -> None:
        assert self.server is not None
        values = self._values(time.time(), self._rng)
        for point in self.profile.points:
            if point.name in values:
                await self._put(point, values[point.name])

    async def _put(self, point: Point, value: float) -> None:
        assert self.server is not None
        words = encode_point(point, value)
        await self.server.context.async_setValues(self.unit, _FC[point.table], point.address,
                                                   words)

    async def get(self, table: Table, address: int, count: int = 1) -> list[int]:
        assert self.server is not None
        fc = {Table.COIL: 1, Table.DISCRETE: 2, Table.HOLDING: 3, Table.INPUT: 4}[table]
        values = await self.server.context.async_getValues(self.unit, fc, address, count)
        return [int(v) for v in values]  # type: ignore[union-attr]

    async def run(self, period: float = 1.0) -> None:
        while True:
            await asyncio.sleep(period)
            await self.update()
