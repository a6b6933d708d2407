"""A small fake BlueZ on a private D-Bus, for driving the unmodified bleak in tests.

``PrivateBus`` starts a ``dbus-daemon`` with its own socket (the tests point
``DBUS_SYSTEM_BUS_ADDRESS`` at it). ``FakeBluez`` owns ``org.bluez`` on that bus and exports the
objects bleak uses, with dbus-fast ``ServiceInterface``s (the library bleak itself rides on):

* ``/org/bluez/hci0``: ``org.bluez.Adapter1`` (discovery, ``Powered`` read/write) and
  ``org.bluez.AdvertisementMonitorManager1`` (passive scanning; leave it out with
  ``passive=False`` to play a BlueZ without ``--experimental``);
* ``/org/bluez/hci0/dev_XX_..``: ``org.bluez.Device1``; a new advertisement updates
  ``RSSI``/``ServiceData``/``ManufacturerData`` with ``PropertiesChanged``, as BlueZ does
  (BlueZ D-Bus API docs: org.bluez.Device.rst);
* GATT services and characteristics (``org.bluez.GattService1``/``GattCharacteristic1``),
  exported when a client connects, with ``ReadValue``/``StartNotify``; a notification is a
  ``PropertiesChanged`` of ``Value`` (org.bluez.GattCharacteristic.rst).

The standard ``org.freedesktop.DBus.ObjectManager`` (``GetManagedObjects``, ``InterfacesAdded``)
comes from dbus-fast itself. A "wedged" adapter stops reporting advertisements until it is
power-cycled through ``Powered``, which is what the central's watchdog must notice and fix.

No ``from __future__ import annotations`` here: dbus-fast reads the D-Bus signatures from the
annotations at class creation.
"""

import asyncio
import os
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass, field
from typing import Annotated, Any

from dbus_fast import BusType, DBusError, Message, MessageType, PropertyAccess, Variant
from dbus_fast.aio import MessageBus
from dbus_fast.annotations import (
    DBusBool,
    DBusBytes,
    DBusDict,
    DBusInt16,
    DBusObjectPath,
    DBusSignature,
    DBusStr,
)
from dbus_fast.service import ServiceInterface, dbus_method, dbus_property

BLUEZ = "org.bluez"
ADAPTER_PATH = "/org/bluez/hci0"
ERR_NOT_READY = "org.bluez.Error.NotReady"
ERR_FAILED = "org.bluez.Error.Failed"

BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_destination="*" eavesdrop="true"/>
    <allow receive_sender="*"/>
  </policy>
