"""Exactly-once appends for messages a child gateway forwards (on-behalf-of).

Each such record carries ``once = (key, epoch, seq)``: ``key`` names (gateway, origin), ``epoch``
the child's store incarnation, ``seq`` the child's log sequence (increasing per origin). The
high-water mark per key lives in ``log_dedupe`` and is read and moved **in the same transaction
body** that inserts the records, so a commit either stores a message and raises the mark, or
does neither: after a SIGKILL of either side the child resends what it has no PUBACK for, and
whatever is at or below the mark is dropped (federation.md §0.1 fact 3: by sequence, never by a
time window). A new epoch (the child's store was recreated) starts the key afresh.

The gap check: a record may also carry ``prev``, the sequence of the message the child sent
before it in the same queue. If that one is above the mark, it never got here (its commit
failed while this later one's did not, or it is still in flight on a connection that died):
storing this one would raise the mark past it, and its resend would then be dropped as a
duplicate. So the whole body is refused (:class:`~gateway.errors.StoreError`: no PUBACK, the
child resends both in order). ``prev`` at or below the mark, or None, passes.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any, Final

from gateway.errors import StoreError
from gateway.store._log_sql import ROW_OF, Row, insert
from gateway.store.db import Migration

MIGRATION: Final[Migration] = (
    "dedupe",
    (
        """
        CREATE TABLE log_dedupe(
            key TEXT PRIMARY KEY,
            epoch TEXT NOT NULL,
            seq INTEGER NOT NULL) WITHOUT ROWID;
        """,
    ),
)


def insert_once(conn: sqlite3.Connection, records: Sequence[Any]) -> tuple[int, list[Row], int]:
    """Insert the records not seen before, raise their marks; return (seq of the last row
    inserted or 0, the rows inserted, how many were dropped as duplicates)."""
    marks: dict[str, tuple[str, int]] = {}
    keys = list({r.once[0] for r in records if getattr(r, "once", None) is not None})
    for start in range(0, len(keys), 500):  # one query per 500 keys (SQLite's variable limit)
        chunk = keys[start:start + 500]
        for key, epoch, seq in conn.execute(
                "SELECT key, epoch, seq FROM log_dedupe WHERE key IN "
                f"({','.join('?' * len(chunk))})", chunk):
            marks[str(key)] = (str(epoch), int(seq))
    changed: set[str] = set()
    rows: list[Row] = []
    dropped = 0
    for record in records:
        once = getattr(record, "once", None)
        if once is not None:
            key, epoch, seq = once[0], once[1], once[2]
            prev = once[3] if len(once) > 3 else None
            mark = marks.get(key)
            if mark is None:
                mark = ("", 0)
            if mark[0] == epoch and seq <= mark[1]:
                dropped += 1
                marks[key] = mark
                continue
            if prev is not None and mark[0] == epoch and prev > mark[1]:
                raise StoreError(f"{key}: message {seq} follows {prev}, which is not stored "
                                 f"(stored up to {mark[1]}): resend in order")
            marks[key] = (epoch, seq)
            changed.add(key)
        rows.append(ROW_OF(record))
    if not rows:
        return 0, rows, dropped
    last = insert(conn, rows)
    conn.executemany(
        "INSERT INTO log_dedupe(key, epoch, seq) VALUES (?, ?, ?)"
        " ON CONFLICT(key) DO UPDATE SET epoch = excluded.epoch, seq = excluded.seq",
        [(key, *marks[key]) for key in changed])
    return last, rows, dropped


def high_water(conn: sqlite3.Connection, key: str) -> tuple[str, int] | None:
    found = conn.execute("SELECT epoch, seq FROM log_dedupe WHERE key = ?", (key,)).fetchone()
    return (str(found[0]), int(found[1])) if found else None
