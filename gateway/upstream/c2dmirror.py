"""Cloud-to-device messages from the parent, child side (:mod:`gateway.hub.c2dfed`).

A message the parent hands down for a device here goes into our own durable C2D queue
(:meth:`gateway.hub.c2dsvc.C2DService.send`, same message id and absolute expiry, no feedback
of our own: the parent writes it) and is noted in ``federation_c2d``; the parent resends it
each time its lock lapses, and the note makes those copies no-ops until the message's expiry.

Whatever settles it here -- the device's PUBACK over MQTT, complete, reject or abandon through
the device HTTP API or AMQP, expiry, a purge, dead-lettering after too many deliveries -- the
queue reports it through its one settle hook (:attr:`gateway.hub.c2d.C2DQueues.settle_hooks`,
after the commit), and the outcome is recorded in the message's row and sent up
(``$iothub/gateway/up/c2d/settled/?d=&mid=&st=``, ``st`` the feedback status the message left
with, or ``Abandoned``) until the parent acknowledges it, so it survives our link being down
and our restarts. An abandon is not final: it goes up (the parent's copy counts the delivery)
and the row goes back to "held"; several abandons made while the link is down go up as one.
A final outcome replaces an abandon not yet sent. A middle hop that only relays records
outcomes coming from below the same way and passes them on.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import sqlite3
import time
from collections.abc import Sequence
from typing import Final

from gateway.errors import GatewayError
from gateway.hub.c2d import ABANDONED, Settled
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
SENT: Final = "sent"  # the parent has the final outcome
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

    def on_queue_settled(self, events: Sequence[Settled]) -> None:
        """The queue's settle hook: outcomes of the parent's messages are to go up."""
        for device_id, message_id, status in events:
            if (device_id, message_id) in self.rows:
                self.c2d.tasks.spawn(self.completed(device_id, message_id, status),
                                     "c2d-settled")

    async def completed(self, device_id: str, message_id: str, status: str) -> None:
        """Record an outcome to send up (ours, or relayed from below; see the module doc)."""
        key = (device_id, message_id)
        row = self.rows.get(key)
        current = row[1] if row is not None else None
        if current == SENT or (status == ABANDONED and current is not None):
            return  # final already sent; or an abandon behind one still to go (coalesced)
        await self._put(key, row[0] if row is not None else time.time() + RELAY_KEEP, status)
        self.changed.set()

    def unsent(self) -> list[tuple[Key, str]]:
        return [(key, status) for key, (_, status) in self.rows.items()
                if status is not None and status != SENT]

    async def sent(self, done: Sequence[tuple[Key, str]]) -> None:
        """The parent acknowledged these outcomes: a final one is kept as sent until the
        message's expiry (resends stay no-ops); after an abandon the row is held again.
        One transaction for the lot; an outcome changed meanwhile goes next."""
        rows = []
        for key, status in done:
            row = self.rows.get(key)
            if row is None or row[1] != status:
                continue
            self.rows[key] = (row[0], None if status == ABANDONED else SENT)
            rows.append((key[0], key[1], row[0], self.rows[key][1]))
        if rows:
            await self.db.submit(lambda conn: conn.executemany(
                "INSERT OR REPLACE INTO federation_c2d VALUES (?, ?, ?, ?)", rows))

    async def _expire(self) -> None:
        now = time.time()
        for key in [k for k, (expiry, _) in self.rows.items() if expiry < now]:
            if self.rows[key][1] in (None, SENT):
                await self._drop(key)
