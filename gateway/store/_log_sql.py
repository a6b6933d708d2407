"""The message log's tables and the transaction bodies that run on the db thread.

Kept apart from :mod:`gateway.store.log` (the asyncio side) so each module holds one concept:
this one is the SQL. Every function takes the connection first and is handed to
:meth:`gateway.store.db.Database.run` (or ``submit``), so it runs inside a group transaction.
"""

from __future__ import annotations

import sqlite3
from itertools import chain
from operator import attrgetter
from typing import Any, Final, TypeAlias

from gateway.routing.names import RouteNames
from gateway.store.db import Migration

MIGRATION: Final[Migration] = (
    "log",
    (
        """
        CREATE TABLE log_messages(
            seq INTEGER PRIMARY KEY,
            kind TEXT NOT NULL,
            device_id TEXT NOT NULL,
            module_id TEXT,
            enqueued_ms INTEGER NOT NULL,
            props TEXT NOT NULL,
            body BLOB NOT NULL);
        CREATE TABLE log_cursors(
            name TEXT PRIMARY KEY,
            seq INTEGER NOT NULL,
            pinned INTEGER NOT NULL) WITHOUT ROWID;
        CREATE TABLE log_meta(key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
        """,
        # The names of the routes each message matched, comma-separated (route names have
        # no commas); '' for none. Endpoint readers select by them.
        "ALTER TABLE log_messages ADD COLUMN routes TEXT NOT NULL DEFAULT '';",
    ),
)

DROP_BYTE_CAP: Final = "byte-cap"
CHUNK_ROWS: Final = 5000  # rows deleted per prune transaction, so appends interleave

