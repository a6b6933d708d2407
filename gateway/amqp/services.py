"""What the AMQP nodes need from the hub: a module of its own, without Proton, so that the
composition root builds it at start while Proton itself is loaded with the first AMQP
connection (:mod:`gateway.amqp.server`; the idle footprint)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from gateway.config import AmqpConfig
from gateway.hub.auth import Authenticator
from gateway.hub.messages import Message
from gateway.store.log import Entry, MessageLog

if TYPE_CHECKING:
    from gateway.hub.c2dsvc import C2DService

__all__ = ["BuiltinEndpoint", "FileNotifications", "Services"]


class BuiltinEndpoint(Protocol):
    """What the built-in endpoint's readers ask routing (gateway.routingsvc.RoutingService):
    which entries went to ``events``, and how one is shown (enrichments applied; None when
    they push it over the size limit, IoT Hub ref §10.4: skipped)."""

    def select(self, endpoint: str) -> Callable[[Entry], bool]: ...
    def events_message(self, entry: Entry) -> Message | None: ...


class FileNotifications(Protocol):
    """The file upload notification queue (gateway.files.store.FileStore)."""

    async def receive_notification(self) -> tuple[dict[str, Any], str] | None: ...
    async def settle_notification(self, lock: str, *, complete: bool) -> None: ...


@dataclass(frozen=True, slots=True)
class Services:
    """What the AMQP nodes need from the hub (handed over by the composition root)."""

    host_name: str
    event_hub: str
    consumer_groups: frozenset[str]  # lower-cased; "$default" always in it
    log: MessageLog
    authenticator: Authenticator
    c2d: C2DService
    config: AmqpConfig
    created_ms: int
    clock: Callable[[], float] = time.time
    files: FileNotifications | None = None  # the file upload notification queue, if enabled
    events: BuiltinEndpoint | None = None  # routing: None reads every entry, as stored

    @property
    def namespace(self) -> str:
        return f"sb://{self.host_name}/"