</busconfig>
"""


class PrivateBus:
    """A ``dbus-daemon`` of its own, in a temporary directory; ``address`` is its socket."""

    def __init__(self) -> None:
        self._dir = tempfile.mkdtemp(prefix="fakebus-")
        self.address = f"unix:path={self._dir}/bus"
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> "PrivateBus":
        try:
            return self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> "PrivateBus":
        daemon = shutil.which("dbus-daemon")
        if daemon is None:
            raise FileNotFoundError("dbus-daemon (Debian package dbus-daemon) is not installed")
        config = os.path.join(self._dir, "bus.conf")
        with open(config, "w") as f:
            f.write(BUS_CONFIG.format(socket=f"{self._dir}/bus"))
        self._proc = subprocess.Popen(
            [daemon, f"--config-file={config}", "--nofork", "--nopidfile", "--print-address=1"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()  # printed once the socket listens
        if not line:
            raise RuntimeError("dbus-daemon did not start")
        return self

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            if self._proc.stdout is not None:
                self._proc.stdout.close()
        shutil.rmtree(self._dir, ignore_errors=True)


def _short(uuid: int) -> str:
    return f"0000{uuid:04x}-0000-1000-8000-00805f9b34fb"


@dataclass
class Calls:
    """What bleak (through the central) asked of the fake, for the tests to check."""

    start_discovery: int = 0
    stop_discovery: int = 0
    filters: list[dict[str, Any]] = field(default_factory=list)
    monitors: list[str] = field(default_factory=list)  # RegisterMonitor paths, in order
    powered: list[bool] = field(default_factory=list)  # every Powered write
    connects: int = 0
    disconnects: int = 0  # Disconnect calls from clients


class Adapter(ServiceInterface):
    def __init__(self, fake: "FakeBluez") -> None:
        super().__init__("org.bluez.Adapter1")
        self._fake = fake
        self.powered = True
        self.discovering = False  # an active discovery session is open
        self.wedged = False

    @dbus_method()
    def StartDiscovery(self) -> None:
        if not self.powered:
            raise DBusError(ERR_NOT_READY, "Resource Not Ready")
        self._fake.calls.start_discovery += 1
        self.discovering = True
        self.emit_properties_changed({"Discovering": True})

    @dbus_method()
    def StopDiscovery(self) -> None:
        self._fake.calls.stop_discovery += 1
        if not self.discovering:
            raise DBusError(ERR_FAILED, "No discovery started")
        self.discovering = False
        self.emit_properties_changed({"Discovering": False})

    @dbus_method()
    def SetDiscoveryFilter(self, filters: DBusDict) -> None:
        self._fake.calls.filters.append({k: v.value for k, v in filters.items()})

    @dbus_method()
    def RemoveDevice(self, device: DBusObjectPath) -> None:
        self._fake.remove_device(device)

    @dbus_property(PropertyAccess.READ)
    def Address(self) -> DBusStr:
        return "00:1A:7D:DA:71:13"

    @dbus_property(PropertyAccess.READ)
    def AddressType(self) -> DBusStr:
        return "public"

    @dbus_property(PropertyAccess.READ)
    def Name(self) -> DBusStr:
        return "gateway"

    @dbus_property(PropertyAccess.READ)
    def Alias(self) -> DBusStr:
        return "gateway"

    @dbus_property()
    def Powered(self) -> DBusBool:
        return self.powered

    @Powered.setter  # type: ignore[no-redef]
    def Powered(self, value: DBusBool) -> None:
        self._fake.calls.powered.append(bool(value))
        self.powered = bool(value)
        changed: dict[str, Any] = {"Powered": self.powered}
        if not self.powered:
            # Powering off ends discovery and every monitor's scan; powering on again is the
            # reset that un-wedges a stuck controller.
            self.discovering = False
            self._fake.monitors.clear()
            self.wedged = False
            changed["Discovering"] = False
        self.emit_properties_changed(changed)

    @dbus_property(PropertyAccess.READ)
    def Discovering(self) -> DBusBool:
        return self.discovering

    @dbus_property(PropertyAccess.READ)
    def Roles(self) -> Annotated[list[str], DBusSignature("as")]:
        return ["central", "peripheral"]

    @dbus_property(PropertyAccess.READ)
    def UUIDs(self) -> Annotated[list[str], DBusSignature("as")]:
        return []


class MonitorManager(ServiceInterface):
    """org.bluez.AdvertisementMonitorManager1 (BlueZ >= 5.56 with --experimental)."""

    def __init__(self, fake: "FakeBluez") -> None:
        super().__init__("org.bluez.AdvertisementMonitorManager1")
        self._fake = fake

    @dbus_method()
    async def RegisterMonitor(self, application: DBusObjectPath) -> None:
        if not self._fake.adapter.powered:
            raise DBusError(ERR_NOT_READY, "Resource Not Ready")
        self._fake.calls.monitors.append(application)
        self._fake.monitors.add(application)

    @dbus_method()
    def UnregisterMonitor(self, application: DBusObjectPath) -> None:
        self._fake.monitors.discard(application)

    @dbus_property(PropertyAccess.READ)
    def SupportedMonitorTypes(self) -> Annotated[list[str], DBusSignature("as")]:
        return ["or_patterns"]

    @dbus_property(PropertyAccess.READ)
    def SupportedFeatures(self) -> Annotated[list[str], DBusSignature("as")]:
        return []


class Device(ServiceInterface):
    def __init__(self, fake: "FakeBluez", address: str, name: str | None, rssi: int,
                 manufacturer_data: dict[int, bytes], service_data: dict[str, bytes],
                 uuids: list[str]) -> None:
        super().__init__("org.bluez.Device1")
        self._fake = fake
        self.address = address
        self.local_name = name  # not .name: ServiceInterface keeps its interface name there
        self.rssi = rssi
        self.manufacturer_data = dict(manufacturer_data)
        self.service_data = dict(service_data)
        self.uuids = list(uuids)
        self.connected = False
        self.services_resolved = False
        self.path = f"{ADAPTER_PATH}/dev_{address.replace(':', '_')}"
        self.gatt: list[tuple[int, list[tuple[int, bytes]]]] = []
        self.chars: dict[str, Characteristic] = {}
        self._gatt_exported = False

    @dbus_method()
    def Connect(self) -> None:
        self._fake.calls.connects += 1
        if not self._fake.adapter.powered:
            raise DBusError(ERR_NOT_READY, "Resource Not Ready")
        if not self.gatt:
            raise DBusError(ERR_FAILED, "Software caused connection abort")
        if not self._gatt_exported:
            self._export_gatt()
        self.connected = True
        self.services_resolved = True
        self.emit_properties_changed({"Connected": True, "ServicesResolved": True})

    @dbus_method()
    def Disconnect(self) -> None:
        self._fake.calls.disconnects += 1
        self.disconnect()

    def disconnect(self) -> None:
        if self.connected:
            self.connected = False
            self.services_resolved = False
            for char in self.chars.values():
                char.notifying = False
            self.emit_properties_changed({"Connected": False, "ServicesResolved": False})

    def _export_gatt(self) -> None:
        handle = 0x10
        for svc_uuid, chars in self.gatt:
            svc_path = f"{self.path}/service{handle:04x}"
            self._fake.bus.export(svc_path, Service(_short(svc_uuid), self.path))
            for char_uuid, value in chars:
                handle += 1
                char = Characteristic(_short(char_uuid), svc_path, value)
                self._fake.bus.export(f"{svc_path}/char{handle:04x}", char)
                self.chars[_short(char_uuid)] = char
            handle = (handle + 0x10) & ~0xF
        self._gatt_exported = True

    @dbus_property(PropertyAccess.READ)
    def Address(self) -> DBusStr:
        return self.address

    @dbus_property(PropertyAccess.READ)
    def AddressType(self) -> DBusStr:
        return "public"

    @dbus_property(PropertyAccess.READ)
    def Name(self) -> DBusStr:
        return self.local_name or ""

    @dbus_property(PropertyAccess.READ)
    def Alias(self) -> DBusStr:
        return self.local_name or self.address.replace(":", "-")

    @dbus_property(PropertyAccess.READ)
    def Adapter(self) -> DBusObjectPath:
        return ADAPTER_PATH

    @dbus_property(PropertyAccess.READ)
    def Paired(self) -> DBusBool:
        return False

    @dbus_property(PropertyAccess.READ)
    def Bonded(self) -> DBusBool:
        return False

    @dbus_property(PropertyAccess.READ)
    def Trusted(self) -> DBusBool:
        return False

    @dbus_property(PropertyAccess.READ)
    def Blocked(self) -> DBusBool:
        return False

    @dbus_property(PropertyAccess.READ)
    def Connected(self) -> DBusBool:
        return self.connected

    @dbus_property(PropertyAccess.READ)
    def ServicesResolved(self) -> DBusBool:
        return self.services_resolved

    @dbus_property(PropertyAccess.READ)
    def RSSI(self) -> DBusInt16:
        return self.rssi

    @dbus_property(PropertyAccess.READ)
    def UUIDs(self) -> Annotated[list[str], DBusSignature("as")]:
        return self.uuids

    @dbus_property(PropertyAccess.READ)
    def ManufacturerData(self) -> Annotated[dict[int, Variant], DBusSignature("a{qv}")]:
        return {k: Variant("ay", v) for k, v in self.manufacturer_data.items()}

    @dbus_property(PropertyAccess.READ)
    def ServiceData(self) -> Annotated[dict[str, Variant], DBusSignature("a{sv}")]:
        return {k: Variant("ay", v) for k, v in self.service_data.items()}


class Service(ServiceInterface):
    def __init__(self, uuid: str, device_path: str) -> None:
        super().__init__("org.bluez.GattService1")
        self._uuid = uuid
        self._device = device_path

    @dbus_property(PropertyAccess.READ)
    def UUID(self) -> DBusStr:
        return self._uuid

    @dbus_property(PropertyAccess.READ)
    def Device(self) -> DBusObjectPath:
        return self._device

    @dbus_property(PropertyAccess.READ)
    def Primary(self) -> DBusBool:
        return True

    @dbus_property(PropertyAccess.READ)
    def Includes(self) -> Annotated[list[str], DBusSignature("ao")]:
        return []


class Characteristic(ServiceInterface):
    def __init__(self, uuid: str, service_path: str, value: bytes) -> None:
        super().__init__("org.bluez.GattCharacteristic1")
        self._uuid = uuid
        self._service = service_path
        self.value = value
        self.notifying = False
        self.reads = 0

    @dbus_method()
    def ReadValue(self, options: DBusDict) -> DBusBytes:
        self.reads += 1
        return self.value

    @dbus_method()
    def StartNotify(self) -> None:
        self.notifying = True
        self.emit_properties_changed({"Notifying": True})

    @dbus_method()
    def StopNotify(self) -> None:
        self.notifying = False
        self.emit_properties_changed({"Notifying": False})

    def notify(self, value: bytes) -> None:
        self.value = value
        self.emit_properties_changed({"Value": value})

    @dbus_property(PropertyAccess.READ)
    def UUID(self) -> DBusStr:
        return self._uuid

    @dbus_property(PropertyAccess.READ)
    def Service(self) -> DBusObjectPath:
        return self._service

    @dbus_property(PropertyAccess.READ)
    def Value(self) -> DBusBytes:
        return self.value

    @dbus_property(PropertyAccess.READ)
    def Notifying(self) -> DBusBool:
        return self.notifying

    @dbus_property(PropertyAccess.READ)
    def Flags(self) -> Annotated[list[str], DBusSignature("as")]:
        return ["read", "notify"]


class FakeBluez:
    """``org.bluez`` on a private bus, driven from the test through plain method calls."""

    def __init__(self, address: str, *, passive: bool = True) -> None:
        self._address = address
        self._passive = passive
        self.calls = Calls()
        self.monitors: set[str] = set()
        self.devices: dict[str, Device] = {}
        self.bus = MessageBus(bus_address=address, bus_type=BusType.SYSTEM)
        self.adapter = Adapter(self)
        self._monitor_owner: dict[str, str] = {}
        self.bus.add_message_handler(self._spy)

    async def start(self) -> "FakeBluez":
        await self.bus.connect()
        self.bus.export(ADAPTER_PATH, self.adapter)
        if self._passive:
            self.bus.export(ADAPTER_PATH, MonitorManager(self))
        await self.bus.request_name(BLUEZ)
        return self

    async def stop(self) -> None:
        self.bus.disconnect()
        await self.bus.wait_for_disconnect()  # type: ignore[no-untyped-call]

    @property
    def scanning(self) -> bool:
        """Whether the adapter would report advertisements now (a scan or a monitor is on)."""
        return self.adapter.powered and (self.adapter.discovering or bool(self.monitors))

    def wedge(self) -> None:
        """The controller keeps "scanning" but reports nothing until power-cycled."""
        self.adapter.wedged = True

    def add_device(self, address: str, *, name: str | None = None, rssi: int = -60,
                   manufacturer_data: dict[int, bytes] | None = None,
                   service_data: dict[int, bytes] | None = None,
                   gatt: list[tuple[int, list[tuple[int, bytes]]]] | None = None) -> Device:
        """Export a device (``InterfacesAdded``); like BlueZ, only while scanning does bleak
        count that as an advertisement."""
        svc = {_short(k): v for k, v in (service_data or {}).items()}
        dev = Device(self, address, name, rssi, manufacturer_data or {}, svc,
                     [_short(s) for s, _ in gatt or []])
        dev.gatt = list(gatt or [])
        self.devices[address] = dev
        self.bus.export(dev.path, dev)
        return dev

    def advertise(self, address: str, *, rssi: int | None = None,
                  manufacturer_data: dict[int, bytes] | None = None,
                  service_data: dict[int, bytes] | None = None) -> bool:
        """One advertisement from a known device: BlueZ updates the Device1 properties and
        emits ``PropertiesChanged``. Returns False when the adapter would not have heard it."""
        if not self.scanning or self.adapter.wedged:
            return False
        dev = self.devices[address]
        changed: dict[str, Any] = {}
        dev.rssi = rssi if rssi is not None else dev.rssi
        changed["RSSI"] = dev.rssi
        if manufacturer_data is not None:
            dev.manufacturer_data.update(manufacturer_data)
            changed["ManufacturerData"] = {k: Variant("ay", v)
                                           for k, v in dev.manufacturer_data.items()}
        if service_data is not None:
            dev.service_data.update({_short(k): v for k, v in service_data.items()})
            changed["ServiceData"] = {k: Variant("ay", v) for k, v in dev.service_data.items()}
        dev.emit_properties_changed(changed)
        return True

    def remove_device(self, path: str) -> None:
        for address, dev in list(self.devices.items()):
            if dev.path == path:
                del self.devices[address]
                for p in [p for p in list(self.bus._path_exports) if p.startswith(path)]:
                    self.bus.unexport(p)

    def _spy(self, msg: Message) -> None:
        # remember who registered each monitor, to read its Patterns back later
        if msg.member == "RegisterMonitor" and msg.body:
            self._monitor_owner[msg.body[0]] = msg.sender or ""

    async def monitor_patterns(self, monitor: str) -> list[tuple[int, int, bytes]]:
        """Read the ``Patterns`` property of a registered advertisement monitor from the client
        that exported it (as bluetoothd does after ``RegisterMonitor``)."""
        reply = await self.bus.call(Message(
            destination=self._monitor_owner[monitor], path=monitor,
            interface="org.freedesktop.DBus.Properties", member="Get", signature="ss",
            body=["org.bluez.AdvertisementMonitor1", "Patterns"]))
        if reply.message_type == MessageType.ERROR:
            raise RuntimeError(f"{reply.error_name}: {reply.body}")
        return [(p[0], p[1], bytes(p[2])) for p in reply.body[0].value]


async def settle(seconds: float = 0.05) -> None:
    """Let D-Bus messages in flight arrive (signals are asynchronous)."""
    await asyncio.sleep(seconds)
