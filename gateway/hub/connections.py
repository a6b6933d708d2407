"""What the hub needs of live client connections, declared here so the hub never imports the
transport (DESIGN "Which way calls go"): the broker's connections and the broker implement
these, and the composition root hands them in."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from gateway.hub.auth import Principal


class Connection(Protocol):
    """One live client connection (:class:`gateway.broker.connection.MqttConnection`)."""

    @property
    def client_id(self) -> str: ...
    @property
    def closed(self) -> bool: ...
    @property
    def principal(self) -> Principal | None: ...
    @property
    def can_publish(self) -> bool:
        """False unless connected with room in its QoS 1 in-flight window."""

    def publish(self, topic: str, payload: bytes, qos: int) -> int | None:
        """Send a PUBLISH; QoS 1 returns the packet id (its PUBACK comes back by a hook)."""


class Connections(Protocol):
    """The set of live connections (:class:`gateway.broker.broker.Broker`)."""

    @property
    def live(self) -> Mapping[str, Connection]: ...

    def target(self, client_id: str, kind: type) -> Connection | None:
        """The live connection of ``client_id`` if it holds a subscription of ``kind``."""
