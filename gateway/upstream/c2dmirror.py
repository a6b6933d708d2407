"""Cloud-to-device messages from the parent, child side (:mod:`gateway.hub.c2dfed`).

A message the parent hands down for a device here goes into our own durable C2D queue
(:meth:`gateway.hub.c2dsvc.C2DService.send`, same message id and absolute expiry, no feedback
of our own: the parent writes it) and is noted in ``federation_c2d``; the parent resends it
each time its lock lapses, and the note makes those copies no-ops until the message's expiry.
When the device completes it here, the completion is recorded in the same row and sent up
(``$iothub/gateway/up/c2d/settled/...``) until the parent acknowledges it, so it survives our
link being down and our restarts. A middle hop that only relays records completions coming
from below the same way and passes them on.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import sqlite3
import time
from typing import Final

from gateway.errors import GatewayError
from gateway.hub.c2dsvc import C2DService
from gateway.store.db import Database, Migration

log = logging.getLogger(__name__)

MIGRATION: Final[Migration] = (
    "federation_c2d",
    (
        """
        CREATE TABLE federation_c2d(
            device_id TEXT NOT NULL,
            message_id TEXT NOT NULL,
            expiry REAL NOT NULL,
            status TEXT,
            PRIMARY KEY(device_id, message_id)) WITHOUT ROWID;
        """,
    ),
)
SENT: Final = "sent"  # the parent has the completion
RELAY_KEEP: Final = 48 * 3600.0  # a relayed completion's row lives at most this long

Key = tuple[str, str]


class C2DMirror:
    def __init__(self, c2d: C2DService, db: Database) -> None:
        self.c2d = c2d
        self.db = db
        self.rows: dict[Key, tuple[float, str | None]] = {}  # -> (expiry, status)
        self.changed = asyncio.Event()
        self.accepted = 0

    async def open(self) -> None:
        await self.db.migrate(MIGRATION)

        def load(conn: sqlite3.Connection) -> list[tuple[str, str, float, str | None]]:
            return list(conn.execute(
                "SELECT device_id, message_id, expiry, status FROM federation_c2d"))

        self.rows = {(d, m): (e, s) for d, m, e, s in await self.db.run(load)}
        if self.unsent():
            self.changed.set()

    async def _put(self, key: Key, expiry: float, status: str | None) -> None:
        self.rows[key] = (expiry, status)
        await self.db.submit(lambda conn: conn.execute(
            "INSERT OR REPLACE INTO federation_c2d VALUES (?, ?, ?, ?)",
            (key[0], key[1], expiry, status)))

    async def _drop(self, key: Key) -> None:
        self.rows.pop(key, None)
        await self.db.submit(lambda conn: conn.execute(
            "DELETE FROM federation_c2d WHERE device_id = ? AND message_id = ?", key))

    async def accept(self, device_id: str, payload: bytes) -> None:
        """A message handed down for ``device_id``: queue it once."""
        await self._expire()
        try:
            data = json.loads(payload)
            properties = data["properties"]
            message_id = properties["messageId"]
            body = base64.b64decode(data["bodyBase64"])
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("c2d from the parent for %s dropped: %s", device_id, exc)
            return
        key = (device_id, message_id)
        if key in self.rows:
            return  # a resend after the parent's lock lapsed: we have it
        try:
            message = await self.c2d.send(device_id, body, properties)
        except GatewayError as exc:  # queue full, expired, unknown: the parent resends
            log.warning("c2d %s from the parent for %s not queued: %s", message_id, device_id,
                        exc)
            return
        await self._put(key, message.expiry, None)
        self.accepted += 1

    def on_settled(self, device_id: str, message_id: str) -> None:
        """C2DService hook: the device completed a message; if the parent's, tell it."""
        row = self.rows.get((device_id, message_id))
        if row is not None and row[1] is None:
            self.c2d.tasks.spawn(self.completed(device_id, message_id, "Success", row[0]),
                                 "c2d-settled")

    async def completed(self, device_id: str, message_id: str, status: str,
                        expiry: float | None = None) -> None:
        """Record a completion to send up (ours, or relayed from below)."""
        await self._put((device_id, message_id),
                        expiry if expiry is not None else time.time() + RELAY_KEEP, status)
        self.changed.set()

    def unsent(self) -> list[tuple[Key, str]]:
        return [(key, status) for key, (_, status) in self.rows.items()
                if status is not None and status != SENT]

    async def sent(self, key: Key) -> None:
        row = self.rows.get(key)
        if row is not None:
            await self._put(key, row[0], SENT)  # kept until expiry: resends stay no-ops

    async def _expire(self) -> None:
        now = time.time()
        for key in [k for k, (expiry, _) in self.rows.items() if expiry < now]:
            if self.rows[key][1] in (None, SENT):
                await self._drop(key)
