"""Exactly-once appends for messages a child gateway forwards (on-behalf-of).

Each such record carries ``once = (key, epoch, seq)``: ``key`` names (gateway, origin), ``epoch``
the child's store incarnation, ``seq`` the child's log sequence (increasing per origin). The
high-water mark per key lives in ``log_dedupe`` and is read and moved **in the same transaction
body** that inserts the records (the log's group-commit body, :func:`filter_once`), so a commit
either stores a message and raises the mark, or does neither: after a SIGKILL of either side the child resends what it has no PUBACK for, and
whatever is at or below the mark is dropped (federation.md §0.1 fact 3: by sequence, never by a
time window). A new epoch (the child's store was recreated) starts the key afresh.

The gap check: a record may also carry ``prev``, the sequence of the message the child sent
before it in the same queue. If that one is above the mark, it never got here (its commit
failed while this later one's did not, or it is still in flight on a connection that died):
storing this one would raise the mark past it, and its resend would then be dropped as a
duplicate. So that append (one read of the child's connection, or one pack) is refused whole
(:class:`~gateway.errors.StoreError`: no PUBACK, the child resends both in order); the other
appends of the same group commit are not affected. ``prev`` at or below the mark, or None,
passes.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Final, TypeAlias

from gateway.errors import StoreError
from gateway.store._log_sql import Row
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


Once: TypeAlias = tuple[str, str, int, int | None]
"""A record's stamp: (key, epoch, seq, prev)."""

Group: TypeAlias = tuple[int, Sequence[Once | None] | None]
"""One append's share of a group commit's rows: how many, and their stamps (None: a plain
append, every row is stored)."""

Outcome: TypeAlias = tuple[int, int, int, StoreError | None]
"""What became of one group: rows stored, their bytes (body + props), duplicates dropped,
and the error refusing the whole group (the gap check), if any."""


def filter_once(conn: sqlite3.Connection, rows: Sequence[Row],
                groups: Sequence[Group]) -> tuple[list[Row], list[Outcome]]:
    """The rows of one group commit to insert, with the stamped ones at or below their key's
    high-water mark left out, and the marks raised for the rest (in this transaction, so
    they commit with the rows or not at all). ``groups`` splits ``rows`` by append, in
    order; a group the gap check refuses stores nothing and moves no mark, and the groups
    after it see the marks as they were. One query per 500 keys reads the marks."""
    marks: dict[str, tuple[str, int]] = {}
    keys = list({o[0] for _, onces in groups if onces is not None
                 for o in onces if o is not None})
    for start in range(0, len(keys), 500):  # SQLite's variable limit
        chunk = keys[start:start + 500]
        for key, epoch, seq in conn.execute(
                "SELECT key, epoch, seq FROM log_dedupe WHERE key IN "
                f"({','.join('?' * len(chunk))})", chunk):
            marks[str(key)] = (str(epoch), int(seq))
    kept: list[Row] = []
    outcomes: list[Outcome] = []
    changed: set[str] = set()
    pos = 0
    for count, onces in groups:
        part = rows[pos:pos + count]
        pos += count
        if onces is None:
            kept += part
            outcomes.append((count, sum([len(r[4]) + len(r[5]) for r in part]), 0, None))
            continue
        raised: dict[str, tuple[str, int]] = {}  # this group's marks, applied if it passes
        keep: list[Row] = []
        dropped = 0
        error: StoreError | None = None
        for row, once in zip(part, onces):
            if once is None:
                keep.append(row)
                continue
            key, epoch, seq, prev = once
            mark = raised.get(key) or marks.get(key) or ("", 0)
            if mark[0] == epoch and seq <= mark[1]:
                dropped += 1
                continue
            if prev is not None and mark[0] == epoch and prev > mark[1]:
                error = StoreError(f"{key}: message {seq} follows {prev}, which is not stored "
                                   f"(stored up to {mark[1]}): resend in order")
                break
            raised[key] = (epoch, seq)
            keep.append(row)
        if error is not None:
            outcomes.append((0, 0, 0, error))
            continue
        marks.update(raised)
        changed.update(raised)
        kept += keep
        outcomes.append((len(keep), sum([len(r[4]) + len(r[5]) for r in keep]), dropped, None))
    if changed:
        conn.executemany(
            "INSERT INTO log_dedupe(key, epoch, seq) VALUES (?, ?, ?)"
            " ON CONFLICT(key) DO UPDATE SET epoch = excluded.epoch, seq = excluded.seq",
            [(key, *marks[key]) for key in changed])
    return kept, outcomes


def high_water(conn: sqlite3.Connection, key: str) -> tuple[str, int] | None:
    found = conn.execute("SELECT epoch, seq FROM log_dedupe WHERE key = ?", (key,)).fetchone()
    return (str(found[0]), int(found[1])) if found else None
