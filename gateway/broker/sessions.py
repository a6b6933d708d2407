"""Persistent MQTT sessions: the subscription set of each client id.

The Azure device SDK connects with CleanSession=0 and never re-subscribes after a reconnect
(IoT Hub ref §1.6, pitfall 6), so the hub keeps each identity's subscriptions across reconnects
and across hub restarts. CleanSession=1 discards the stored set (MQTT 3.1.1 §3.1.2.4).

The set changes in memory at once (so ``session_present`` and delivery decisions are exact)
and is written through to the store's database; each change returns the future of its write,
so a SUBACK is sent only once the subscription is durable. Writes are applied by the store's
single thread in submission order, so they cannot overtake each other.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3

from gateway.store.db import Database, Migration

MIGRATION: Migration = (
    "mqtt_sessions",
    ["CREATE TABLE mqtt_sessions (client_id TEXT PRIMARY KEY, subscriptions TEXT NOT NULL)"],
)


class SessionStore:
    """Client id -> {topic filter: granted QoS}, durable."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self._subs: dict[str, dict[str, int]] = {}

    async def open(self) -> None:
        await self._db.migrate(MIGRATION)

        def load(conn: sqlite3.Connection) -> list[tuple[str, str]]:
            return conn.execute("SELECT client_id, subscriptions FROM mqtt_sessions").fetchall()

        for client_id, subs in await self._db.run(load):
            self._subs[client_id] = {f: int(q) for f, q in json.loads(subs)}

    def subscriptions(self, client_id: str) -> dict[str, int]:
        return dict(self._subs.get(client_id, {}))

    def start(self, client_id: str, *, clean: bool) -> bool:
        """Begin a session; returns ``session_present`` for the CONNACK (§3.2.2.2). A clean
        session discards the stored one; a persistent one is created if missing."""
        present = client_id in self._subs
        if clean:
            if present:
                self.discard(client_id)
            return False
        if not present:
            self._save(client_id, {})
        return present

    def subscribe(self, client_id: str, granted: dict[str, int]) -> asyncio.Future[None]:
        return self._save(client_id, {**self._subs.get(client_id, {}), **granted})

    def unsubscribe(self, client_id: str, filters: list[str]) -> asyncio.Future[None]:
        subs = {f: q for f, q in self._subs.get(client_id, {}).items() if f not in filters}
        return self._save(client_id, subs)

    def discard(self, client_id: str) -> asyncio.Future[None]:
        self._subs.pop(client_id, None)

        def delete(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM mqtt_sessions WHERE client_id = ?", (client_id,))

        return self._db.submit(delete)

    def _save(self, client_id: str, subs: dict[str, int]) -> asyncio.Future[None]:
        self._subs[client_id] = subs
        text = json.dumps(sorted(subs.items()))

        def upsert(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO mqtt_sessions (client_id, subscriptions) VALUES (?, ?) "
                "ON CONFLICT (client_id) DO UPDATE SET subscriptions = excluded.subscriptions",
                (client_id, text),
            )

        return self._db.submit(upsert)
