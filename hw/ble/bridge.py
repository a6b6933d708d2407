"""The BLE bridge: configured sensors by MAC, decoded from advertisements or read over GATT.

Implements :class:`hw.bridge.Bridge`. Advertisements come from the shared central
(:mod:`hw.ble.central`), are matched to a sensor by address, decoded (:mod:`hw.ble.decoders`),
de-duplicated by packet counter, and queued as readings; one task drains the queue into
``emit``. GATT sensors get one task each that connects (within the central's connection slots),
reads the Environmental Sensing characteristics and then follows notifications, or polls.

Nothing here logs or reports a bindkey. Failures are logged once on the transition (a sensor
that stops decrypting, goes quiet, or loses its GATT link) and once on recovery.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from gateway.errors import DeviceError
from hw.ble.central import FLAGS_PATTERNS, BleakCentral, Central, GattLink, ScanSettings
from hw.ble.config import BleConfig, GattMode, ScanMode, SensorConfig, parse_config
from hw.ble.decoders import (
    ENV_CHARACTERISTICS,
    Advertisement,
    AdvertisementError,
    BindKey,
    DecoderKind,
    DecryptError,
    Dedup,
    Verdict,
    decode,
    decode_gatt,
    detect_kinds,
    mac_bytes,
    or_pattern,
    payload_for,
)
from hw.bridge import Emit, Method
from hw.readings import Reading, iso

log = logging.getLogger(__name__)

KeyLookup = Callable[[SensorConfig], BindKey | None]
"""Where bindkeys come from when the desired properties carry none."""


@dataclass(eq=False)
class _Sensor:
    """Runtime state of one configured sensor (counters for the status, dedup, transitions)."""

    config: SensorConfig
    mac: bytes
    key: BindKey | None
    dedup: dict[DecoderKind, Dedup]
    last_seen: float | None = None
    rssi: int | None = None
    packets: int = 0
    duplicates: int = 0
    replays: int = 0
    decrypt_failures: int = 0
    decode_errors: int = 0
    decrypt_failing: bool = False
    decode_failing: bool = False
    replaying: bool = False
    stale: bool = False
    gatt_connected: bool = False
    gatt_error: str | None = None
    gatt_reads: int = 0
    notifications: int = 0
    added: float = field(default_factory=time.monotonic)


class BleBridge:
    """``hw.bridge.Bridge`` for BLE sensors. ``central`` is the shared scanner owner; when none
    is given the bridge makes a :class:`BleakCentral` and runs it itself."""

    name = "ble"

    def __init__(self, *, central: Central | None = None, keys: KeyLookup | None = None,
                 queue_size: int = 1024, clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self._owns_central = central is None
        self._central: Central = central if central is not None else BleakCentral()
        self._keys = keys
        self._clock = clock
        self._mono = monotonic
        self._config = BleConfig()
        self._sensors: dict[str, _Sensor] = {}  # by name
        self._by_address: dict[str, _Sensor] = {}
        self._queue: asyncio.Queue[tuple[str, list[Reading]]] = asyncio.Queue(queue_size)
        self._dropped = 0
        self._tg: asyncio.TaskGroup | None = None
        self._gatt_tasks: dict[str, asyncio.Task[None]] = {}
        self._methods: dict[str, Method] = {
            "reset_counter": self._reset_counter,
            "nearby": self._nearby,
            "read_gatt": self._read_gatt,
        }

    # -- Bridge protocol ---------------------------------------------------------------------

    @property
    def methods(self) -> Mapping[str, Method]:
        return self._methods

    def apply(self, desired: Mapping[str, Any]) -> None:
        config = parse_config(desired)  # raises ConfigError; the old config stays in force
        old = self._sensors
        sensors: dict[str, _Sensor] = {}
        restart_gatt: list[str] = []
        for sc in config.sensors:
            prev = old.get(sc.name)
            if prev is not None and prev.config == sc:
                for d in prev.dedup.values():
                    d.window = config.dedup_window_s  # the state (and its GATT task) stays
                sensors[sc.name] = prev
                continue
            sensors[sc.name] = self._new_state(sc, config.dedup_window_s)
            if prev is not None:
                log.info("sensor %s reconfigured", sc.name)
            if sc.gatt is not None:
                restart_gatt.append(sc.name)
        for name, prev in old.items():
            if name not in sensors or sensors[name] is not prev:
                task = self._gatt_tasks.pop(name, None)
                if task is not None:
                    task.cancel()
        self._config = config
        self._sensors = sensors
        self._by_address = {s.config.address: s for s in sensors.values()
                            if s.config.decoders}
        if self._tg is not None:
            for name in restart_gatt:
                self._start_gatt(sensors[name])
        self._central.configure(self._scan_settings(config),
                                max_connections=config.max_connections)

    def sensor_status(self, sensor: str) -> dict[str, Any] | None:
        s = self._sensors.get(sensor)
        return self._sensor_status(s) if s is not None else None

    def sensor_config_path(self, desired: Mapping[str, Any], sensor: str) -> tuple[str, ...] | None:
        sensors = desired.get("sensors")
        return ("sensors", sensor) if isinstance(sensors, Mapping) and sensor in sensors else None

    def set_secrets(self, secrets: Mapping[str, str]) -> None:
        """Bindkeys kept in the registry, by sensor name: used for BTHome sensors whose desired
        properties carry no ``bindkey`` (an explicit one wins). A malformed key counts as none
        (and is not echoed)."""
        keys: dict[str, BindKey] = {}
        for name, text in secrets.items():
            try:
                keys[name] = BindKey.from_hex(text)
            except ValueError:
                log.warning("sensor %s: the registry's sensor key is not 32 hex digits", name)
        self._keys = lambda sc: keys.get(sc.name)
        self.refresh_keys()

    def status(self) -> dict[str, Any]:
        return {
            "scan": self._central.status(),
            "queuedReadings": self._queue.qsize(),
            "droppedReadings": self._dropped,
            "sensors": {name: self._sensor_status(s) for name, s in self._sensors.items()},
        }

    async def run(self, emit: Emit) -> None:
        remove = self._central.add_listener(self._on_advertisement)
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                if self._owns_central:
                    tg.create_task(self._central.run(), name="ble-central")
                tg.create_task(self._pump(emit), name="ble-emit")
                tg.create_task(self._housekeeping(), name="ble-housekeeping")
                for sensor in self._sensors.values():
                    if sensor.config.gatt is not None and sensor.config.name not in \
                            self._gatt_tasks:
                        self._start_gatt(sensor)
        finally:
            self._tg = None
            self._gatt_tasks.clear()
            remove()

    # -- configuration helpers ---------------------------------------------------------------

    def _new_state(self, sc: SensorConfig, window: float) -> _Sensor:
        key = sc.bindkey
        if key is None and self._keys is not None and DecoderKind.BTHOME in sc.decoders:
            key = self._keys(sc)
        return _Sensor(
            config=sc, mac=mac_bytes(sc.address), key=key,
            dedup={k: Dedup(window, replay_protection=sc.replay_protection)
                   for k in sc.decoders},
            added=self._mono())

    @staticmethod
    def _scan_settings(config: BleConfig) -> ScanSettings:
        patterns: list[tuple[int, int, bytes]] = []
        for sc in config.sensors:
            for kind in sc.decoders:
                p = or_pattern(kind)
                if p not in patterns:
                    patterns.append(p)
        if any(sc.gatt is not None for sc in config.sensors):
            patterns.extend(p for p in FLAGS_PATTERNS if p not in patterns)
        return ScanSettings(adapter=config.adapter, passive=config.scan_mode is ScanMode.PASSIVE,
                            patterns=tuple(sorted(patterns)), watchdog_s=config.watchdog_s,
                            expected=bool(config.sensors))

    def refresh_keys(self) -> None:
        """Look bindkeys up again (after the key source changed)."""
        if self._keys is None:
            return
        for s in self._sensors.values():
            if s.config.bindkey is None and DecoderKind.BTHOME in s.config.decoders:
                s.key = self._keys(s.config)

    # -- advertisements ----------------------------------------------------------------------

    def _on_advertisement(self, adv: Advertisement) -> None:
        sensor = self._by_address.get(adv.address)
        if sensor is None:
            return
        sensor.last_seen = adv.received
        sensor.rssi = adv.rssi
        name = sensor.config.name
        readings: list[Reading] = []
        for kind in sensor.config.decoders:
            payload = payload_for(kind, adv)
            if payload is None:
                continue
            try:
                decoded = decode(kind, payload, sensor.mac, sensor.key)
            except DecryptError as e:
                sensor.decrypt_failures += 1
                if not sensor.decrypt_failing:
                    sensor.decrypt_failing = True
                    log.warning("sensor %s: cannot decrypt: %s", name, e)
                continue
            except AdvertisementError as e:
                sensor.decode_errors += 1
                if not sensor.decode_failing:
                    sensor.decode_failing = True
                    log.warning("sensor %s: undecodable advertisement: %s", name, e)
                continue
            if decoded.encrypted and sensor.decrypt_failing:
                sensor.decrypt_failing = False
                log.info("sensor %s: decrypting again", name)
            if sensor.decode_failing:
                sensor.decode_failing = False
                log.info("sensor %s: decoding again", name)
            verdict = sensor.dedup[kind].check(decoded, adv.received)
            if verdict is Verdict.DUPLICATE:
                sensor.duplicates += 1
                continue
            if verdict is Verdict.REPLAY:
                sensor.replays += 1
                if not sensor.replaying:
                    sensor.replaying = True
                    log.warning("sensor %s: encryption counter went back (replay, or the device "
                                "restarted: then call reset_counter)", name)
                continue
            sensor.replaying = False
            sensor.packets += 1
            readings.extend(decoded.readings(name, adv.received))
        if readings:
            self._enqueue(name, readings)

    def _enqueue(self, sensor: str, readings: list[Reading]) -> None:
        """Bounded queue; when full the oldest batch goes (a newer reading supersedes it)."""
        q = self._queue
        if q.full():
            q.get_nowait()
            self._dropped += 1
            if self._dropped == 1 or self._dropped % 1000 == 0:
                log.warning("reading queue full: dropped %d batches so far (emit too slow)",
                            self._dropped)
        q.put_nowait((sensor, readings))

    async def _pump(self, emit: Emit) -> None:
        q = self._queue
        while True:
            sensor, readings = await q.get()
            await emit(sensor, readings)

    async def _housekeeping(self) -> None:
        """Log sensors going quiet and coming back, once each (advertising sensors only)."""
        while True:
            await asyncio.sleep(1.0)
            now, mono = self._clock(), self._mono()
            for s in self._sensors.values():
                if not s.config.decoders:
                    continue
                if s.last_seen is None:
                    quiet = mono - s.added
                else:
                    quiet = now - s.last_seen
                stale = quiet >= s.config.stale_s
                if stale != s.stale:
                    s.stale = stale
                    if stale:
                        log.warning("sensor %s: not heard for %.0f s", s.config.name, quiet)
                    else:
                        log.info("sensor %s: heard again", s.config.name)

    # -- GATT --------------------------------------------------------------------------------

    def _start_gatt(self, sensor: _Sensor) -> None:
        assert self._tg is not None
        old = self._gatt_tasks.pop(sensor.config.name, None)
        if old is not None:
            old.cancel()
        self._gatt_tasks[sensor.config.name] = self._tg.create_task(
            self._gatt_loop(sensor), name=f"ble-gatt-{sensor.config.name}")

    async def _gatt_loop(self, sensor: _Sensor) -> None:
        sc = sensor.config
        gatt = sc.gatt
        assert gatt is not None
        delay = 1.0
        while True:
            try:
                async with self._central.connect(sc.address, timeout=gatt.timeout_s) as link:
                    if sensor.gatt_error is not None:
                        log.info("sensor %s: GATT recovered", sc.name)
                    sensor.gatt_connected, sensor.gatt_error = True, None
                    delay = 1.0
                    await self._gatt_session(sensor, link, gatt.mode)
            except DeviceError as e:
                if sensor.gatt_error is None:
                    log.warning("sensor %s: GATT failed: %s", sc.name, e)
                sensor.gatt_error = str(e)
            finally:
                sensor.gatt_connected = False
            if gatt.mode is GattMode.READ and sensor.gatt_error is None:
                await asyncio.sleep(gatt.interval_s)
            else:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 300.0)

    async def _gatt_session(self, sensor: _Sensor, link: GattLink, mode: GattMode) -> None:
        available = link.characteristics
        chars = [u for u in ENV_CHARACTERISTICS if u in available]
        if not chars:
            raise DeviceError("no Environmental Sensing characteristic (0x2A6E/0x2A6F/0x2A6D)",
                              device_id=sensor.config.address)
        now = self._clock()
        readings = []
        for uuid in chars:
            reading = self._gatt_reading(sensor, uuid, await link.read(uuid), now)
            if reading is not None:
                readings.append(reading)
        sensor.gatt_reads += 1
        if readings:
            self._enqueue(sensor.config.name, readings)
        if mode is GattMode.READ:
            return
        for uuid in chars:
            await link.start_notify(uuid, functools.partial(self._on_notify, sensor, uuid))
        await link.disconnected.wait()
        raise DeviceError("disconnected", device_id=sensor.config.address)

    def _on_notify(self, sensor: _Sensor, uuid: str, data: bytes) -> None:
        sensor.notifications += 1
        reading = self._gatt_reading(sensor, uuid, data, self._clock())
        if reading is not None:
            self._enqueue(sensor.config.name, [reading])

    def _gatt_reading(self, sensor: _Sensor, uuid: str, data: bytes,
                      now: float) -> Reading | None:
        try:
            m = decode_gatt(uuid, data)
        except AdvertisementError as e:
            sensor.decode_errors += 1
            log.debug("sensor %s: %s", sensor.config.name, e)
            return None
        if m is None:
            return None
        sensor.last_seen = now
        return Reading(sensor.config.name, m.name, m.value, m.unit, now)

    # -- direct methods ----------------------------------------------------------------------

    async def _reset_counter(self, payload: Any) -> tuple[int, Any]:
        """``{"sensor": name}``: forget the sensor's counters (after a device restart)."""
        sensor = self._method_sensor(payload)
        if isinstance(sensor, tuple):
            return sensor
        for d in sensor.dedup.values():
            d.reset()
        sensor.replaying = False
        return 200, {"sensor": sensor.config.name}

    async def _nearby(self, payload: Any) -> tuple[int, Any]:
        """Devices heard lately, with the formats they look like (technician's probe)."""
        configured = {s.config.address: name for name, s in self._sensors.items()}
        devices = [{
            "address": adv.address,
            "name": adv.name,
            "rssi": adv.rssi,
            "lastSeen": iso(adv.received),
            "formats": [k.value for k in detect_kinds(adv)],
            "sensor": configured.get(adv.address),
            "values": _plain_values(adv),
        } for adv in reversed(self._central.nearby())]
        return 200, {"devices": devices}

    async def _read_gatt(self, payload: Any) -> tuple[int, Any]:
        """``{"address": mac}`` or ``{"sensor": name}``: connect once, read Environmental
        Sensing characteristics, disconnect."""
        if not isinstance(payload, Mapping):
            return 400, {"error": "expected {\"address\": ...} or {\"sensor\": ...}"}
        address = payload.get("address")
        if address is None and isinstance(payload.get("sensor"), str):
            s = self._sensors.get(payload["sensor"])
            address = s.config.address if s else None
        if not isinstance(address, str):
            return 404, {"error": "unknown sensor or no address"}
        timeout = payload.get("timeoutSeconds", 20.0)
        if not isinstance(timeout, int | float) or isinstance(timeout, bool) or timeout <= 0:
            return 400, {"error": "timeoutSeconds must be a positive number"}
        try:
            async with self._central.connect(address, timeout=float(timeout)) as link:
                values = {}
                for uuid in ENV_CHARACTERISTICS:
                    if uuid in link.characteristics:
                        m = decode_gatt(uuid, await link.read(uuid))
                        if m is not None:
                            values[m.name] = {"value": m.value, "unit": m.unit}
        except DeviceError as e:
            return 504, {"error": str(e)}
        except AdvertisementError as e:
            return 502, {"error": str(e)}
        return 200, {"address": address.upper(), "values": values}

    def _method_sensor(self, payload: Any) -> _Sensor | tuple[int, Any]:
        if not isinstance(payload, Mapping) or not isinstance(payload.get("sensor"), str):
            return 400, {"error": "expected {\"sensor\": name}"}
        sensor = self._sensors.get(payload["sensor"])
        if sensor is None:
            return 404, {"error": f"no sensor {payload['sensor']!r}"}
        return sensor

    # -- status ------------------------------------------------------------------------------

    @staticmethod
    def _sensor_status(s: _Sensor) -> dict[str, Any]:
        sc = s.config
        out: dict[str, Any] = {
            "address": sc.address,
            "decoders": [k.value for k in sc.decoders],
            "bindkey": "set" if s.key is not None else None,
            "lastSeen": iso(s.last_seen) if s.last_seen is not None else None,
            "rssi": s.rssi,
            "packets": s.packets,
            "duplicates": s.duplicates,
            "replays": s.replays,
            "decryptFailures": s.decrypt_failures,
            "decodeErrors": s.decode_errors,
            "stale": s.stale,
        }
        if sc.gatt is not None:
            out["gatt"] = {
                "mode": sc.gatt.mode.value,
                "connected": s.gatt_connected,
                "reads": s.gatt_reads,
                "notifications": s.notifications,
                "lastError": s.gatt_error,
            }
        return out


def _plain_values(adv: Advertisement) -> dict[str, Any]:
    """What an advertisement says without a key (the technician's scan list shows it);
    ``{"encrypted": true}`` for an encrypted BTHome frame."""
    out: dict[str, Any] = {}
    for kind in detect_kinds(adv):
        payload = payload_for(kind, adv)
        if payload is None:
            continue
        try:
            decoded = decode(kind, payload, mac_bytes(adv.address))
        except DecryptError:
            out["encrypted"] = True
            continue
        except (AdvertisementError, ValueError):
            continue
        for m in decoded.measures:
            out[m.name] = f"{m.value:g} {m.unit}".strip() if isinstance(m.value, float) \
                else (f"{m.value} {m.unit}".strip() if m.unit else m.value)
    return out
