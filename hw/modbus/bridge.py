"""The Modbus bridge: implements :class:`hw.bridge.Bridge` over one :class:`BusRunner` per bus.

``apply()`` parses the desired properties (see :mod:`hw.modbus.config` for the shape) and
reconciles: a bus whose link, timeout, gap or breaker settings changed is restarted; a bus
whose devices or writes changed is updated in place (its connection and the deadlines of its
unchanged jobs survive); untouched buses are not disturbed at all.

Direct methods (IoT Hub ref §5: JSON in, ``(status, JSON)`` out):

* ``write_register`` ``{"bus": "rs485", "unit": 3, "address": 4096, "value": 3}``; ``value``
  may be a list of registers (FC 16). ``write_coil``: ``{"bus", "unit", "address",
  "value": true}`` (FC 5). Only registers and coils of a point marked ``"writable": true`` in
  that unit's register map may be written: any other address is refused with 403, before
  anything goes on the wire.
* ``read_registers`` ``{"bus", "unit", "address", "count": 1, "table": "holding",
  "interpret": false}``: a read on the live bus, with every type and byte/word-order reading
  when ``interpret`` (what ``gateway modbus probe`` prints, without stopping the bridge).
* ``scan`` ``{"bus", "units": "1-247", "address": 0, "table": "holding", "seconds": 240}``:
  the unit ids that answer (``gateway modbus scan`` on the live bus; polling goes on between
  its requests, which do not count in the circuit breakers). On a serial bus, ``baud`` and
  ``parity`` scan at another setting than the bus's (a unit of unknown settings): the bus
  stops polling meanwhile, the port is opened at that setting, and the bus is restarted at
  its own settings afterwards; the answer names the setting.
* 200 done; 400 bad payload; 403 not writable; 404 no such bus; 502 the unit answered with a Modbus
  exception (``exception_code`` in the payload); 503 the bus is down or busy; 504 no answer.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

from gateway.errors import ConfigError
from hw.bridge import Emit, Method
from hw.modbus.bus import Batch, BusBusy, BusRunner, TransportFactory
from hw.modbus.client import ExceptionResponse, LinkError, NoResponse, Transport
from hw.modbus.config import BusConfig, ModbusConfig, ProfileResolver, SerialLink, parse_config
from hw.modbus.probe import interpret
from hw.modbus.profiles import ProfileLibrary
from hw.modbus.registers import MAX_READ_BITS, MAX_READ_REGISTERS, MAX_WRITE_REGISTERS, Table
from hw.modbus.scan import parse_units, scan_units

log = logging.getLogger(__name__)
T = TypeVar("T")

UNSTABLE_PORT = re.compile(r"^/dev/tty(USB|ACM)\d+$")
BY_ID = Path("/dev/serial/by-id")


def stable_name_for(port: str, by_id: Path = BY_ID) -> str | None:
    """The ``/dev/serial/by-id`` link that points at ``port``, if there is one."""
    try:
        target = Path(port).resolve()
        for link in sorted(by_id.iterdir()):
            if link.resolve() == target:
                return str(link)
    except OSError:
        pass
    return None


class ModbusBridge:
    """Polls Modbus TCP and RTU devices and performs writes. One instance per process."""

    name = "modbus"

    def __init__(self, *, profiles: ProfileResolver | None = None,
                 transport_factory: TransportFactory = Transport, queue_size: int = 256,
                 write_timeout: float = 10.0) -> None:
        self._profiles = profiles or ProfileLibrary()
        self._factory = transport_factory
        self._write_timeout = write_timeout
        self._config = ModbusConfig()
        self._changed = asyncio.Event()
        self._out: asyncio.Queue[Batch] = asyncio.Queue(queue_size)
        self._runners: dict[str, BusRunner] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._sweeping: set[str] = set()  # buses whose port a scan at other settings holds
        self._methods: dict[str, Method] = {"write_register": self._write_register,
                                            "write_coil": self._write_coil,
                                            "read_registers": self._read_registers,
                                            "scan": self._scan}

    @property
    def config(self) -> ModbusConfig:
        return self._config

    # -- Bridge protocol ----------------------------------------------------------------------

    def apply(self, desired: Mapping[str, Any]) -> None:
        config = parse_config(desired, self._profiles)
        for name, bus in config.buses.items():
            if bus != self._config.buses.get(name) and isinstance(bus.link, SerialLink) \
                    and UNSTABLE_PORT.match(bus.link.port):
                stable = stable_name_for(bus.link.port)
                log.warning("unstable serial port name bus=%s port=%s: ttyUSB/ttyACM numbers "
                            "change across reboots and replugs; use %s", name, bus.link.port,
                            stable or "a /dev/serial/by-id/... name")
        self._config = config
        self._changed.set()

    async def run(self, emit: Emit) -> None:
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._emitter(emit), name="modbus-emit")
                while True:
                    self._changed.clear()
                    await self._reconcile(tg)
                    await self._changed.wait()
        finally:
            self._runners.clear()
            self._tasks.clear()

    def status(self) -> dict[str, Any]:
        buses: dict[str, Any] = {}
        devices: dict[str, Any] = {}
        writes: dict[str, Any] = {}
        for name, runner in self._runners.items():
            bus, devs, wr = runner.status()
            buses[name] = bus
            devices.update(devs)
            writes.update(wr)
        return {"buses": buses, "devices": devices, "writes": writes}

    def sensor_status(self, sensor: str) -> dict[str, Any] | None:
        runner = next((r for r in self._runners.values() if sensor in r.devices), None)
        return runner.device_status(sensor) if runner is not None else None

    def sensor_config_path(self, desired: Mapping[str, Any], sensor: str) -> tuple[str, ...] | None:
        devices = desired.get("devices")
        return ("devices", sensor) if isinstance(devices, Mapping) and sensor in devices else None

    def set_secrets(self, secrets: Mapping[str, str]) -> None:
        """Modbus frames are not encrypted: nothing to do."""

    @property
    def methods(self) -> Mapping[str, Method]:
        return self._methods

    # -- internals ----------------------------------------------------------------------------

    async def _emitter(self, emit: Emit) -> None:
        while True:
            sensor, readings = await self._out.get()
            await emit(sensor, readings)

    async def _stop(self, name: str) -> None:
        task = self._tasks.pop(name)
        self._runners.pop(name)
        task.cancel()
        await asyncio.wait([task])

    async def _reconcile(self, tg: asyncio.TaskGroup) -> None:
        config = self._config
        for name in list(self._runners):
            if self._runners[name].config != config.buses.get(name):
                await self._stop(name)
        for name, bus in config.buses.items():
            if name in self._sweeping:
                continue  # restarted when that scan ends
            devices = config.devices_on(name)
            writes = {d: w for d, w in config.writes.items() if config.devices[d].bus == name}
            runner = self._runners.get(name)
            if runner is not None:
                runner.update(devices, writes)
                continue
            runner = self._start(bus, devices, writes)
            self._tasks[name] = tg.create_task(runner.run(), name=f"modbus-bus-{name}")

    def _start(self, bus: BusConfig, devices: Any, writes: Any) -> BusRunner:
        runner = BusRunner(bus, devices, writes, out=self._out,
                           transport_factory=self._factory)
        self._runners[bus.name] = runner
        return runner

    # -- direct methods -----------------------------------------------------------------------

    def _target(self, payload: Any, *, extra: frozenset[str] = frozenset({"value"}),
                value: bool = True) -> tuple[BusRunner, int, int, Any]:
        """``bus``, ``unit`` and ``address`` of a method's payload (and ``value`` if needed);
        ``extra`` are the other keys allowed."""
        if not isinstance(payload, Mapping):
            raise ConfigError("payload must be an object")
        unknown = set(payload) - {"bus", "unit", "address"} - extra
        if unknown:
            raise ConfigError("unknown key", path=min(unknown))
        runner = self._runner(payload)
        unit, address = payload.get("unit"), payload.get("address", None if value else 0)
        if isinstance(unit, bool) or not isinstance(unit, int) or not 0 <= unit <= 255:
            raise ConfigError("must be an integer 0..255", path="unit")
        if isinstance(address, bool) or not isinstance(address, int) \
                or not 0 <= address <= 0xFFFF:
            raise ConfigError("must be an integer 0..65535", path="address")
        if value and "value" not in payload:
            raise ConfigError("is required", path="value")
        return runner, unit, address, payload.get("value")

    def _runner(self, payload: Mapping[str, Any]) -> BusRunner:
        bus = payload.get("bus")
        runner = self._runners.get(bus) if isinstance(bus, str) else None
        if runner is None:
            raise LookupError(f"no bus named {bus!r} (known: {', '.join(self._runners)})")
        return runner

    async def _write_register(self, payload: Any) -> tuple[int, Any]:
        try:
            runner, unit, address, value = self._target(payload)
            values = value if isinstance(value, list) else [value]
            if not 1 <= len(values) <= MAX_WRITE_REGISTERS or any(
                    isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 0xFFFF
                    for v in values):
                raise ConfigError(f"must be a register 0..65535 or a list of 1.."
                                  f"{MAX_WRITE_REGISTERS} of them", path="value")
            self._check_writable(runner, unit, Table.HOLDING, address, len(values))
        except (ConfigError, LookupError, PermissionError) as exc:
            return _refused(exc)
        return await self._run_write(runner, unit, address, registers=values, echo=value)

    async def _write_coil(self, payload: Any) -> tuple[int, Any]:
        try:
            runner, unit, address, value = self._target(payload)
            if not isinstance(value, bool):
                raise ConfigError("must be true or false", path="value")
            self._check_writable(runner, unit, Table.COIL, address, 1)
        except (ConfigError, LookupError, PermissionError) as exc:
            return _refused(exc)
        return await self._run_write(runner, unit, address, coil=value, echo=value)

    def _check_writable(self, runner: BusRunner, unit: int, table: Table, address: int,
                        count: int) -> None:
        bus = runner.config.name
        bad = self._config.unwritable(bus, unit, table, address, count)
        if bad is not None:
            kind = "coil" if table is Table.COIL else "holding register"
            raise PermissionError(
                f"{kind} {bad} of unit {unit} on bus {bus!r} is not writable: no point of that "
                f"unit's register map covering it is marked \"writable\": true")

    async def _run_write(self, runner: BusRunner, unit: int, address: int, *, echo: Any,
                         registers: list[int] | None = None,
                         coil: bool | None = None) -> tuple[int, Any]:
        where = {"bus": runner.config.name, "unit": unit, "address": address}
        return await self._on_bus(where, runner.write(unit, address, registers=registers,
                                                      coil=coil), lambda _: {"value": echo})

    async def _on_bus(self, where: dict[str, Any], request: Awaitable[T],
                      answer: Callable[[T], dict[str, Any]]) -> tuple[int, Any]:
        """One direct request on the bus, its failures mapped to method statuses: 502 the
        unit answered with an exception, 504 no answer, 503 the bus is down or busy."""
        try:
            async with asyncio.timeout(self._write_timeout):
                result = await request
        except ExceptionResponse as exc:
            return 502, {**where, "error": str(exc), "exception_code": exc.exception_code}
        except (NoResponse, TimeoutError) as exc:
            return 504, {**where, "error": str(exc) or "no response"}
        except (BusBusy, LinkError) as exc:
            return 503, {**where, "error": str(exc)}
        return 200, {**where, **answer(result)}

    async def _read_registers(self, payload: Any) -> tuple[int, Any]:
        """Read a block on the live bus (a technician's probe without stopping the bridge):
        ``{"bus", "unit", "address", "count": 1, "table": "holding", "interpret": false}``;
        ``interpret`` adds every type and byte/word-order reading (gateway modbus probe)."""
        try:
            runner, unit, address, _ = self._target(
                payload, extra=frozenset({"count", "table", "interpret"}), value=False)
            table = _table(payload.get("table", "holding"))
            count = payload.get("count", 1)
            limit = MAX_READ_BITS if table.is_bits else MAX_READ_REGISTERS
            if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= limit \
                    or address + count > 0x10000:
                raise ConfigError(f"must be 1..{limit} within the address space", path="count")
        except (ConfigError, LookupError) as exc:
            return _refused(exc)
        where = {"bus": runner.config.name, "unit": unit, "address": address,
                 "table": str(table)}

        def answer(values: list[int] | list[bool]) -> dict[str, Any]:
            out: dict[str, Any] = {"values": values}
            if payload.get("interpret") and not table.is_bits:
                out["interpretations"] = [
                    {"type": row.type, "order": row.order, "values": list(row.values)}
                    for row in interpret([int(v) for v in values])]
            return out

        return await self._on_bus(where, runner.read(unit, table, address, count), answer)

    async def _scan(self, payload: Any) -> tuple[int, Any]:
        """Find the unit ids answering on a live bus (gateway modbus scan, through the bus
        scheduler so polling goes on in between): ``{"bus", "units": "1-247", "address": 0,
        "table": "holding", "seconds": 240}``; stops at ``seconds`` with what it has."""
        try:
            if not isinstance(payload, Mapping):
                raise ConfigError("payload must be an object")
            unknown = set(payload) - {"bus", "units", "address", "table", "seconds", "baud",
                                      "parity"}
            if unknown:
                raise ConfigError("unknown key", path=min(unknown))
            runner = self._runner(payload)
            raw = payload.get("units", "1-247")
            try:
                units = parse_units(raw if isinstance(raw, str)
                                    else ",".join(str(int(u)) for u in raw))
            except (TypeError, ValueError) as exc:
                raise ConfigError(str(exc), path="units") from None
            address = payload.get("address", 0)
            if isinstance(address, bool) or not isinstance(address, int) \
                    or not 0 <= address <= 0xFFFF:
                raise ConfigError("must be an integer 0..65535", path="address")
            table = _table(payload.get("table", "holding"))
            seconds = payload.get("seconds", 240)
            if isinstance(seconds, bool) or not isinstance(seconds, int | float) \
                    or not 0 < seconds <= 290:
                raise ConfigError("must be 0..290 (a method answers within 300 s)",
                                  path="seconds")
            trial = _serial_setting(runner.config.link, payload)
        except (ConfigError, LookupError) as exc:
            return _refused(exc)
        where = {"bus": runner.config.name, "table": str(table), "address": address}
        if trial is not None:
            return await self._scan_at(runner, trial, units, table=table, address=address,
                                       deadline=time.monotonic() + seconds, where=where)
        try:
            answers, asked = await scan_units(
                lambda unit: runner.read(unit, table, address, 1), units, table=table,
                address=address, deadline=time.monotonic() + seconds)
        except (BusBusy, LinkError) as exc:
            return 503, {**where, "error": str(exc)}
        return 200, {**where, "asked": asked, "complete": asked == len(units),
                     "answered": [{"unit": a.unit, "kind": a.kind, "detail": a.detail}
                                  for a in answers]}


    async def _scan_at(self, runner: BusRunner, link: SerialLink, units: list[int], *,
                       table: Table, address: int, deadline: float,
                       where: dict[str, Any]) -> tuple[int, Any]:
        """Scan with the bus's port opened at ``link``'s baud rate and parity (the bus's runner
        is stopped meanwhile: one owner of the line at a time), then restart the bus."""
        name = runner.config.name
        where = {**where, "baud": link.baud, "parity": link.parity}
        if name in self._sweeping:
            return 503, {**where, "error": "another scan at other settings holds this bus"}
        self._sweeping.add(name)
        try:
            if name in self._tasks:
                await self._stop(name)
            transport = Transport(link, timeout=min(runner.config.timeout, 0.5),
                                  max_no_responses=1_000_000)
            try:
                await transport.connect()
                answers, asked = await scan_units(
                    lambda unit: transport.read(table, unit, address, 1), units, table=table,
                    address=address, deadline=deadline)
            except LinkError as exc:
                return 503, {**where, "error": str(exc)}
            finally:
                transport.close()
        finally:
            self._sweeping.discard(name)
            self._changed.set()  # the bus runs again at its own settings
        return 200, {**where, "asked": asked, "complete": asked == len(units),
                     "answered": [{"unit": a.unit, "kind": a.kind, "detail": a.detail}
                                  for a in answers]}


def _serial_setting(link: Any, payload: Mapping[str, Any]) -> SerialLink | None:
    """The serial setting a scan asks for, when it differs from the bus's own (else None)."""
    if "baud" not in payload and "parity" not in payload:
        return None
    if not isinstance(link, SerialLink):
        raise ConfigError("only a serial bus has a baud rate and parity", path="baud")
    baud, parity = payload.get("baud", link.baud), payload.get("parity", link.parity)
    if isinstance(baud, bool) or not isinstance(baud, int) or not 300 <= baud <= 4_000_000:
        raise ConfigError("must be an integer 300..4000000", path="baud")
    if parity not in ("N", "E", "O"):
        raise ConfigError("must be N, E or O", path="parity")
    trial = replace(link, baud=baud, parity=parity)
    return None if trial == link else trial


def _table(value: Any) -> Table:
    try:
        return Table(value)
    except ValueError:
        raise ConfigError("must be holding, input, coil or discrete", path="table") from None


def _refused(exc: Exception) -> tuple[int, Any]:
    if isinstance(exc, LookupError):
        return 404, {"error": str(exc.args[0])}
    if isinstance(exc, PermissionError):
        return 403, {"error": str(exc)}
    return 400, {"error": str(exc)}
