"""The Modbus bridge: implements :class:`hw.bridge.Bridge` over one :class:`BusRunner` per bus.

``apply()`` parses the desired properties (see :mod:`hw.modbus.config` for the shape) and
reconciles: a bus whose link, timeout, gap or breaker settings changed is restarted; a bus
whose devices or writes changed is updated in place (its connection and the deadlines of its
unchanged jobs survive); untouched buses are not disturbed at all.

Direct methods (IoT Hub ref §5: JSON in, ``(status, JSON)`` out):

* ``write_register`` ``{"bus": "rs485", "unit": 3, "address": 4096, "value": 3}``; ``value``
  may be a list of registers (FC 16). ``write_coil``: ``{"bus", "unit", "address",
  "value": true}`` (FC 5).
* 200 written; 400 bad payload; 404 no such bus; 502 the unit answered with a Modbus
  exception (``exception_code`` in the payload); 503 the bus is down or busy; 504 no answer.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gateway.errors import ConfigError
from hw.bridge import Emit, Method
from hw.modbus.bus import Batch, BusBusy, BusRunner, TransportFactory
from hw.modbus.client import ExceptionResponse, LinkError, NoResponse, Transport
from hw.modbus.config import BusConfig, ModbusConfig, ProfileResolver, SerialLink, parse_config
from hw.modbus.profiles import ProfileLibrary
from hw.modbus.registers import MAX_WRITE_REGISTERS

log = logging.getLogger(__name__)

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
        self._methods: dict[str, Method] = {"write_register": self._write_register,
                                            "write_coil": self._write_coil}

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
        status: dict[str, Any] | None = self.status()["devices"].get(sensor)
        return status

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

    def _target(self, payload: Any) -> tuple[BusRunner, int, int, Any]:
        if not isinstance(payload, Mapping):
            raise ConfigError("payload must be an object")
        unknown = set(payload) - {"bus", "unit", "address", "value"}
        if unknown:
            raise ConfigError("unknown key", path=min(unknown))
        bus = payload.get("bus")
        runner = self._runners.get(bus) if isinstance(bus, str) else None
        if runner is None:
            raise LookupError(f"no bus named {bus!r} (known: {', '.join(self._runners)})")
        unit, address = payload.get("unit"), payload.get("address")
        if isinstance(unit, bool) or not isinstance(unit, int) or not 0 <= unit <= 255:
            raise ConfigError("must be an integer 0..255", path="unit")
        if isinstance(address, bool) or not isinstance(address, int) \
                or not 0 <= address <= 0xFFFF:
            raise ConfigError("must be an integer 0..65535", path="address")
        if "value" not in payload:
            raise ConfigError("is required", path="value")
        return runner, unit, address, payload["value"]

    async def _write_register(self, payload: Any) -> tuple[int, Any]:
        try:
            runner, unit, address, value = self._target(payload)
            values = value if isinstance(value, list) else [value]
            if not 1 <= len(values) <= MAX_WRITE_REGISTERS or any(
                    isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 0xFFFF
                    for v in values):
                raise ConfigError(f"must be a register 0..65535 or a list of 1.."
                                  f"{MAX_WRITE_REGISTERS} of them", path="value")
        except (ConfigError, LookupError) as exc:
            return _refused(exc)
        return await self._run_write(runner, unit, address, registers=values, echo=value)

    async def _write_coil(self, payload: Any) -> tuple[int, Any]:
        try:
            runner, unit, address, value = self._target(payload)
            if not isinstance(value, bool):
                raise ConfigError("must be true or false", path="value")
        except (ConfigError, LookupError) as exc:
            return _refused(exc)
        return await self._run_write(runner, unit, address, coil=value, echo=value)

    async def _run_write(self, runner: BusRunner, unit: int, address: int, *, echo: Any,
                         registers: list[int] | None = None,
                         coil: bool | None = None) -> tuple[int, Any]:
        where = {"bus": runner.config.name, "unit": unit, "address": address}
        try:
            async with asyncio.timeout(self._write_timeout):
                await runner.write(unit, address, registers=registers, coil=coil)
        except ExceptionResponse as exc:
            return 502, {**where, "error": str(exc), "exception_code": exc.exception_code}
        except (NoResponse, TimeoutError) as exc:
            return 504, {**where, "error": str(exc) or "no response"}
        except (BusBusy, LinkError) as exc:
            return 503, {**where, "error": str(exc)}
        return 200, {**where, "value": echo}


def _refused(exc: Exception) -> tuple[int, Any]:
    if isinstance(exc, LookupError):
        return 404, {"error": str(exc.args[0])}
    return 400, {"error": str(exc)}
