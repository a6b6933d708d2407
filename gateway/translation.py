"""Identity translation: the contract between the hub and a bridge module that speaks for
child devices. Pure; the hub (:mod:`gateway.hub.children`) and the bridge runtime
(:mod:`hw.runtime`) both build on it, neither imports the other.

A bridge module's twin maps some of its sensors to device identities::

    "children": {"meter1": {"deviceId": "plant7-meter1"}}

Each such child is a device of the registry (a child of the gateway, ref §14.1) with its own
twin and methods, reached through the bridge. Four exchanges, on the module's own connection:

* telemetry: the module's telemetry topic with the application property
  ``gateway-child={deviceId}``; the hub files the message as the child's (ref §2.1);
* methods: a method invoked on the child reaches the module with ``"sensor"`` added to its
  payload (ref §5);
* the **children document** (an extension of this gateway, not of IoT Hub): a module that
  subscribes to ``$gateway/children/#`` receives, on ``$gateway/children/document``, at once and
  after every change, one JSON object::

      {"meter1": {"deviceId": "plant7-meter1",
                  "desired": {...the child twin's desired properties, no $ keys...},
                  "sensorKey": "231d39c1d7cc1ab1aee224cd096db932"}}   # or null

  ``sensorKey`` is the child identity's sensor key (e.g. a BTHome bindkey), kept in the
  registry and never in a twin;
* reported properties on a child's behalf: a PUBLISH on ``$gateway/children/reported/{deviceId}``
  (the id percent-encoded) with a JSON merge patch; its PUBACK follows the write.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from gateway.errors import ConfigError, RemoteProtocolError
from gateway.hub.propbag import decode_component, encode_component

CHILD_PROPERTY = "gateway-child"
CHILDREN_FILTER = "$gateway/children/#"
CHILDREN_DOCUMENT_TOPIC = "$gateway/children/document"
CHILD_REPORTED_PREFIX = "$gateway/children/reported/"


@dataclass(frozen=True, slots=True)
class ChildSpec:
    """One sensor translated to a child device, as the bridge sees it."""

    sensor: str
    device_id: str
    desired: Mapping[str, Any] = field(default_factory=dict)
    sensor_key: str | None = field(default=None, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {"deviceId": self.device_id, "desired": dict(self.desired),
                "sensorKey": self.sensor_key}


def parse_children(desired: Mapping[str, Any]) -> dict[str, str]:
    """``desired["children"]`` -> {sensor: device id}; ConfigError names the bad key."""
    raw = desired.get("children") or {}
    if not isinstance(raw, Mapping):
        raise ConfigError("must be an object of sensor: {deviceId: ...}", path="children")
    out: dict[str, str] = {}
    for sensor, spec in raw.items():
        device_id = spec.get("deviceId") if isinstance(spec, Mapping) else None
        if not isinstance(device_id, str) or not device_id:
            raise ConfigError("needs a deviceId", path=f"children.{sensor}")
        out[sensor] = device_id
    return out


def encode_document(children: list[ChildSpec]) -> bytes:
    return json.dumps({c.sensor: c.to_json() for c in children},
                      separators=(",", ":")).encode()


def parse_document(payload: bytes) -> dict[str, ChildSpec]:
    """The children document -> {sensor: ChildSpec}. RemoteProtocolError when malformed."""
    try:
        doc = json.loads(payload)
    except ValueError as exc:
        raise RemoteProtocolError(f"children document is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise RemoteProtocolError("children document must be a JSON object")
    out: dict[str, ChildSpec] = {}
    for sensor, spec in doc.items():
        if not isinstance(spec, dict) or not isinstance(spec.get("deviceId"), str):
            raise RemoteProtocolError(f"children document: bad entry for {sensor!r}")
        desired = spec.get("desired")
        desired = {} if desired is None else desired
        key = spec.get("sensorKey")
        if not isinstance(desired, dict) or not (key is None or isinstance(key, str)):
            raise RemoteProtocolError(f"children document: bad entry for {sensor!r}")
        out[sensor] = ChildSpec(sensor, spec["deviceId"], desired, key)
    return out


def child_reported_topic(device_id: str) -> str:
    return CHILD_REPORTED_PREFIX + encode_component(device_id)


def parse_child_reported_topic(topic: str) -> str | None:
    """The child device id of a reported-properties topic, or None if it is not one."""
    if not topic.startswith(CHILD_REPORTED_PREFIX):
        return None
    text = topic[len(CHILD_REPORTED_PREFIX):]
    if not text or "/" in text:
        return None
    return decode_component(text)


def merge_patch(doc: Mapping[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    """JSON merge patch (RFC 7396: null deletes, objects merge, anything else replaces): how
    twin patches combine (IoT Hub ref §4.3)."""
    out = dict(doc)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge_patch(out[key], value)
        elif isinstance(value, Mapping):
            out[key] = merge_patch({}, value)
        else:
            out[key] = value
    return out


def overlay(desired: Mapping[str, Any], path: tuple[str, ...],
            patch: Mapping[str, Any]) -> dict[str, Any]:
    """``desired`` with ``patch`` merged into the object at ``path`` (a sensor's configuration
    inside its bridge's desired properties)."""
    if not path:
        return merge_patch(desired, patch)
    head, rest = path[0], path[1:]
    inner = desired.get(head)
    out = dict(desired)
    out[head] = overlay(inner if isinstance(inner, Mapping) else {}, rest, patch)
    return out
