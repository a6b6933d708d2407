"""The serial bridge: each configured port read, decoded and emitted as readings.

Implements :class:`hw.bridge.Bridge`. Per port: one task owns the open port (reopened with
exponential backoff after an error, an unplug or a silence timeout) and one forwards decoded
batches to ``emit`` through a bounded queue (when ``emit`` cannot keep up, the oldest batch is
dropped and counted: a serial device cannot be paused, and blocking would only move the loss into
the kernel's tty buffer). A port named by a USB ``match`` rule runs while a matching adapter is
plugged in (:class:`hw.hotplug.UsbSerialWatcher`).

``apply`` restarts only what changed: a port whose path, match rule, line settings or timing
changed is reopened; a port whose decoder, sensor name or line limit changed keeps its open port
and swaps its reader; other ports are not touched. Failures are logged once on the transition
("serial port gps down: ..." / "serial port gps recovered"), never per retry.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, Protocol

from gateway.errors import DeviceError
from hw.bridge import Emit, Method
from hw.hotplug import Callback, MatchRule, UsbSerialDevice, UsbSerialWatcher
from hw.readings import Reading, iso
from hw.serial.config import PortConfig, SerialConfig, parse_config
from hw.serial.port import LinkSettings, SerialPort, list_ports, unstable_name_warning

__all__ = ["SerialBridge"]

log = logging.getLogger(__name__)

QUEUE_SIZE = 256  # decoded lines buffered per port between the reader and emit
WATCHER_RETRY = (1.0, 60.0)  # seconds: first and longest wait before restarting a failed watcher
LAST_LINE_CHARS = 120

State = Literal["stopped", "disabled", "waiting", "connecting", "up", "down"]
Opener = Callable[[str, LinkSettings], SerialPort]


class Watcher(Protocol):
    def set_rules(self, rules: Sequence[MatchRule]) -> None: ...

    async def run(self) -> None: ...


WatcherFactory = Callable[[Sequence[MatchRule], Callback, Callback], Watcher]


def _udev_watcher(rules: Sequence[MatchRule], started: Callback, stopped: Callback) -> Watcher:
    return UsbSerialWatcher(rules, started=started, stopped=stopped)


class SerialBridge:
    """Serial ports -> readings. See the module docstring and :mod:`hw.serial.config`."""

    name = "serial"

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.time,
        opener: Opener = SerialPort.open,
        watcher_factory: WatcherFactory = _udev_watcher,
        queue_size: int = QUEUE_SIZE,
        watcher_retry: tuple[float, float] = WATCHER_RETRY,
    ) -> None:
        self._clock = clock
        self._opener = opener
        self._watcher_factory = watcher_factory
        self._queue_size = queue_size
        self._watcher_retry = watcher_retry
        self._config = SerialConfig()
        self._ports: dict[str, _Port] = {}
        self._group: asyncio.TaskGroup | None = None
        self._emit: Emit | None = None
        self._watcher: Watcher | None = None
        self._methods: dict[str, Method] = {
            "listPorts": self._list_ports,
            "resetCounters": self._reset_counters,
        }

    # -- Bridge protocol ------------------------------------------------------------------------

    async def run(self, emit: Emit) -> None:
        if self._group is not None:
            raise RuntimeError("the serial bridge is already running")
        try:
            async with asyncio.TaskGroup() as group:
                self._group = group
                self._emit = emit
                for port in self._ports.values():
                    self._start(port)
                self._ensure_watcher()
                await asyncio.get_running_loop().create_future()  # until cancelled
        finally:
            self._group = None
            self._emit = None
            self._watcher = None
            for port in self._ports.values():
                port.task = None
                port.set_state("stopped")

    def apply(self, desired: Mapping[str, Any]) -> None:
        config = parse_config(desired)  # raises ConfigError; the old config then stays
        old = self._config
        self._config = config
        for name in old.ports.keys() - config.ports.keys():
            self._ports.pop(name).stop()
            log.info("serial port %s removed", name)
        for name, cfg in config.ports.items():
            port = self._ports.get(name)
            if port is None:
                port = _Port(cfg, self._clock, self._opener, self._queue_size)
                self._ports[name] = port
                if port.warning:
                    log.warning("serial port %s: %s", name, port.warning)
                self._start(port)
            elif port.cfg == cfg:
                continue
            elif port.cfg.same_link(cfg):
                port.swap_decoding(cfg)
                log.info("serial port %s: decoding changed (port kept open)", name)
            else:
                port.stop()
                port.reconfigure(cfg)
                if port.warning:
                    log.warning("serial port %s: %s", name, port.warning)
                log.info("serial port %s: settings changed, reopening", name)
                self._start(port)
        if self._watcher is not None:
            self._watcher.set_rules(config.rules)
        else:
            self._ensure_watcher()

    def status(self) -> dict[str, Any]:
        return {"ports": {name: port.status() for name, port in self._ports.items()}}

    def sensor_status(self, sensor: str) -> dict[str, Any] | None:
        return next((port.status() for port in self._ports.values()
                     if port.cfg.sensor == sensor), None)

    def sensor_config_path(self, desired: Mapping[str, Any], sensor: str) -> tuple[str, ...] | None:
        """A port's sensor is its ``sensor`` key, or the port name."""
        ports = desired.get("ports")
        if not isinstance(ports, Mapping):
            return None
        return next((("ports", name) for name, spec in ports.items()
                     if isinstance(spec, Mapping) and spec.get("sensor", name) == sensor), None)

    def set_secrets(self, secrets: Mapping[str, str]) -> None:
        """Serial lines are not encrypted: nothing to do."""

    @property
    def methods(self) -> Mapping[str, Method]:
        return self._methods

    # -- ports and hotplug ----------------------------------------------------------------------

    def _start(self, port: _Port) -> None:
        cfg = port.cfg
        if not cfg.enabled:
            port.set_state("disabled")
            return
        path = cfg.path or (port.device.stable_path if port.device else None)
        if path is None:
            port.set_state("waiting")
            return
        if self._group is None or self._emit is None:
            return  # not running yet: run() starts it
        port.set_state("connecting")
        previous = port.task
        port.task = self._group.create_task(port.run(self._emit, path, previous))

    def _ensure_watcher(self) -> None:
        if self._watcher is None and self._group is not None and self._config.rules:
            self._watcher = self._watcher_factory(
                self._config.rules, self._device_started, self._device_stopped
            )
            self._group.create_task(self._watch(self._watcher))

    async def _watch(self, watcher: Watcher) -> None:
        """Run the hotplug watcher; if udev fails, ports named by path keep running while it
        is retried with backoff (logged once per outage)."""
        delay = self._watcher_retry[0]
        failing = False
        while True:
            started = time.monotonic()
            try:
                await watcher.run()
            except Exception:
                if not failing:
                    log.exception("hotplug watcher failed; retrying with backoff")
                failing = True
            low, high = self._watcher_retry
            if time.monotonic() - started > high:
                delay = low
            await asyncio.sleep(delay)
            delay = min(delay * 2, high)

    def _device_started(self, rule: MatchRule, device: UsbSerialDevice) -> None:
        port = self._ports.get(rule.name)
        if port is None or port.cfg.match != rule:
            return
        port.candidates[device.sys_path] = device
        if port.device is not None:
            if port.device.sys_path != device.sys_path:
                log.warning("serial port %s: %s also matches; staying with %s", rule.name,
                            device.describe(), port.device.describe())
            return
        port.device = device
        log.info("serial port %s: adapter %s plugged in", rule.name, device.describe())
        self._start(port)

    def _device_stopped(self, rule: MatchRule, device: UsbSerialDevice) -> None:
        port = self._ports.get(rule.name)
        if port is None:
            return
        port.candidates.pop(device.sys_path, None)
        if port.device is None or port.device.sys_path != device.sys_path:
            return
        port.stop()
        log.info("serial port %s: adapter %s removed", rule.name, device.describe())
        port.device = next(iter(port.candidates.values()), None)  # another matching adapter
        if port.device is not None:
            log.info("serial port %s: switching to %s", rule.name, port.device.describe())
        self._start(port)

    # -- direct methods -------------------------------------------------------------------------

    async def _list_ports(self, _payload: Any) -> tuple[int, Any]:
        return 200, {"ports": await asyncio.to_thread(list_ports)}

    async def _reset_counters(self, payload: Any) -> tuple[int, Any]:
        name = payload.get("port") if isinstance(payload, dict) else None
        if name is not None and name not in self._ports:
            return 404, {"error": f"no port {name!r}"}
        for port_name, port in self._ports.items():
            if name is None or port_name == name:
                port.reset_counters()
        return 200, {"reset": [name] if name else sorted(self._ports)}


