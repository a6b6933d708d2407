"""The seam between a hardware bridge and the runtime that connects it to the hub.

A bridge (Modbus, serial, BLE) knows its hardware and nothing of MQTT. The runtime
(``hw/runtime.py``) connects to the hub as the bridge's module identity, feeds the module
twin's desired properties to :meth:`Bridge.apply`, publishes what the bridge emits, reports
:meth:`Bridge.status` as reported properties and routes direct methods to
:attr:`Bridge.methods`. Bridges are tested on their own, against real peers (pymodbus servers,
ptys, a fake BlueZ on a private D-Bus), with a list-collecting ``emit``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol

from hw.readings import Reading

Emit = Callable[[str, Sequence[Reading]], Awaitable[None]]
"""``await emit(sensor, readings)``: hand one sensor's readings of one poll to the runtime
(which publishes them at QoS 1; it may block for back-pressure)."""

Method = Callable[[Any], Awaitable[tuple[int, Any]]]
"""A direct method: JSON payload in, ``(status, JSON payload)`` out (IoT Hub ref §5)."""


class Bridge(Protocol):
    name: str  # "modbus", "serial", "ble"

    async def run(self, emit: Emit) -> None:
        """Run until cancelled: poll or listen, call ``emit`` with readings. Must survive
        device errors (log once on the transition, recover), never return on its own."""

    def apply(self, desired: Mapping[str, Any]) -> None:
        """Apply the module twin's desired properties (the whole desired document, without
        ``$version``/``$metadata``). Only what changed is restarted; unchanged sensors keep
        running. Raises ``gateway.errors.ConfigError`` (naming the key path) when invalid; the
        previous configuration then stays in force."""

    def status(self) -> dict[str, Any]:
        """Reported properties: per port and per sensor: last read time, errors, latency."""

    def sensor_status(self, sensor: str) -> dict[str, Any] | None:
        """One sensor's part of :meth:`status` (reported into its child device's twin)."""

    def sensor_config_path(self, desired: Mapping[str, Any], sensor: str) -> tuple[str, ...] | None:
        """Where ``sensor``'s configuration sits in ``desired`` (e.g. ``("devices", "meter1")``),
        or None if it is not configured there: a child device's desired properties are merged
        into that object (:mod:`gateway.translation`)."""

    def set_secrets(self, secrets: Mapping[str, str]) -> None:
        """Sensor keys from the registry (sensor name -> 32 hex digits), for sensors whose
        frames are encrypted. Called again with the whole map whenever it changes."""

    @property
    def methods(self) -> Mapping[str, Method]:
        """Direct methods this bridge exposes (e.g. ``write_register``)."""
