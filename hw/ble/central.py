"""The BLE central: the one module that imports bleak (and dbus-fast, bleak's D-Bus layer).

One :class:`BleakCentral` owns the adapter's scan and shares it with every consumer
(:meth:`~BleakCentral.add_listener`), as Home Assistant's Bluetooth integration does: scanners
started per consumer fight over BlueZ's discovery state. It

* scans passively by default: BlueZ needs an advertisement monitor with or-patterns for that
  (``org.bluez.AdvertisementMonitorManager1``, BlueZ >= 5.56 with ``--experimental``); where
  BlueZ lacks it, it falls back to active scanning and says so once in the log;
* runs a watchdog: while sensors are expected and no advertisement arrives for
  ``watchdog_s`` seconds, it restarts the scan; still silent after another period, it resets
  the adapter by writing ``org.bluez.Adapter1.Powered`` off and on (BlueZ D-Bus API,
  org.bluez.Adapter.rst); further resets back off exponentially;
* connects to GATT servers through a bounded number of connection slots, handing out
  :class:`GattLink` objects for reading and notifications.

bleak's exceptions are translated to :class:`gateway.errors.DeviceError` here, so nothing else
needs to know bleak.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass
from typing import Any, Protocol

from bleak import BleakClient, BleakScanner
from bleak.args.bluez import BlueZScannerArgs, OrPattern
from bleak.assigned_numbers import AdvertisementDataType
from bleak.backends.device import BLEDevice
from bleak.backends.scanner import AdvertisementData
from bleak.exc import BleakError
from dbus_fast import BusType, Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from gateway.errors import DeviceError
from hw.ble.decoders import Advertisement
from hw.readings import iso

log = logging.getLogger(__name__)

# Flags AD values most connectable peripherals send (LE General/Limited Discoverable, BR/EDR
# not supported): with them a passive monitor also sees GATT-only sensors.
FLAGS_PATTERNS: tuple[tuple[int, int, bytes], ...] = (
    (0, 0x01, b"\x06"), (0, 0x01, b"\x02"), (0, 0x01, b"\x1a"), (0, 0x01, b"\x05"))


@dataclass(frozen=True, slots=True, kw_only=True)
class ScanSettings:
    adapter: str = "hci0"
    passive: bool = True
    patterns: tuple[tuple[int, int, bytes], ...] = ()  # BlueZ or-patterns for passive scans
    watchdog_s: float = 90.0  # 0: no watchdog
    expected: bool = False  # sensors are configured: silence means trouble
    reset_pause_s: float = 1.0  # Powered off -> on


class GattLink:
    """One live GATT connection (from :meth:`BleakCentral.connect`)."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.disconnected = asyncio.Event()
        self._client: BleakClient | None = None

    @property
    def characteristics(self) -> frozenset[str]:
        assert self._client is not None
        return frozenset(c.uuid for s in self._client.services for c in s.characteristics)

    async def read(self, uuid: str) -> bytes:
        assert self._client is not None
        with _device_errors(self.address, f"read {uuid}"):
            return bytes(await self._client.read_gatt_char(uuid))

    async def start_notify(self, uuid: str, callback: Callable[[bytes], None]) -> None:
        assert self._client is not None
        with _device_errors(self.address, f"notify {uuid}"):
            await self._client.start_notify(uuid, lambda _c, data: callback(bytes(data)))

    def _on_disconnect(self, _client: BleakClient) -> None:
        self.disconnected.set()


class Central(Protocol):
    """The seam between the BLE bridge and the radio."""

    def configure(self, settings: ScanSettings, *, max_connections: int = 2) -> None: ...

    def add_listener(self, listener: Callable[[Advertisement], None]) -> Callable[[], None]: ...

    async def run(self) -> None: ...

    def connect(self, address: str, *,
                timeout: float) -> AbstractAsyncContextManager[GattLink]: ...

    def nearby(self) -> list[Advertisement]: ...

    def status(self) -> dict[str, Any]: ...


