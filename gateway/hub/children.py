"""Identity translation, hub side: sensors behind a bridge registered as child devices of the
gateway (the contract with the bridge is :mod:`gateway.translation`).

For each sensor listed in a bridge module's desired ``children`` map the hub:

* creates the device in the registry (authentication ``none``: it has no credentials of its
  own and never connects itself) as a child of the gateway device: ``parentScopes`` and
  ``deviceScope`` are the gateway's scope (IoT Hub ref §14.1);
* attributes the sensor's telemetry to it, after checking that this module of this gateway
  owns that child -- a module cannot speak for devices it was not given;
* reaches the child's direct methods through the bridge (:mod:`gateway.hub.methods`);
* keeps the module's **children document** current: each child's desired properties and its
  registry sensor key, pushed when the module subscribes and whenever one of them, or the
  map, changes;
* writes reported properties the module sends on the child's behalf into the child's twin
  (:mod:`gateway.hub.twinsvc`).

Only modules the hub supervises (``managedBy: gateway``) may have children.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from gateway.errors import ConfigError, GatewayError
from gateway.hub.addresses import ChildrenFilter
from gateway.hub.connections import Connection, Connections
from gateway.hub.registry import Device, Module, Registry
from gateway.hub.twinstore import TwinStore
from gateway.translation import (
    CHILDREN_DOCUMENT_TOPIC,
    ChildSpec,
    encode_document,
    parse_children,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Child:
    device_id: str
    gateway_id: str
    module_id: str
    sensor: str

    @property
    def module_client_id(self) -> str:
        return f"{self.gateway_id}/{self.module_id}"


ConnectionState = Callable[[str, str | None, bool], None]
"""``state(device_id, module_id, connected)``: record a connection state change."""


class ChildDirectory:
    def __init__(self, registry: Registry, twin_store: TwinStore,
                 connection_state: ConnectionState | None = None) -> None:
        self.registry = registry
        self.twin_store = twin_store
        self._connection_state = connection_state
        self.broker: Connections | None = None  # set once the broker exists: documents are pushed
        self._children: dict[str, Child] = {}

    def of_module(self, gateway_id: str, module_id: str) -> list[Child]:
        return [c for c in self._children.values()
                if (c.gateway_id, c.module_id) == (gateway_id, module_id)]

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
        online = self._module_online(gateway_id, module_id)
        for old in [c for c in self.of_module(gateway_id, module_id)
                    if wanted.get(c.sensor) != c.device_id]:
            del self._children[old.device_id]
            self._set_state(old.device_id, False, online)
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
            child = Child(device_id, gateway_id, module_id, sensor)
            if self._children.get(device_id) != child:
                self._children[device_id] = child
                self._set_state(device_id, True, online)
        self.push(gateway_id, module_id)

    def _module_online(self, gateway_id: str, module_id: str) -> bool:
        conn = self.broker.live.get(f"{gateway_id}/{module_id}") if self.broker else None
        return conn is not None and not conn.closed

    def _set_state(self, device_id: str, connected: bool, online: bool) -> None:
        """A child joins or leaves a connected bridge: it connects or disconnects with it."""
        if online and self._connection_state is not None:
            self._connection_state(device_id, None, connected)

    # -- the children document -------------------------------------------------------------

    def document(self, gateway_id: str, module_id: str) -> list[ChildSpec]:
        out = []
        for child in self.of_module(gateway_id, module_id):
            twin = self.twin_store.get(child.device_id)
            device = self.registry.get_device(child.device_id)
            out.append(ChildSpec(child.sensor, child.device_id,
                                 twin.desired if twin is not None else {},
                                 device.sensor_key if device is not None else None))
        return out

    def push(self, gateway_id: str, module_id: str) -> None:
        """Send the module its children document, if it is connected and subscribed."""
        if self.broker is None:
            return
        conn = self.broker.target(f"{gateway_id}/{module_id}", ChildrenFilter)
        if conn is not None:
            conn.publish(CHILDREN_DOCUMENT_TOPIC,
                         encode_document(self.document(gateway_id, module_id)), 0)

    def on_ready(self, conn: Connection, kinds: set[type]) -> None:
        """Broker hook: a module (re)subscribed to ``$gateway/children/#``."""
        p = conn.principal
        if ChildrenFilter in kinds and p is not None and p.module_id is not None:
            self.push(p.device_id, p.module_id)

    def desired_changed(self, device_id: str) -> None:
        """A device twin's desired properties changed: its bridge learns if it is a child."""
        child = self._children.get(device_id)
        if child is not None:
            self.push(child.gateway_id, child.module_id)

    def identity_changed(self, event: str, identity: Device | Module) -> None:
        """Registry listener: a child's sensor key changed, or the child was deleted."""
        if isinstance(identity, Module):
            return
        child = self._children.get(identity.device_id)
        if child is None:
            return
        if event == "deleted":
            del self._children[identity.device_id]  # its twin and registry state go with it
            log.info("child device deleted device_id=%s sensor=%s/%s",
                     child.device_id, child.module_id, child.sensor)
        self.push(child.gateway_id, child.module_id)
