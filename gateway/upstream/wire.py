"""A stored message as it goes up: the origin's telemetry topic with its property bag. Pure.

The bag carries what the device set (application properties; message id, correlation id,
content type and encoding, creation time, schema, subject: IoT Hub ref §2.3) and, towards a
parent that is this software, the child's stamp (:mod:`gateway.hub.onbehalf`): epoch,
sequence, and the gateway path so far. Every message gets a **stable** ``$.mid``: the device's
own, else ``{epoch}-{seq}``, the same on every resend, so consumers behind Azure can dedupe.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from gateway.hub import onbehalf
from gateway.hub.propbag import encode_bag, encode_component
from gateway.store.log import Entry
from gateway.upstream.policy import DEFAULT_ROUTE

_WIRE = {
    "message-id": "$.mid",
    "correlation-id": "$.cid",
    "user-id": "$.uid",
    "content-type": "$.ct",
    "content-encoding": "$.ce",
    "absolute-expiry-time": "$.exp",
    "creation-time": "$.ctime",
    "message-schema": "$.schema",
    "dt-subject": "$.sub",
}


@dataclass(frozen=True, slots=True)
class Origin:
    """Whose message it is, as the parent knows it."""

    device_id: str
    module_id: str | None

    @property
    def client_id(self) -> str:
        return self.device_id if self.module_id is None else f"{self.device_id}/{self.module_id}"


def origin_of(entry: Entry, local_gateway: str, upstream_gateway: str) -> Origin:
    """The entry's origin; our own device (the hub's modules hang off it) is known upstream by
    the link's device id."""
    device = upstream_gateway if entry.device_id == local_gateway else entry.device_id
    return Origin(device, entry.module_id)


def base_topic(origin: Origin) -> str:
    topic = f"devices/{encode_component(origin.device_id)}/"
    if origin.module_id is not None:
        topic += f"modules/{encode_component(origin.module_id)}/"
    return topic + "messages/events/"


def encode(entry: Entry, origin: Origin, *, epoch: str, stamp: bool,
           route: str = DEFAULT_ROUTE) -> tuple[str, bytes]:
    """(topic, payload) of ``entry``. ``stamp``: add the dedupe stamp (our own parent)."""
    data = json.loads(entry.props)
    system: dict[str, str] = data.get("system", {})
    pairs: list[tuple[str, str | None]] = []
    mid = system.get("message-id") or f"{epoch}-{entry.seq}"
    pairs.append(("$.mid", mid))
    for name, key in _WIRE.items():
        value = system.get(name)
        if value is not None and name != "message-id":
            pairs.append((key, value))
    if stamp:
        pairs.append((onbehalf.EPOCH_KEY, epoch))
        pairs.append((onbehalf.SEQ_KEY, str(entry.seq)))
        if route != DEFAULT_ROUTE:
            pairs.append((onbehalf.ROUTE_KEY, route))
        path = system.get(onbehalf.GATEWAY_PATH)
        if path:
            pairs.append((onbehalf.PATH_KEY, path))
    pairs.extend(data.get("application", {}).items())
    return base_topic(origin) + encode_bag(pairs), entry.body