class BleakCentral:
    """The scanner owner. Call :meth:`configure`, then run :meth:`run` in a task group."""

    def __init__(self, *, nearby_max: int = 256, monotonic: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self._settings: ScanSettings | None = None
        self._changed = asyncio.Event()
        self._listeners: list[Callable[[Advertisement], None]] = []
        self._nearby: OrderedDict[str, tuple[Advertisement, BLEDevice]] = OrderedDict()
        self._nearby_max = nearby_max
        self._seen_waiters: dict[str, asyncio.Event] = {}
        self._mono = monotonic
        self._wall = wall
        self._slots = asyncio.Semaphore(2)
        self._max_connections = 2
        self._connections = 0
        # state for status() and the watchdog
        self._scanning_mode: str | None = None
        self._passive_unavailable = False
        self._last_adv = 0.0  # monotonic
        self._last_adv_wall: float | None = None
        self._scan_started = 0.0
        self._advertisements = 0
        self._restarts = 0
        self._resets = 0
        self._silent = False
        self._stage = 0  # watchdog: 0 quiet-free, 1 scan restarted, 2+ adapter resets
        self._error: str | None = None

    # -- configuration and consumers ------------------------------------------------------

    def configure(self, settings: ScanSettings, *, max_connections: int = 2) -> None:
        """Apply scan settings; the scan restarts only if they differ from the current ones."""
        if max_connections != self._max_connections:
            self._max_connections = max_connections
            self._slots = asyncio.Semaphore(max_connections)  # holders release the old one
        if settings != self._settings:
            if self._settings is not None and settings.passive and not self._settings.passive:
                self._passive_unavailable = False  # asked again: try passive again
            self._settings = settings
            self._changed.set()

    def add_listener(self, listener: Callable[[Advertisement], None]) -> Callable[[], None]:
        """Call ``listener(adv)`` for every advertisement (on the event loop; keep it quick).
        Returns the function that removes it."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    def nearby(self) -> list[Advertisement]:
        """The latest advertisement of each device heard (at most ``nearby_max``, newest last)."""
        return [adv for adv, _ in self._nearby.values()]

    # -- the scan ----------------------------------------------------------------------------

    async def run(self) -> None:
        """Own the scan until cancelled: (re)start it when the settings change, watch for
        silence, recover from adapter errors (logged once per outage)."""
        failures = 0
        while True:
            settings = self._settings
            if settings is None:
                await self._changed.wait()
                continue
            self._changed.clear()
            try:
                scanner = await self._start(settings)
            except DeviceError as e:
                failures += 1
                self._error = str(e)
                missing = isinstance(e, ServiceMissing)  # no bus or no BlueZ: nothing to reset
                if failures == 1:
                    log.warning("scan on %s failed: %s%s", settings.adapter, e,
                                "" if missing else "; resetting the adapter")
                # a powered-off or stuck controller: power-cycle it, then retry at once
                if not missing and failures % 5 == 1 \
                        and await self._reset_adapter(settings, quiet=failures > 1):
                    continue
                with suppress(TimeoutError):
                    async with asyncio.timeout(min(60.0, 2.0 ** min(failures, 6))):
                        await self._changed.wait()
                continue
            if failures:
                log.info("scan on %s recovered", settings.adapter)
                failures = 0
            self._error = None
            try:
                action = await self._watch(settings)
            finally:
                await self._stop(scanner)
            if action == "reset":
                await self._reset_adapter(settings)

    async def _start(self, settings: ScanSettings) -> BleakScanner:
        bluez: BlueZScannerArgs = {"adapter": settings.adapter}
        if settings.passive and not self._passive_unavailable:
            patterns = [OrPattern(s, AdvertisementDataType(t), c) for s, t, c in settings.patterns]
            if patterns:
                scanner = BleakScanner(self._on_advertisement, scanning_mode="passive",
                                       bluez={"adapter": settings.adapter,
                                              "or_patterns": list(patterns)})
                try:
                    await scanner.start()
                except BleakError as e:
                    if not any(w in str(e) for w in ("passive", "UnknownMethod", "NotSupported")) \
                            or _NO_BLUEZ in str(e):
                        raise _device_error(settings.adapter, "start passive scan", e) from e
                    self._passive_unavailable = True
                    log.warning("passive scanning unavailable on %s (%s); falling back to "
                                "active scanning", settings.adapter, e)
                except Exception as e:
                    raise _device_error(settings.adapter, "start scan", e) from e
                else:
                    return self._started(scanner, "passive")
        scanner = BleakScanner(self._on_advertisement, scanning_mode="active", bluez=bluez)
        with _device_errors(settings.adapter, "start scan"):
            await scanner.start()
        return self._started(scanner, "active")

    def _started(self, scanner: BleakScanner, mode: str) -> BleakScanner:
        self._scanning_mode = mode
        self._scan_started = self._mono()
        return scanner

    async def _stop(self, scanner: BleakScanner) -> None:
        self._scanning_mode = None
        try:
            await scanner.stop()
        except Exception as e:  # noqa: BLE001 - a scan we abandon may fail to stop; that's fine
            log.debug("stopping the scan failed: %r", e)

    async def _watch(self, settings: ScanSettings) -> str:
        """Wait while the scan runs; return "restart" (settings changed, or silence) or
        "reset" (silence survived a restart)."""
        tick = 1.0 if settings.watchdog_s <= 0 else max(0.05, min(1.0, settings.watchdog_s / 5))
        while True:
            with suppress(TimeoutError):
                async with asyncio.timeout(tick):
                    await self._changed.wait()
            if self._changed.is_set():
                return "restart"
            if settings.watchdog_s <= 0 or not settings.expected:
                continue
            now = self._mono()
            heard = self._last_adv >= self._scan_started
            if heard and self._silent:
                log.info("advertisements resumed on %s", settings.adapter)
                self._silent = False
                self._stage = 0
            quiet_since = max(self._last_adv, self._scan_started)
            stage = self._stage
            limit = settings.watchdog_s * (2 ** max(0, stage - 2))
            if now - quiet_since < min(limit, 3600.0):
                continue
            self._silent = True
            self._stage = stage + 1
            if stage == 0:
                log.warning("no advertisement on %s for %.0f s while sensors are expected; "
                            "restarting the scan", settings.adapter, now - quiet_since)
                self._restarts += 1
                return "restart"
            log.warning("still no advertisement on %s; resetting the adapter (Powered off/on)",
                        settings.adapter)
            return "reset"

    async def _reset_adapter(self, settings: ScanSettings, *, quiet: bool = False) -> bool:
        """Power-cycle the adapter through ``Powered``; False (logged unless ``quiet``) when
        BlueZ refuses or the adapter is gone."""
        self._resets += 1
        try:
            await self._set_powered(settings.adapter, False)
            await asyncio.sleep(settings.reset_pause_s)
            await self._set_powered(settings.adapter, True)
        except DeviceError as e:
            if not quiet:
                log.warning("adapter %s reset failed: %s", settings.adapter, e)
            self._error = str(e)
            return False
        return True

    @staticmethod
    async def _set_powered(adapter: str, on: bool) -> None:
        """Write ``org.bluez.Adapter1.Powered`` on ``/org/bluez/<adapter>``."""
        with _device_errors(adapter, "connect to the system bus"):
            bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
        try:
            reply = await bus.call(Message(
                destination="org.bluez", path=f"/org/bluez/{adapter}",
                interface="org.freedesktop.DBus.Properties", member="Set", signature="ssv",
                body=["org.bluez.Adapter1", "Powered", Variant("b", on)]))
            if reply is None or reply.message_type == MessageType.ERROR:
                detail = reply.error_name if reply is not None else "no reply"
                if detail == _NO_BLUEZ:
                    raise ServiceMissing(f"set Powered={on}: {_bluez_missing()}",
                                         device_id=adapter)
                raise DeviceError(f"set Powered={on}: {detail}", device_id=adapter)
        finally:
            bus.disconnect()

    def _on_advertisement(self, device: BLEDevice, data: AdvertisementData) -> None:
        address = device.address.upper()
        adv = Advertisement(address, data.rssi, self._wall(), data.manufacturer_data,
                            data.service_data, data.local_name)
        self._last_adv = self._mono()
        self._last_adv_wall = adv.received
        self._advertisements += 1
        nearby = self._nearby
        nearby[address] = (adv, device)
        nearby.move_to_end(address)
        if len(nearby) > self._nearby_max:
            nearby.popitem(last=False)
        waiter = self._seen_waiters.pop(address, None)
        if waiter is not None:
            waiter.set()
        for listener in self._listeners:
            try:
                listener(adv)
            except Exception:  # a consumer's bug must not stop the scan for the others
                log.exception("advertisement listener failed")

    # -- GATT --------------------------------------------------------------------------------

    @asynccontextmanager
    async def connect(self, address: str, *, timeout: float) -> AsyncIterator[GattLink]:
        """Connect to ``address`` (seen by the scan; waits up to ``timeout`` for it) within a
        connection slot; disconnect on exit. Raises :class:`DeviceError`."""
        address = address.upper()
        adapter = self._settings.adapter if self._settings else "hci0"
        slots = self._slots
        async with slots:
            self._connections += 1
            try:
                device = await self._wait_seen(address, timeout)
                link = GattLink(address)
                client = BleakClient(device, disconnected_callback=link._on_disconnect,
                                     timeout=timeout, bluez={"adapter": adapter})
                with _device_errors(address, "connect"):
                    await client.connect()
                link._client = client
                try:
                    yield link
                finally:
                    with suppress(Exception):
                        await client.disconnect()
            finally:
                self._connections -= 1

    async def _wait_seen(self, address: str, timeout: float) -> BLEDevice:
        entry = self._nearby.get(address)
        if entry is not None:
            return entry[1]
        waiter = self._seen_waiters.setdefault(address, asyncio.Event())
        try:
            async with asyncio.timeout(timeout):
                await waiter.wait()
        except TimeoutError:
            if self._seen_waiters.get(address) is waiter:
                del self._seen_waiters[address]
            raise DeviceError(f"not heard by the scan within {timeout:g} s",
                              device_id=address) from None
        return self._nearby[address][1]

    # -- status ------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        s = self._settings
        return {
            "adapter": s.adapter if s else None,
            "scanning": self._scanning_mode is not None,
            "scanMode": self._scanning_mode,
            "passiveUnavailable": self._passive_unavailable,
            "advertisements": self._advertisements,
            "lastAdvertisement": iso(self._last_adv_wall) if self._last_adv_wall else None,
            "silent": self._silent,
            "scanRestarts": self._restarts,
            "adapterResets": self._resets,
            "connections": self._connections,
            "maxConnections": self._max_connections,
            "lastError": self._error,
        }


class ServiceMissing(DeviceError):
    """The system D-Bus or BlueZ itself is not there: resetting the adapter cannot help."""


_NO_BLUEZ = "org.freedesktop.DBus.Error.ServiceUnknown"
_SYSTEM_BUS = "unix:path=/var/run/dbus/system_bus_socket"  # dbus-fast's default


def _bluez_missing() -> str:
    return ("BlueZ is not running (no org.bluez on the system D-Bus): install it and start it "
            "(Debian: apt install bluez; systemctl enable --now bluetooth)")


def _device_error(device_id: str, what: str, e: BaseException) -> DeviceError:
    """A bleak/D-Bus/OS failure as a :class:`DeviceError` with a readable cause: a missing
    system bus or a missing BlueZ is said in words (a :class:`ServiceMissing`), not as a bare
    ``FileNotFoundError``."""
    if isinstance(e, FileNotFoundError | ConnectionRefusedError):
        address = os.environ.get("DBUS_SYSTEM_BUS_ADDRESS") or _SYSTEM_BUS
        return ServiceMissing(
            f"{what}: the system D-Bus is not reachable at {address} ({e.strerror or e}); "
            "BlueZ needs it (Debian: apt install dbus bluez; systemctl start dbus bluetooth)",
            device_id=device_id)
    if _NO_BLUEZ in str(e) or "org.bluez was not provided" in str(e):
        return ServiceMissing(f"{what}: {_bluez_missing()}", device_id=device_id)
    return DeviceError(f"{what}: {type(e).__name__}: {e}", device_id=device_id)


@contextmanager
def _device_errors(device_id: str, what: str) -> Iterator[None]:
    """Translate bleak/D-Bus/OS failures into :class:`DeviceError` (aesthetics.md §4.5)."""
    try:
        yield
    except DeviceError:
        raise
    except (BleakError, TimeoutError, EOFError, OSError, KeyError, ValueError,
            AttributeError) as e:
        raise _device_error(device_id, what, e) from e
