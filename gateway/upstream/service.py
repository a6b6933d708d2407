"""The upstream component the app owns: the settings in force, the forwarder running them, and
live changes (``gateway upstream set|clear`` through the service API, no restart)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway.config import UpstreamConfig
from gateway.store.db import Database
from gateway.store.log import Entry, MessageLog
from gateway.upstream import settings as link_settings
from gateway.upstream.cursors import FLOOR_CURSOR
from gateway.upstream.policy import RoutePolicy, default_select, from_config
from gateway.upstream.settings import LinkSettings
from gateway.upstream.wire import Origin

if TYPE_CHECKING:
    from gateway.upstream.downlink import Downlink
    from gateway.upstream.forwarder import Forwarder
    from gateway.upstream.link import Session

log = logging.getLogger(__name__)


def _default_select(entry: Entry) -> str | None:
    return default_select(entry.kind)


class Upstream:
    def __init__(self, *, data_dir: Path, cfg: UpstreamConfig, log_: MessageLog, db: Database,
                 local_gateway: str, select: Callable[[Entry], str | None] | None = None,
                 policy_of: Callable[[str], RoutePolicy] | None = None,
                 refuse: Callable[[str | None], None] | None = None,
                 credentials: Callable[[str, str | None], str | None] | None = None,
                 downlink: Downlink | None = None) -> None:
        self.downlink = downlink  # federation: calls from the parent for our scope
        self.data_dir = data_dir
        self.cfg = cfg
        self.log = log_
        self.db = db
        self.local_gateway = local_gateway
        self.select = select or _default_select
        self.refuse = refuse
        self.local_key = credentials  # (device, module) -> the identity's SAS key here
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
            if self.refuse is not None:
                self.refuse(None)
            if self.settings is not None:
                # imported when a link is configured, not at every start (footprint)
                from gateway.upstream.forwarder import Forwarder

                self.forwarder = Forwarder(
                    self.log, self.db, self.settings, self.cfg, local_gateway=self.local_gateway,
                    select=self.select, policy_of=self.policy_of, refuse=self.refuse,
                    data_dir=str(self.data_dir), credentials=self._credentials,
                    on_session=self._on_session)
                task = asyncio.get_running_loop().create_task(self.forwarder.run(),
                                                              name="upstream")
            try:
                changed = asyncio.get_running_loop().create_task(self._changed.wait())
                waits: set[asyncio.Future[Any]] = {changed} | ({task} if task else set())
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                changed.cancel()
                if task is not None and task.done() and not self._changed.is_set():
                    exc = task.exception() if not task.cancelled() else None
                    log.error("upstream forwarder failed: %r; restarting in 5 s", exc,
                              exc_info=exc)
                    await asyncio.sleep(5)
                    self._changed.set()
            finally:
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(BaseException):
                        await task

    def _on_session(self, session: Session) -> None:
        if self.downlink is not None and self.settings is not None:
            self.downlink.attach(session, self.settings.device_id,
                                 f"the parent hub {self.settings.hub}")

    def _credentials(self, origin: Origin) -> tuple[str | None, str | None]:
        """Identity mode: a DeviceConnect policy of the parent if configured, else the origin's
        own key in our registry (the gateway's own modules: under our device id here)."""
        if self.cfg.policy_name and self.cfg.policy_key:
            return self.cfg.policy_key, self.cfg.policy_name
        if self.local_key is None:
            return None, None
        device = origin.device_id
        if self.settings is not None and device == self.settings.device_id:
            device = self.local_gateway
        return self.local_key(device, origin.module_id), None

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
