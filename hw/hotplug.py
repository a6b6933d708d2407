"""USB serial hotplug: which adapters are present, and which configured port each one is.

udev describes every tty of a USB serial adapter with properties set by its ``usb_id`` builtin
(``ID_BUS=usb``, ``ID_VENDOR_ID``, ``ID_MODEL_ID``, ``ID_SERIAL_SHORT``, ``ID_USB_INTERFACE_NUM``)
and the symlinks its rules made (``DEVLINKS``: ``/dev/serial/by-id/...``, ``/dev/gateway/...``
from ``hw/udev/60-gateway-serial.rules``). :class:`MatchRule` s name the adapters a profile wants
by vendor id, product id and/or serial number; :func:`match` (pure) picks the most specific rule
for a device. :class:`UsbSerialWatcher` (the one pyudev user) listens to udev's netlink monitor on
the event loop, without a thread, enumerates the adapters already present when it starts, and
calls ``started(rule, device)`` when a matching adapter appears and ``stopped(rule, device)`` when
it leaves (or the rules change, or the watcher stops).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pyudev  # type: ignore[import-untyped]

from gateway.errors import ConfigError

__all__ = ["MatchRule", "UsbSerialDevice", "UsbSerialWatcher", "match", "parse_rule"]

log = logging.getLogger(__name__)

_HEX4 = re.compile(r"[0-9a-f]{4}")


@dataclass(frozen=True, slots=True, kw_only=True)
class MatchRule:
    """Adapters that are the port (or profile) ``name``. Ids are 4 hex digits as udev prints
    them (``ID_VENDOR_ID``/``ID_MODEL_ID``, compared without case); ``serial`` is compared
    exactly with ``ID_SERIAL_SHORT``. Unset criteria match anything; at least one is set."""

    name: str
    vendor_id: str | None = None
    model_id: str | None = None
    serial: str | None = None

    def __post_init__(self) -> None:
        for label, value in (("vendor_id", self.vendor_id), ("model_id", self.model_id)):
            if value is not None and not _HEX4.fullmatch(value):
                raise ValueError(f"{label} must be 4 lower-case hex digits, got {value!r}")
        if self.vendor_id is None and self.model_id is None and self.serial is None:
            raise ValueError("a match rule needs a vendor id, a product id or a serial number")

    @property
    def specificity(self) -> int:
        return sum(v is not None for v in (self.vendor_id, self.model_id, self.serial))

    def matches(self, device: UsbSerialDevice) -> bool:
        return (
            (self.vendor_id is None or self.vendor_id == device.vendor_id)
            and (self.model_id is None or self.model_id == device.model_id)
            and (self.serial is None or self.serial == device.serial)
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class UsbSerialDevice:
    """One tty of a USB serial adapter, as udev describes it."""

    sys_path: str
    dev_node: str  # /dev/ttyUSB0: changes with plug order, never configure it
    vendor_id: str
    model_id: str
    serial: str | None  # ID_SERIAL_SHORT; many CH340 and PL2303 adapters have none
    interface: str | None  # ID_USB_INTERFACE_NUM: which port of a multi-port adapter
    links: tuple[str, ...]  # DEVLINKS
    vendor: str | None = None  # ID_VENDOR, for logs
    model: str | None = None  # ID_MODEL, for logs

    @classmethod
    def from_udev(cls, sys_path: str, props: Mapping[str, str]) -> UsbSerialDevice | None:
        """The device from its udev properties, or ``None`` when it is not a USB tty."""
        if props.get("SUBSYSTEM", "tty") != "tty" or props.get("ID_BUS") != "usb":
            return None
        vendor_id = props.get("ID_VENDOR_ID", "").lower()
        model_id = props.get("ID_MODEL_ID", "").lower()
        dev_node = props.get("DEVNAME", "")
        if not (_HEX4.fullmatch(vendor_id) and _HEX4.fullmatch(model_id) and dev_node):
            return None
        return cls(
            sys_path=sys_path,
            dev_node=dev_node,
            vendor_id=vendor_id,
            model_id=model_id,
            serial=props.get("ID_SERIAL_SHORT") or None,
            interface=props.get("ID_USB_INTERFACE_NUM") or None,
            links=tuple(props.get("DEVLINKS", "").split()),
            vendor=props.get("ID_VENDOR") or None,
            model=props.get("ID_MODEL") or None,
        )

    @property
    def stable_path(self) -> str:
        """The path to open: the by-id link (survives replug and reboot), else our own
        ``/dev/gateway/`` link, else by-path (stable per physical socket), else the node."""
        for prefix in ("/dev/serial/by-id/", "/dev/gateway/", "/dev/serial/by-path/"):
            for link in self.links:
                if link.startswith(prefix):
                    return link
        return self.dev_node

    def describe(self) -> str:
        ident = f"{self.vendor_id}:{self.model_id}"
        if self.serial:
            ident += f" serial {self.serial}"
        return f"{self.dev_node} ({ident})"


def match(rules: Iterable[MatchRule], device: UsbSerialDevice) -> MatchRule | None:
    """The most specific rule that matches ``device`` (serial + ids beats ids alone); among
    equally specific rules, the first. Pure."""
    best: MatchRule | None = None
    for rule in rules:
        if rule.matches(device) and (best is None or rule.specificity > best.specificity):
            best = rule
    return best


_RULE_KEYS = {"vendorId": "vendor_id", "modelId": "model_id", "serial": "serial"}


def parse_rule(name: str, raw: Any, path: str) -> MatchRule:
    """A rule from its desired-properties form ``{"vendorId": "0403", "modelId": "6001",
    "serial": "A000"}``; :class:`ConfigError` names the key path."""
    if not isinstance(raw, Mapping):
        raise ConfigError("must be an object with vendorId, modelId and/or serial", path=path)
    values: dict[str, str] = {}
    for key, value in raw.items():
        attr = _RULE_KEYS.get(key)
        if attr is None:
            raise ConfigError(f"unknown key (known: {', '.join(_RULE_KEYS)})", path=f"{path}.{key}")
        if not isinstance(value, str) or not value:
            raise ConfigError("must be a non-empty string", path=f"{path}.{key}")
        values[attr] = value.lower() if attr != "serial" else value
    try:
        return MatchRule(name=name, **values)
    except ValueError as exc:
        raise ConfigError(str(exc), path=path) from None


Callback = Callable[[MatchRule, UsbSerialDevice], None]


class UsbSerialWatcher:
    """Watches udev for USB serial ttys and reports the ones a rule matches.

    ``started`` and ``stopped`` run on the event loop thread and must not block; an exception
    they raise is logged and does not stop the watcher. A device is reported at most once per
    appearance (udev and umockdev may repeat an ``add``)."""

    def __init__(
        self,
        rules: Sequence[MatchRule] = (),
        *,
        started: Callback,
        stopped: Callback,
        context: pyudev.Context | None = None,
    ) -> None:
        self._rules = tuple(rules)
        self._started = started
        self._stopped = stopped
        self._context = context
        self._present: dict[str, UsbSerialDevice] = {}
        self._matched: dict[str, MatchRule] = {}

    @property
    def present(self) -> Mapping[str, UsbSerialDevice]:
        """USB serial ttys present now, by sys path (matched or not)."""
        return dict(self._present)

    @property
    def matched(self) -> Mapping[str, MatchRule]:
        """The rule each started device was matched to, by sys path."""
        return dict(self._matched)

    def set_rules(self, rules: Sequence[MatchRule]) -> None:
        """Swap the rules and re-match present devices: a device whose rule changed is
        stopped under the old rule, then started under the new one."""
        self._rules = tuple(rules)
        for sys_path, device in list(self._present.items()):
            self._rematch(sys_path, device)

    async def run(self) -> None:
        """Run until cancelled: enumerate present adapters, then follow udev events."""
        context = self._context or pyudev.Context()
        monitor = pyudev.Monitor.from_netlink(context)
        monitor.filter_by(subsystem="tty")
        monitor.start()  # before enumerating, so nothing plugged in between is missed
        loop = asyncio.get_running_loop()
        fd = monitor.fileno()
        loop.add_reader(fd, self._drain, monitor, context)
        try:
            self._enumerate(context)
            await loop.create_future()  # until cancelled
        finally:
            loop.remove_reader(fd)
            for sys_path in list(self._matched):
                self._forget(sys_path)

    def _enumerate(self, context: pyudev.Context) -> None:
        """Bring the state in line with the devices present now (at start, and after lost
        events): forget what is gone, add what is new."""
        current = {device.sys_path: device for device in context.list_devices(subsystem="tty")}
        for sys_path in list(self._present):
            if sys_path not in current:
                self._forget(sys_path)
        for device in current.values():
            self._on_event("add", device)

    def _drain(self, monitor: pyudev.Monitor, context: pyudev.Context) -> None:
        while True:
            try:
                device = monitor.poll(timeout=0)
            except OSError as exc:  # ENOBUFS: events overflowed the socket buffer and are lost
                log.warning("udev monitor lost events (%s); re-reading the device list", exc)
                self._enumerate(context)
                return
            if device is None:
                return
            self._on_event(device.action or "add", device)

    def _on_event(self, action: str, device: pyudev.Device) -> None:
        sys_path = device.sys_path
        if action == "remove":
            if sys_path in self._present:
                self._forget(sys_path)
            return
        if action not in ("add", "change", "bind"):
            return
        props = {key: device.properties[key] for key in device.properties}
        found = UsbSerialDevice.from_udev(sys_path, props)
        if found is None:
            return
        known = self._present.get(sys_path)
        if known == found:
            return  # a repeated add
        if known is not None:
            self._forget(sys_path)
        self._present[sys_path] = found
        self._rematch(sys_path, found)

    def _rematch(self, sys_path: str, device: UsbSerialDevice) -> None:
        rule = match(self._rules, device)
        old = self._matched.get(sys_path)
        if rule == old:
            return
        if old is not None:
            del self._matched[sys_path]
            self._call(self._stopped, old, device)
        if rule is not None:
            self._matched[sys_path] = rule
            self._call(self._started, rule, device)

    def _forget(self, sys_path: str) -> None:
        device = self._present.pop(sys_path, None)
        rule = self._matched.pop(sys_path, None)
        if device is not None and rule is not None:
            self._call(self._stopped, rule, device)

    @staticmethod
    def _call(callback: Callback, rule: MatchRule, device: UsbSerialDevice) -> None:
        try:
            callback(rule, device)
        except Exception:
            log.exception("hotplug callback failed for %s (%s)", rule.name, device.describe())
