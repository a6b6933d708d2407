"""The owner of one physical bus: one transport, one schedule, one request at a time.

Every unit on the line is served from this one loop (Modbus over Serial Line V1.02 §2.1: a
single master, one transaction at a time). Each pass takes, in order: a direct-method write,
a desired-property write that is due, or the most overdue polling job. After every
transaction the line stays silent for t3.5 plus the configured extra gap (§2.5.1.1).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

from gateway.errors import DeviceError
from gateway.tasks import checkpoint
from hw.modbus.client import ExceptionResponse, LinkError, NoResponse, Transport
from hw.modbus.config import BusConfig, DeviceConfig, Link, SerialLink
from hw.modbus.registers import Block, DataType, Table, Value, encode_point
from hw.modbus.schedule import (
    BITS_PER_CHAR,
    BusSchedule,
    Job,
    Outcome,
    Transition,
    UnitState,
    frame_gap,
)
from hw.readings import Reading, iso

log = logging.getLogger(__name__)

Batch = tuple[str, list[Reading]]
WRITE_QUEUE = 16  # direct-method writes waiting for the line; beyond this: "busy"


class BusBusy(DeviceError):
    """Too many writes are already waiting for this bus, or the bus is down."""


class TransportLike(Protocol):
    @property
    def connected(self) -> bool: ...
    async def connect(self) -> None: ...
    def close(self) -> None: ...
    async def read(self, table: Table, unit: int, address: int,
                   count: int) -> list[int] | list[bool]: ...
    async def write_registers(self, unit: int, address: int, values: Sequence[int]) -> None: ...
    async def write_coil(self, unit: int, address: int, value: bool) -> None: ...


TransportFactory = Callable[..., TransportLike]


@dataclass(slots=True)
class DeviceStats:
    polls: int = 0
    errors: int = 0  # polls that got no (usable) answer
    exceptions: int = 0  # blocks answered with a Modbus exception
    last_read: float | None = None  # wall clock of the last good block
    latency: float | None = None  # seconds of the last complete poll
    last_error: str | None = None
    failing_blocks: dict[int, str] = field(default_factory=dict)  # block index -> error


@dataclass(slots=True)
class DesiredWrite:
    device: str
    point: str
    value: Value
    state: str = "pending"  # pending | done | error
    error: str | None = None
    at: float | None = None  # wall clock of the last attempt
    retry_at: float = 0.0  # monotonic


@dataclass(slots=True)
class _Request:
    """A direct request (a method's write, a technician's read), served ahead of polling.
    ``track``: its outcome counts in the unit's circuit breaker."""

    unit: int
    call: Callable[[TransportLike], Awaitable[Any]]
    track: bool
    future: asyncio.Future[Any]


def _write_call(unit: int, address: int, registers: Sequence[int] | None,
                coil: bool | None) -> Callable[[TransportLike], Awaitable[None]]:
    if coil is not None:
        return lambda t: t.write_coil(unit, address, coil)
    assert registers is not None
    return lambda t: t.write_registers(unit, address, registers)


async def _read(transport: TransportLike, *, block: Block, unit: int) -> list[int] | list[bool]:
    return await transport.read(block.table, unit, block.address, block.count)


