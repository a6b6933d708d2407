"""The one reading model every bridge produces, and how readings become telemetry bodies.

A :class:`Reading` is one measured value of one sensor, stamped when it was acquired (not when
it was sent: store-and-forward may delay sending by days). Pure.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

Value = float | int | bool | str


@dataclass(frozen=True, slots=True)
class Reading:
    sensor: str  # the configured sensor name (a Modbus meter, a BLE tag, a GPS)
    name: str  # the quantity ("temperature", "activePower", "latitude")
    value: Value
    unit: str | None  # UCUM-style unit ("Cel", "W", "kWh", "%", "deg", ...), None if unitless
    acquired: float  # epoch seconds at acquisition

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "value": _jsonable(self.value)}
        if self.unit:
            out["unit"] = self.unit
        out["ts"] = iso(self.acquired)
        return out


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _jsonable(value: Value) -> Value | None:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def telemetry_body(sensor: str, readings: Iterable[Reading],
                   extra: Mapping[str, Any] | None = None) -> bytes:
    """One JSON message per sensor per poll: ``{"sensor": ..., "readings": [...]}``."""
    body: dict[str, Any] = {"sensor": sensor, "readings": [r.as_json() for r in readings]}
    if extra:
        body.update(extra)
    return json.dumps(body, separators=(",", ":")).encode()