class _Port:
    """One configured port: its reader task, decoding state, counters and status."""

    def __init__(self, cfg: PortConfig, clock: Callable[[], float], opener: Opener,
                 queue_size: int) -> None:
        self.cfg = cfg
        self._clock = clock
        self._opener = opener
        self._queue_size = queue_size
        self.reader = cfg.make_reader()
        self.state: State = "stopped"
        self.since = clock()
        self.device: UsbSerialDevice | None = None  # the adapter in use (match rules only)
        self.candidates: dict[str, UsbSerialDevice] = {}  # every adapter the rule matches
        self.task: asyncio.Task[None] | None = None
        self.link: str | None = None  # the path opened (a by-id link, ideally)
        self.opened: str | None = None  # what it resolved to (/dev/ttyUSB0), for logs
        self.last_line_at: float | None = None
        self.last_error: str | None = None
        self.reconnects = 0
        self.dropped = 0
        self.warning = unstable_name_warning(cfg.path) if cfg.path else None

    # -- control (called on the loop thread, never blocking) -------------------------------------

    def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
        self.set_state("stopped")

    def reconfigure(self, cfg: PortConfig) -> None:
        if cfg.match != self.cfg.match:
            self.device = None  # the watcher announces the adapters of the new rule
            self.candidates.clear()
        self.cfg = cfg
        self.reader = cfg.make_reader(self.reader)
        self.warning = unstable_name_warning(cfg.path) if cfg.path else None

    def swap_decoding(self, cfg: PortConfig) -> None:
        self.cfg = cfg
        self.reader = cfg.make_reader(self.reader)

    def reset_counters(self) -> None:
        self.reader = self.cfg.make_reader()
        self.dropped = 0
        self.reconnects = 0

    def set_state(self, state: State, reason: str | None = None) -> None:
        previous = self.state
        if state == previous:
            return
        now = self._clock()
        name = self.cfg.name
        if state == "down":
            self.last_error = reason
            log.warning("serial port %s down: %s", name, reason)
        elif state == "up" and previous == "down":
            log.info("serial port %s recovered after %.1f s: %s -> %s", name, now - self.since,
                     self.link, self.opened)
        elif state == "up":
            log.info("serial port %s open: %s -> %s", name, self.link, self.opened)
        self.state = state
        self.since = now

    # -- the port task ---------------------------------------------------------------------------

    async def run(self, emit: Emit, path: str, previous: asyncio.Task[None] | None) -> None:
        if previous is not None and not previous.done():
            await asyncio.wait([previous])  # let the old task close the port first
        queue: asyncio.Queue[Sequence[Reading]] = asyncio.Queue(self._queue_size)
        async with asyncio.TaskGroup() as group:
            group.create_task(self._forward(emit, queue))
            await self._read_loop(path, queue)

    async def _read_loop(self, path: str, queue: asyncio.Queue[Sequence[Reading]]) -> None:
        cfg = self.cfg
        delay = cfg.reconnect_min
        opened_before = False
        while True:
            try:
                port = self._opener(path, cfg.link)
            except DeviceError as exc:
                self.set_state("down", str(exc))
                await asyncio.sleep(delay)
                delay = min(delay * 2, cfg.reconnect_max)
                continue
            self.link, self.opened = path, port.device
            if opened_before:
                self.reconnects += 1
            opened_before = True
            self.reader.reset()
            self.set_state("up")
            delay = cfg.reconnect_min
            try:
                await self._pump(port, queue)
            except DeviceError as exc:
                self.set_state("down", str(exc))
            except TimeoutError:
                self.set_state("down", f"nothing received for {cfg.silence_timeout} s")
            finally:
                port.close()
            await asyncio.sleep(delay)

    async def _pump(self, port: SerialPort, queue: asyncio.Queue[Sequence[Reading]]) -> None:
        silence = self.cfg.silence_timeout
        clock = self._clock
        while True:
            if silence is None:
                data = await port.read()
            else:
                async with asyncio.timeout(silence):
                    data = await port.read()
            now = clock()
            reader = self.reader
            lines = reader.counters.lines
            batches = reader.feed(data, now)
            if reader.counters.lines != lines:
                self.last_line_at = now
            for batch in batches:
                if queue.full():
                    queue.get_nowait()
                    self.dropped += 1
                queue.put_nowait(batch)

    @staticmethod
    async def _forward(emit: Emit, queue: asyncio.Queue[Sequence[Reading]]) -> None:
        while True:
            batch = await queue.get()
            await emit(batch[0].sensor, batch)

    # -- status ----------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        cfg = self.cfg
        reader = self.reader
        out: dict[str, Any] = {
            "sensor": cfg.sensor,
            "format": cfg.format,
            "path": cfg.path or (self.device.stable_path if self.device else None),
            "device": self.opened,
            "state": self.state,
            "connected": self.state == "up",
            "since": iso(self.since),
            "lastLine": None,
            "lastLineAt": None if self.last_line_at is None else iso(self.last_line_at),
            "lastError": self.last_error,
            "lastDecodeError": reader.last_error,
            "counts": reader.counters.as_dict() | {
                "dropped": self.dropped,
                "reconnects": self.reconnects,
            },
        }
        if reader.last_line is not None:
            out["lastLine"] = reader.last_line[:LAST_LINE_CHARS].decode("utf-8", "replace")
        if self.warning:
            out["warning"] = self.warning
        return out
