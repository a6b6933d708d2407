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
from gateway.store.log import MessageLog

if TYPE_CHECKING:
    from gateway.hub.c2dsvc import C2DService

__all__ = ["FileNotifications", "Services"]


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

    @property
    def namespace(self) -> str:
        return f"sb://{self.host_name}/"
