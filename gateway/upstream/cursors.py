"""Durable forwarder state in ``hub.db``: a cursor per (lane, origin), the store epoch, and the
segments of live-first routes (:class:`~gateway.upstream.backlog.Lanes`).

The cursors are written lazily (a few times a second, in one statement per batch of changed
queues): a cursor behind the truth only means a resend after a crash, and the parent drops
resends by its high-water mark. The floor below which every queue is done is the log's pinned
``$upstream`` cursor, so retention never removes what is still to go up.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import time
from collections.abc import Sequence
from typing import Final

from gateway.store.db import Database, Migration
from gateway.upstream.clock import BootRow, Checkpoint
from gateway.upstream.wire import Origin

MIGRATION: Final[Migration] = (
    "upstream",
    (
        """
        CREATE TABLE upstream_cursors(
            route TEXT NOT NULL,
            device_id TEXT NOT NULL,
            module_id TEXT NOT NULL,
            seq INTEGER NOT NULL,
            PRIMARY KEY(route, device_id, module_id)) WITHOUT ROWID;
        CREATE TABLE upstream_meta(key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
        CREATE TABLE upstream_clock(seq INTEGER PRIMARY KEY, boot TEXT NOT NULL,
                                    mono REAL NOT NULL);
        CREATE TABLE upstream_boots(boot TEXT PRIMARY KEY, ord INTEGER NOT NULL,
                                    last REAL NOT NULL) WITHOUT ROWID;
        """,
    ),
)
FLOOR_CURSOR: Final = "$upstream"


class CursorStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def open(self) -> tuple[str, dict[tuple[str, Origin], int]]:
        """(epoch, cursors). The epoch is made once per store: a recreated ``hub.db`` restarts
        the log's sequence, and the new epoch tells the parent so."""
        await self._db.migrate(MIGRATION)

        def load(conn: sqlite3.Connection) -> tuple[str, dict[tuple[str, Origin], int]]:
            row = conn.execute("SELECT value FROM upstream_meta WHERE key = 'epoch'").fetchone()
            if row is None:
                epoch = f"{int(time.time()):x}{secrets.token_hex(4)}"
                conn.execute("INSERT INTO upstream_meta(key, value) VALUES ('epoch', ?)", (epoch,))
            else:
                epoch = str(row[0])
            cursors = {
                (str(route), Origin(str(device), str(module) or None)): int(seq)
                for route, device, module, seq in conn.execute(
                    "SELECT route, device_id, module_id, seq FROM upstream_cursors")
            }
            return epoch, cursors

        return await self._db.run(load)

    async def load_clock(self) -> tuple[list[Checkpoint], list[BootRow], dict[str, dict[str, int]]]:
        """Clock checkpoints, boots, and the drop counters per route."""
        def load(conn: sqlite3.Connection) -> tuple[list[Checkpoint], list[BootRow],
                                                    dict[str, dict[str, int]]]:
            cps = [(int(s), str(b), float(m)) for s, b, m in
                   conn.execute("SELECT seq, boot, mono FROM upstream_clock")]
            boots = [(str(b), int(o), float(last)) for b, o, last in
                     conn.execute("SELECT boot, ord, last FROM upstream_boots")]
            row = conn.execute("SELECT value FROM upstream_meta WHERE key = 'dropped'").fetchone()
            return cps, boots, json.loads(row[0]) if row else {}

        return await self._db.run(load)

    async def save_clock(self, checkpoints: list[Checkpoint], boot: BootRow | None,
                         prune_below: int | None = None,
                         dropped: dict[str, dict[str, int]] | None = None) -> None:
        def store(conn: sqlite3.Connection) -> None:
            conn.executemany("INSERT OR REPLACE INTO upstream_clock(seq, boot, mono)"
                             " VALUES (?, ?, ?)", checkpoints)
            if boot is not None:
                conn.execute("INSERT OR REPLACE INTO upstream_boots(boot, ord, last)"
                             " VALUES (?, ?, ?)", boot)
            if prune_below is not None:
                conn.execute("DELETE FROM upstream_clock WHERE seq < ?", (prune_below,))
            if dropped is not None:
                conn.execute("INSERT OR REPLACE INTO upstream_meta(key, value)"
                             " VALUES ('dropped', ?)", (json.dumps(dropped),))

        await self._db.run(store)

    async def save(self, changed: list[tuple[str, Origin, int]]) -> None:
        if not changed:
            return
        rows = [(route, o.device_id, o.module_id or "", seq) for route, o, seq in changed]
        await self._db.run(lambda conn: conn.executemany(
            "INSERT INTO upstream_cursors(route, device_id, module_id, seq) VALUES (?, ?, ?, ?)"
            " ON CONFLICT(route, device_id, module_id) DO UPDATE SET seq = excluded.seq", rows))

    async def load_lanes(self) -> dict[str, list[list[int]]]:
        """The segments of each live-first route: ``{route: [[low, slot], ...]}``."""
        def load(conn: sqlite3.Connection) -> dict[str, list[list[int]]]:
            row = conn.execute("SELECT value FROM upstream_meta WHERE key = 'lanes'").fetchone()
            return json.loads(row[0]) if row else {}

        return await self._db.run(load)

    async def save_lanes(self, lanes: dict[str, list[list[int]]],
                         forgotten: Sequence[str] = ()) -> None:
        """Record the segments; the cursors of ``forgotten`` lanes go in the same transaction
        (their slots may be used again, above the floor)."""
        def store(conn: sqlite3.Connection) -> None:
            conn.execute("INSERT OR REPLACE INTO upstream_meta(key, value) VALUES ('lanes', ?)",
                         (json.dumps(lanes, sort_keys=True),))
            conn.executemany("DELETE FROM upstream_cursors WHERE route = ?",
                             [(lane,) for lane in forgotten])

        await self._db.run(store)