_INSERT: Final = (
    "INSERT INTO log_messages(kind, device_id, module_id, enqueued_ms, props, body, routes)"
    " VALUES (?, ?, ?, ?, ?, ?, ?)"
)
_INSERT_AT: Final = (
    "INSERT INTO log_messages(seq, kind, device_id, module_id, enqueued_ms, props, body, routes)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
COLUMNS: Final = "seq, kind, device_id, module_id, enqueued_ms, props, body, routes"
_SIZE: Final = "length(body) + length(props)"

def ROW_OF(r: Any) -> Row:  # noqa: N802 - it stands in for an attrgetter
    """The row of one Record: its fields, then its route names joined by commas (joined once
    by the router when it gives :class:`RouteNames`)."""
    routes = r.routes
    return (r.kind, r.device_id, r.module_id, r.enqueued_ms, r.props, r.body,
            routes.text if routes.__class__ is RouteNames else ",".join(routes))


def routes_of(text: str) -> tuple[str, ...]:
    return tuple(text.split(",")) if text else ()

BODY_OF = attrgetter("body")
PROPS_OF = attrgetter("props")

Row: TypeAlias = tuple[str, str, str | None, int, str, bytes, str]

CursorMap: TypeAlias = dict[str, tuple[int, bool]]
State: TypeAlias = tuple[int, int, int, int | None, int | None, CursorMap, dict[str, int]]
"""last_seq, count, bytes, first seq, oldest enqueued_ms, cursors, dropped totals by reason."""


INSERT_CHUNK: Final = 64
"""Rows per multi-row INSERT statement (7 parameters each, far below SQLite's 32766)."""
_INSERT_MANY: Final = _INSERT + ", (?, ?, ?, ?, ?, ?, ?)" * (INSERT_CHUNK - 1)


def insert(conn: sqlite3.Connection, rows: list[Row]) -> int:
    """Insert ``rows`` in order; return the seq of the last one. Seqs are rowids, so they
    continue from the largest present; when the table is empty they continue from the kept
    high-water mark instead (seqs are never reused).

    Full chunks go in as one ``INSERT ... VALUES (...), (...), ...`` of :data:`INSERT_CHUNK`
    rows (SQLite inserts them in order), the rest with ``executemany``: one statement step per
    chunk instead of one per row, so the thread gives up and takes back the GIL once per chunk
    (the loop thread is busy with the next messages meanwhile) and SQLite runs its insert
    program once per chunk."""
    top = conn.execute("SELECT max(seq) FROM log_messages").fetchone()[0]
    start = 0
    if top is None:
        top = meta(conn, "high_water")
        conn.execute(_INSERT_AT, (top + 1, *rows[0]))
        start = 1
    end = len(rows)
    while end - start >= INSERT_CHUNK:
        conn.execute(_INSERT_MANY, list(chain.from_iterable(rows[start:start + INSERT_CHUNK])))
        start += INSERT_CHUNK
    if start < end:
        conn.executemany(_INSERT, rows[start:] if start else rows)
    return int(top) + len(rows)


def meta(conn: sqlite3.Connection, key: str) -> int:
    row = conn.execute("SELECT value FROM log_meta WHERE key = ?", (key,)).fetchone()
    return int(row[0]) if row else 0


def add_meta(conn: sqlite3.Connection, key: str, delta: int, *, maximum: bool = False) -> None:
    op = "max(value, excluded.value)" if maximum else "value + excluded.value"
    conn.execute(
        "INSERT INTO log_meta(key, value) VALUES (?, ?)"
        f" ON CONFLICT(key) DO UPDATE SET value = {op}",
        (key, delta),
    )


def first_row(conn: sqlite3.Connection) -> tuple[int, int] | None:
    row = conn.execute("SELECT seq, enqueued_ms FROM log_messages ORDER BY seq LIMIT 1").fetchone()
    return (int(row[0]), int(row[1])) if row else None


def load_state(conn: sqlite3.Connection) -> State:
    count, nbytes, top = conn.execute(
        f"SELECT count(*), total({_SIZE}), max(seq) FROM log_messages"
    ).fetchone()
    last = max(int(top or 0), meta(conn, "high_water"))
    first = first_row(conn)
    cursors = {
        str(name): (int(seq), bool(pinned))
        for name, seq, pinned in conn.execute("SELECT name, seq, pinned FROM log_cursors")
    }
    dropped = {
        str(key).removeprefix("dropped:"): int(value)
        for key, value in conn.execute("SELECT key, value FROM log_meta WHERE key LIKE 'dropped:%'")
    }
    return (
        last,
        int(count),
        int(nbytes),
        first[0] if first else None,
        first[1] if first else None,
        cursors,
        dropped,
    )


def delete_below(conn: sqlite3.Connection, below: int) -> tuple[int, int]:
    """Delete every message with ``seq < below``; return (rows, bytes). Keeps the high-water
    mark when the table becomes empty, so seqs are never reused."""
    deleted = conn.execute(
        f"DELETE FROM log_messages WHERE seq < ? RETURNING seq, {_SIZE}", (below,)
    ).fetchall()
    if deleted and conn.execute("SELECT 1 FROM log_messages LIMIT 1").fetchone() is None:
        add_meta(conn, "high_water", max(seq for seq, _ in deleted), maximum=True)
    return len(deleted), sum(size for _, size in deleted)


def delete_expired(
    conn: sqlite3.Connection, upto: int, cutoff_ms: int
) -> tuple[int, int, bool, tuple[int, int] | None]:
    """One chunk of retention: messages with ``seq <= upto`` enqueued before ``cutoff_ms``,
    stopping at the first younger one (enqueued times follow seq order). Returns (rows,
    bytes, more chunks may follow, new first (seq, enqueued_ms))."""
    first = first_row(conn)
    if first is None or first[0] > upto:
        return 0, 0, False, first
    window = min(first[0] + CHUNK_ROWS, upto + 1)
    young = conn.execute(
        "SELECT seq FROM log_messages WHERE seq < ? AND enqueued_ms >= ? ORDER BY seq LIMIT 1",
        (window, cutoff_ms),
    ).fetchone()
    below = young[0] if young else window
    rows, nbytes = delete_below(conn, below)
    return rows, nbytes, young is None and below <= upto, first_row(conn)


def evict(
    conn: sqlite3.Connection, need: int, upto: int, pin_floor: int
) -> tuple[int, int, int, tuple[int, int] | None]:
    """One chunk of byte-cap eviction: delete the oldest messages (``seq <= upto``) until
    ``need`` bytes are freed or a chunk is done. Returns (rows, bytes, rows a pinning cursor
    had not read, new first)."""
    freed = 0
    last = None
    for seq, size in conn.execute(
        f"SELECT seq, {_SIZE} FROM log_messages WHERE seq <= ? ORDER BY seq LIMIT ?",
        (upto, CHUNK_ROWS),
    ):
        last = seq
        freed += size
        if freed >= need:
            break
    if last is None:
        return 0, 0, 0, first_row(conn)
    lost = conn.execute(
        "SELECT count(*) FROM log_messages WHERE seq > ? AND seq <= ?", (pin_floor, last)
    ).fetchone()[0]
    rows, nbytes = delete_below(conn, last + 1)
    if lost:
        add_meta(conn, f"dropped:{DROP_BYTE_CAP}", int(lost))
    return rows, nbytes, int(lost), first_row(conn)
