"""The upstream component the app owns: the settings in force, the forwarder running them, and
live changes (``gateway upstream set|clear`` through the service API, no restart)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gateway.config import UpstreamConfig
from gateway.store.db import Database
from gateway.store.log import Entry, MessageLog
from gateway.upstream import settings as link_settings
from gateway.upstream.cursors import FLOOR_CURSOR
from gateway.upstream.forwarder import Forwarder
from gateway.upstream.policy import RoutePolicy, default_select, from_config
from gateway.upstream.settings import LinkSettings

log = logging.getLogger(__name__)


def _default_select(entry: Entry) -> str | None:
    return default_select(entry.kind)


class Upstream:
    def __init__(self, *, data_dir: Path, cfg: UpstreamConfig, log_: MessageLog, db: Database,
                 local_gateway: str, select: Callable[[Entry], str | None] | None = None,
                 policy_of: Callable[[str], RoutePolicy] | None = None) -> None:
        self.data_dir = data_dir
        self.cfg = cfg
        self.log = log_
        self.db = db
        self.local_gateway = local_gateway
        self.select = select or _default_select
        default = from_config(cfg)
        self.policy_of = policy_of or (lambda route: default)
        self.settings: LinkSettings | None = link_settings.load(data_dir, cfg)
        self.forwarder: Forwarder | None = None
        self._changed = asyncio.Event()

    async def run(self) -> None:
        """Run the forwarder for the settings in force; restart it when they change."""
        while True:
            self._changed.clear()
            task = None
            if self.settings is not None:
                self.forwarder = Forwarder(
                    self.log, self.db, self.settings, self.cfg, local_gateway=self.local_gateway,
                    select=self.select, policy_of=self.policy_of)
                task = asyncio.get_running_loop().create_task(self.forwarder.run(),
                                                              name="upstream")
            try:
                await self._changed.wait()
            finally:
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task

    async def set(self, settings: LinkSettings | None) -> None:
        """Persist and apply at once; None clears the upstream (its cursors are dropped, so the
        store no longer keeps messages for it)."""
        await asyncio.to_thread(link_settings.save, self.data_dir, settings)
        self.settings = settings
        if settings is None:
            self.forwarder = None
            self._changed.set()
            await asyncio.sleep(0)
            await self.log.delete_cursor(FLOOR_CURSOR)
        else:
            self._changed.set()
        log.info("upstream %s", "cleared" if settings is None else
                 f"set: {settings.device_id}@{settings.host}:{settings.port}")

    def show(self) -> dict[str, Any] | None:
        return self.settings.redacted() if self.settings is not None else None

    def status(self) -> dict[str, Any]:
        if self.forwarder is None:
            return {"state": "disconnected" if self.settings is None else "connecting",
                    "backlog": 0, "backlogBytes": 0, "oldestAgeSeconds": 0, "sent": 0,
                    "dropped": {"ttl": 0, "full": 0},
                    "lastError": "" if self.settings is not None else "no upstream set",
                    "since": "", "routes": {}}
        return self.forwarder.status()
