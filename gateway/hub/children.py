"""Identity translation: sensors behind a bridge registered as child devices of the gateway.

A bridge module's twin may map some of its sensors to device identities::

    "children": {"meter1": {"deviceId": "plant7-meter1"}}

Sensors not listed stay named streams of the module's telemetry. For each listed one the hub:

* creates the device in the registry (authentication ``none``: it has no credentials of its
  own and never connects itself) as a child of the gateway device: ``parentScopes`` and
  ``deviceScope`` are the gateway's scope (IoT Hub ref §14.1);
* attributes the sensor's telemetry to it: the bridge publishes on its module topic with the
  application property ``gateway-child={deviceId}``, and the hub stamps the message as the
  child's (``iothub-connection-device-id``), after checking that this module of this gateway
  owns that child -- a module cannot speak for devices it was not given;
* reaches the child's direct methods through the bridge: a method invoked on the child is
  delivered to the bridge module with the sensor's name added to the payload.

Only modules the hub supervises (``managedBy: gateway``) may have children.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gateway.errors import ConfigError, GatewayError
from gateway.hub.registry import Registry

log = logging.getLogger(__name__)

CHILD_PROPERTY = "gateway-child"


@dataclass(frozen=True, slots=True)
class Child:
    device_id: str
    gateway_id: str
    module_id: str
    sensor: str


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


class ChildDirectory:
    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self._children: dict[str, Child] = {}

    def lookup(self, device_id: str) -> Child | None:
        return self._children.get(device_id)

    def owner_of(self, device_id: str, gateway_id: str, module_id: str | None) -> Child | None:
        """The child if the module ``gateway_id/module_id`` may speak for it."""
        child = self._children.get(device_id)
        if child is None or child.gateway_id != gateway_id or child.module_id != module_id:
            return None
        return child

    async def module_desired(self, gateway_id: str, module_id: str,
                             desired: Mapping[str, Any]) -> None:
        """A bridge module's desired properties changed: register its children."""
        module = self.registry.get_module(gateway_id, module_id)
        if module is None or module.managed_by != "gateway":
            return
        try:
            wanted = parse_children(desired)
        except ConfigError as exc:
            log.warning("children refused module=%s/%s reason=%s", gateway_id, module_id, exc)
            return
        gateway = self.registry.get_device(gateway_id)
        if gateway is None or not gateway.device_scope:
            log.warning("children need the gateway device %r to have a device scope", gateway_id)
            return
        for old in [c for c in self._children.values()
                    if (c.gateway_id, c.module_id) == (gateway_id, module_id)
                    and wanted.get(c.sensor) != c.device_id]:
            del self._children[old.device_id]
        for sensor, device_id in wanted.items():
            existing = self.registry.get_device(device_id)
            if existing is None:
                try:
                    await self.registry.put_device(
                        {"deviceId": device_id, "authentication": {"type": "none"},
                         "deviceScope": gateway.device_scope,
                         "parentScopes": [gateway.device_scope]},
                        device_id=device_id, if_match=None)
                except GatewayError as exc:
                    log.warning("child not created device_id=%s reason=%s", device_id, exc)
                    continue
                log.info("child device created device_id=%s parent=%s sensor=%s/%s",
                         device_id, gateway_id, module_id, sensor)
            elif gateway.device_scope not in existing.parent_scopes:
                log.warning("device %r exists and is not a child of %r: not translated",
                            device_id, gateway_id)
                continue
            self._children[device_id] = Child(device_id, gateway_id, module_id, sensor)
