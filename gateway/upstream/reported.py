"""Reported properties on their way up (federation; IoT Hub ref §4.3), durable, coalesced.

A reported patch of an identity whose twin the parent owns (or one that came from a child
gateway further down) is queued here before the device's 204 goes out, and stays until the
parent acknowledged it: one row per identity in ``hub.db``, the patches merged into one
(:func:`coalesce`, the latest value per key), so a device reporting every second through a
day-long outage sends one patch when the link returns, not 86,400. The downlink sends the
patches of many identities at once (:data:`gateway.upstream.downlink.BATCH` in flight), and
their acknowledgements are recorded in one transaction.

``coalesce`` is exact except for one case a single merge patch cannot say: a key removed
(``null``) and then set to an object is sent as the object, which the parent merges into
what it still had under that key.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Mapping, Sequence
from typing import Any, Final

from gateway.store.db import Database, Migration

MIGRATION: Final[Migration] = (
    "federation_reported",
    (
        """
        CREATE TABLE federation_reported(
            device_id TEXT NOT NULL,
            module_id TEXT NOT NULL,
            patch TEXT NOT NULL,
            gen INTEGER NOT NULL,
            PRIMARY KEY(device_id, module_id)) WITHOUT ROWID;
        """,
    ),
)

Key = tuple[str, str | None]


def coalesce(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """One merge patch doing what ``old`` then ``new`` did (nulls kept: they delete). Pure."""
    out = dict(old)
    for key, value in new.items():
        before = out.get(key)
        if isinstance(value, Mapping) and isinstance(before, Mapping):
            out[key] = coalesce(before, value)
        else:
            out[key] = value
    return out


class ReportedQueue:
    """Pending reported patches per identity; ``changed`` is set whenever one is added."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self._pending: dict[Key, tuple[dict[str, Any], int]] = {}
        self._gen = 0
        self.changed = asyncio.Event()

    async def open(self) -> None:
        await self._db.migrate(MIGRATION)

        def load(conn: sqlite3.Connection) -> list[tuple[str, str, str, int]]:
            return list(conn.execute(
                "SELECT device_id, module_id, patch, gen FROM federation_reported"))

        for device_id, module_id, patch, gen in await self._db.run(load):
            self._pending[(device_id, module_id or None)] = (json.loads(patch), gen)
            self._gen = max(self._gen, gen)
        if self._pending:
            self.changed.set()

    def __len__(self) -> int:
        return len(self._pending)

    async def add(self, device_id: str, module_id: str | None,
                  patch: Mapping[str, Any]) -> None:
        """Merge ``patch`` into the identity's pending one; returns once durable."""
        key = (device_id, module_id)
        old = self._pending.get(key)
        merged = coalesce(old[0], patch) if old is not None else dict(patch)
        self._gen += 1
        gen = self._gen
        self._pending[key] = (merged, gen)
        text = json.dumps(merged, separators=(",", ":"))
        await self._db.submit(lambda conn: conn.execute(
            "INSERT OR REPLACE INTO federation_reported VALUES (?, ?, ?, ?)",
            (device_id, module_id or "", text, gen)))
        self.changed.set()

    def items(self) -> list[tuple[Key, dict[str, Any], int]]:
        return [(key, patch, gen) for key, (patch, gen) in self._pending.items()]

    async def sent(self, done: Sequence[tuple[Key, int]]) -> None:
        """The parent acknowledged these patches (identity, generation): each is dropped
        unless a newer one was merged in meanwhile (that one goes next). One transaction."""
        rows = []
        for key, gen in done:
            current = self._pending.get(key)
            if current is None or current[1] != gen:
                continue
            del self._pending[key]
            rows.append((key[0], key[1] or "", gen))
        if rows:
            await self._db.submit(lambda conn: conn.executemany(
                "DELETE FROM federation_reported WHERE device_id = ? AND module_id = ?"
                " AND gen = ?", rows))