class BusRunner:
    """Polls every device of one bus and performs its writes. ``run()`` until cancelled."""

    def __init__(self, config: BusConfig, devices: Sequence[DeviceConfig],
                 writes: Mapping[str, Mapping[str, Value]], *,
                 out: asyncio.Queue[Batch],
                 transport_factory: TransportFactory = Transport,
                 clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self.config = config
        self._out = out
        self._factory = transport_factory
        self._clock, self._wall = clock, wall
        link = config.link
        self.gap = (frame_gap(link.baud) if isinstance(link, SerialLink) else 0.0) \
            + config.extra_gap
        self.schedule = BusSchedule(breaker=config.breaker)
        self.devices: dict[str, DeviceConfig] = {}
        self.stats: dict[str, DeviceStats] = {}
        self.desired: dict[tuple[str, str], DesiredWrite] = {}
        self._queue: asyncio.Queue[_Request] = asyncio.Queue(WRITE_QUEUE)
        self._wake = asyncio.Event()
        self._transport: TransportLike | None = None
        self._line_free_at = 0.0
        # bus counters
        self.state = "connecting"
        self.since: float | None = None
        self.up_since_mono: float | None = None
        self.last_error: str | None = None
        self.requests = self.timeouts = self.exceptions = 0
        self.tx_bytes = self.rx_bytes = 0
        self.busy_time = 0.0
        self.connects = 0
        self.update(devices, writes)

    # -- configuration ------------------------------------------------------------------------

    def update(self, devices: Sequence[DeviceConfig],
               writes: Mapping[str, Mapping[str, Value]]) -> None:
        """Swap the device set and desired writes in place; the connection stays up and
        unchanged jobs keep their deadlines."""
        self.devices = {d.name: d for d in devices}
        self.stats = {n: self.stats.get(n, DeviceStats()) for n in self.devices}
        self.schedule.set_jobs((job for d in devices for job in d.jobs()), self._clock())
        desired: dict[tuple[str, str], DesiredWrite] = {}
        for device, values in writes.items():
            if device not in self.devices:
                continue
            for point, value in values.items():
                old = self.desired.get((device, point))
                keep = old is not None and old.value == value and type(old.value) is type(value)
                desired[(device, point)] = old if keep and old else DesiredWrite(device, point,
                                                                                 value)
        self.desired = desired
        self._wake.set()

    # -- the loop -----------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            while True:
                checkpoint()  # pymodbus may have dropped a cancel (gateway.tasks.checkpoint)
                try:
                    if self._transport is None or not self._transport.connected:
                        await self._connect()
                        continue
                    await self._step()
                except Exception as exc:  # a bug or a foreign surprise: restart, do not die
                    log.exception("bus loop failed bus=%s; reconnecting", self.config.name)
                    self._link_failed(LinkError(f"internal error: {exc!r}"))
                    await asyncio.sleep(1.0)
        finally:
            if self._transport is not None:
                self._transport.close()
            self._fail_queued(BusBusy("bus stopped"))

    async def _connect(self) -> None:
        backoff = 0.5
        while True:
            if self._transport is not None:
                self._transport.close()
            self._transport = self._factory(self.config.link, timeout=self.config.timeout,
                                            on_bytes=self._count_bytes)
            try:
                await self._transport.connect()
            except LinkError as exc:
                self._bus_down(str(exc))
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)
                continue
            self.connects += 1
            previous, self.state = self.state, "up"
            self.since, self.up_since_mono = self._wall(), self._clock()
            self.last_error = None
            if previous == "down":
                log.info("bus recovered bus=%s link=%s", self.config.name,
                         self.config.link.describe())
            else:
                log.info("bus up bus=%s link=%s", self.config.name, self.config.link.describe())
            return

    def _bus_down(self, error: str) -> None:
        if self.state != "down":
            log.warning("bus down bus=%s error=%s", self.config.name, error)
            self.state, self.since = "down", self._wall()
        self.last_error = error
        self._fail_queued(BusBusy(f"bus {self.config.name} is down: {error}"))

    def _link_failed(self, exc: LinkError) -> None:
        self._bus_down(str(exc))
        if self._transport is not None:
            self._transport.close()

    def _fail_queued(self, exc: Exception) -> None:
        while not self._queue.empty():
            request = self._queue.get_nowait()
            if not request.future.done():
                request.future.set_exception(exc)

    def _count_bytes(self, sending: bool, n: int) -> None:
        if sending:
            self.tx_bytes += n
        else:
            self.rx_bytes += n

    async def _step(self) -> None:
        self._wake.clear()
        now = self._clock()
        if not self._queue.empty():
            await self._direct(self._queue.get_nowait())
            return
        pending = self._due_desired_write(now)
        if pending is not None:
            await self._desired_write(pending)
            return
        job = self.schedule.next_job(now)
        if job is not None:
            await self._poll(job)
            return
        waits = [w for w in (self.schedule.wait_time(now), self._desired_wait(now))
                 if w is not None]
        try:
            async with asyncio.timeout(min(waits) if waits else None):
                await self._wake.wait()
        except TimeoutError:
            pass

    async def _transact(self, call: Callable[[TransportLike], Awaitable[Any]]) -> Any:
        """One request/response on the line, after the inter-frame silence."""
        assert self._transport is not None
        delay = self._line_free_at - self._clock()
        if delay > 0:
            await asyncio.sleep(delay)
        start = self._clock()
        self.requests += 1
        try:
            return await call(self._transport)
        except NoResponse:
            self.timeouts += 1
            raise
        except ExceptionResponse:
            self.exceptions += 1
            raise
        finally:
            end = self._clock()
            self.busy_time += end - start
            self._line_free_at = end + self.gap

    # -- polling ------------------------------------------------------------------------------

    async def _poll(self, job: Job) -> None:
        spec = job.spec
        stats = self.stats.get(spec.device) or DeviceStats()
        readings: list[Reading] = []
        outcome = Outcome.OK
        started = self._clock()
        for index, block in enumerate(spec.blocks):
            try:
                values = await self._transact(partial(_read, block=block, unit=spec.unit))
                decoded = block.decode(values)
            except ExceptionResponse as exc:
                stats.exceptions += 1
                if stats.failing_blocks.get(index) != str(exc):
                    log.warning("block refused device=%s unit=%d table=%s address=%d count=%d "
                                "error=%s", spec.device, spec.unit, block.table, block.address,
                                block.count, exc)
                    stats.failing_blocks[index] = str(exc)
                stats.last_error = f"{block.table} {block.address}+{block.count}: {exc}"
                continue
            except (NoResponse, ValueError) as exc:
                outcome = Outcome.TIMEOUT
                stats.last_error = str(exc)
                break
            except LinkError as exc:
                outcome = Outcome.LINK
                self._link_failed(exc)
                break
            if stats.failing_blocks.pop(index, None) is not None:
                log.info("block recovered device=%s unit=%d table=%s address=%d", spec.device,
                         spec.unit, block.table, block.address)
            acquired = self._wall()
            stats.last_read = acquired
            readings.extend(Reading(spec.device, p.name, v, p.unit, acquired)
                            for p, v in decoded)
        now = self._clock()
        if outcome is not Outcome.LINK:
            stats.polls += 1
            if outcome is Outcome.TIMEOUT:
                stats.errors += 1
            else:
                stats.latency = now - started
                if not stats.failing_blocks:
                    stats.last_error = None
        self._transition(spec.unit, self.schedule.finish(job, outcome, now), stats.last_error)
        if readings:
            await self._out.put((spec.device, readings))

    def _transition(self, unit: int, transition: Transition | None, error: str | None) -> None:
        if transition is None or transition is Transition.UP:
            return
        names = ",".join(sorted(d.name for d in self.devices.values() if d.unit == unit))
        if transition is Transition.DOWN:
            log.warning("unit %d down bus=%s devices=%s error=%s", unit, self.config.name,
                        names, error)
            return
        log.info("unit %d recovered bus=%s devices=%s", unit, self.config.name, names)
        for write in self.desired.values():  # a restarted device may have lost them
            device = self.devices.get(write.device)
            if device is not None and device.unit == unit and write.state == "done":
                write.state = "pending"

    # -- writes -------------------------------------------------------------------------------

    async def write(self, unit: int, address: int, *, registers: Sequence[int] | None = None,
                    coil: bool | None = None) -> None:
        """A direct write (FC 5, 6 or 16), queued ahead of polling. Raises ``BusBusy``,
        ``LinkError``, ``NoResponse`` or ``ExceptionResponse``."""
        await self._request(unit, _write_call(unit, address, registers, coil), track=True)

    async def read(self, unit: int, table: Table, address: int,
                   count: int) -> list[int] | list[bool]:
        """An ad-hoc read (a technician probing or scanning the live bus), queued ahead of
        polling like a write. It does not count in the unit's circuit breaker: asking an
        absent unit id is what a scan does. Raises like :meth:`write`."""
        result: list[int] | list[bool] = await self._request(
            unit, lambda t: t.read(table, unit, address, count), track=False)
        return result

    async def _request(self, unit: int, call: Callable[[TransportLike], Awaitable[Any]], *,
                       track: bool) -> Any:
        if self.state == "down":
            raise BusBusy(f"bus {self.config.name} is down: {self.last_error}")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait(_Request(unit, call, track, future))
        except asyncio.QueueFull:
            raise BusBusy(f"bus {self.config.name}: {WRITE_QUEUE} requests already queued") \
                from None
        self._wake.set()
        return await future

    async def _direct(self, request: _Request) -> None:
        if request.future.done():  # the caller gave up waiting: do not send late
            return
        try:
            result = await self._run(request.unit, request.call, track=request.track)
        except DeviceError as exc:
            if not request.future.done():
                request.future.set_exception(exc)
        else:
            if not request.future.done():
                request.future.set_result(result)

    async def _write_to(self, unit: int, address: int, registers: Sequence[int] | None,
                        coil: bool | None) -> None:
        await self._run(unit, _write_call(unit, address, registers, coil), track=True)

    async def _run(self, unit: int, call: Callable[[TransportLike], Awaitable[Any]], *,
                   track: bool) -> Any:
        try:
            result = await self._transact(call)
        except NoResponse as exc:
            if track:
                self._transition(unit, self.schedule.record(unit, Outcome.TIMEOUT,
                                                            self._clock()), str(exc))
            raise
        except ExceptionResponse:
            if track:
                self._transition(unit, self.schedule.record(unit, Outcome.EXCEPTION,
                                                            self._clock()), None)
            raise
        except LinkError as exc:
            self._link_failed(exc)
            raise
        if track:
            self._transition(unit, self.schedule.record(unit, Outcome.OK, self._clock()), None)
        return result

    def _due_desired_write(self, now: float) -> DesiredWrite | None:
        for write in self.desired.values():
            device = self.devices.get(write.device)
            if write.state == "pending" and write.retry_at <= now and device is not None \
                    and self.schedule.unit(device.unit).allows(now):
                return write
        return None

    def _desired_wait(self, now: float) -> float | None:
        waits = []
        for w in self.desired.values():
            device = self.devices.get(w.device)
            if w.state != "pending" or device is None:
                continue
            breaker = self.schedule.unit(device.unit)
            at = max(w.retry_at, breaker.retry_at) if breaker.state is UnitState.DOWN \
                else w.retry_at
            waits.append(max(0.0, at - now))
        return min(waits) if waits else None

    async def _desired_write(self, write: DesiredWrite) -> None:
        device = self.devices[write.device]
        point = device.point(write.point)
        assert point is not None
        write.at = self._wall()
        try:
            if point.type is DataType.BOOL:
                await self._write_to(device.unit, point.address, None, bool(write.value))
            else:
                await self._write_to(device.unit, point.address,
                                     encode_point(point, write.value), None)
        except ExceptionResponse as exc:
            write.state, write.error = "error", str(exc)
            log.warning("write refused device=%s point=%s value=%r error=%s", write.device,
                        write.point, write.value, exc)
        except (NoResponse, LinkError) as exc:
            write.error = str(exc)
            write.retry_at = self._clock() + max(1.0, device.interval)
        else:
            write.state, write.error = "done", None
            log.info("wrote device=%s point=%s value=%r", write.device, write.point,
                     write.value)

    # -- status -------------------------------------------------------------------------------

    def status(self) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        """(bus, devices, writes) for the reported properties."""
        now, wall = self._clock(), self._wall()
        link: Link = self.config.link
        bus: dict[str, Any] = {
            "link": link.describe(),
            "state": self.state,
            "since": iso(self.since) if self.since else None,
            "gap_ms": round(self.gap * 1000, 3),
            "connects": self.connects,
            "requests": self.requests,
            "timeouts": self.timeouts,
            "exceptions": self.exceptions,
            "tx_bytes": self.tx_bytes,
            "rx_bytes": self.rx_bytes,
            "queued_writes": self._queue.qsize(),
            "last_error": self.last_error,
        }
        if self.up_since_mono is not None and now > self.up_since_mono:
            elapsed = now - self.up_since_mono
            bus["busy"] = round(min(1.0, self.busy_time / elapsed), 4)
            if isinstance(link, SerialLink):
                wire = (self.tx_bytes + self.rx_bytes) * BITS_PER_CHAR / link.baud
                bus["utilisation"] = round(min(1.0, wire / elapsed), 4)
        devices = {name: self.device_status(name, now, wall) for name in self.devices}
        writes: dict[str, Any] = {}
        for w in self.desired.values():
            writes.setdefault(w.device, {})[w.point] = {
                "value": w.value, "state": w.state, "error": w.error,
                "at": iso(w.at) if w.at else None}
        return bus, devices, writes

    def device_status(self, name: str, now: float | None = None,
                      wall: float | None = None) -> dict[str, Any]:
        """One device's part of :meth:`status` (a child device's reported status)."""
        now = self._clock() if now is None else now
        wall = self._wall() if wall is None else wall
        device = self.devices[name]
        stats = self.stats.get(name, DeviceStats())
        breaker = self.schedule.unit(device.unit)
        jobs = [j for j in self.schedule.jobs.values() if j.spec.device == name]
        entry: dict[str, Any] = {
            "bus": self.config.name,
            "unit": device.unit,
            "source": device.source,
            "state": breaker.state.value,
            "interval": device.interval,
            "polls": stats.polls,
            "errors": stats.errors,
            "exceptions": stats.exceptions,
            "overruns": sum(j.overruns for j in jobs),
            "last_read": iso(stats.last_read) if stats.last_read else None,
            "latency_ms": round(stats.latency * 1000, 1) if stats.latency is not None
            else None,
            "last_error": stats.last_error,
        }
        if breaker.state is UnitState.DOWN:
            entry["retry_at"] = iso(wall + max(0.0, breaker.retry_at - now))
        return entry
