"""The C2D queues' schema and transaction bodies (run on the store's db thread; pure functions
of their arguments, so they may run twice). Used only by :class:`gateway.hub.c2d.C2DQueues`."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeAlias

from gateway.hub.c2dmodel import (
    DESCRIPTION,
    Ack,
    C2DMessage,
    Feedback,
    FeedbackStatus,
    LockLostError,
    QueueFullError,
)
from gateway.hub.messages import format_time
from gateway.store.db import Migration

MIGRATION: Final[Migration] = (
    "c2d",
    (
        """
        CREATE TABLE c2d_messages(
            seq INTEGER PRIMARY KEY,
            device_id TEXT NOT NULL,
            message_id TEXT NOT NULL,
            generation_id TEXT NOT NULL,
            body BLOB NOT NULL,
            props TEXT NOT NULL,
            ack TEXT NOT NULL,
            enqueued REAL NOT NULL,
            expiry REAL NOT NULL,
            delivery_count INTEGER NOT NULL DEFAULT 0,
            counts_next INTEGER NOT NULL DEFAULT 1,
            lock_token TEXT,
            locked_until REAL);
        CREATE INDEX c2d_messages_device ON c2d_messages(device_id, seq);
        CREATE INDEX c2d_messages_expiry ON c2d_messages(expiry);
        CREATE INDEX c2d_messages_lock ON c2d_messages(locked_until);
        CREATE TABLE c2d_feedback(
            seq INTEGER PRIMARY KEY,
            device_id TEXT NOT NULL,
            original_message_id TEXT NOT NULL,
            generation_id TEXT NOT NULL,
            status_code TEXT NOT NULL,
            description TEXT NOT NULL,
            enqueued_time_utc TEXT NOT NULL,
            expiry REAL NOT NULL,
            abandons INTEGER NOT NULL DEFAULT 0,
            lock_token TEXT,
            locked_until REAL);
        CREATE INDEX c2d_feedback_expiry ON c2d_feedback(expiry);
        CREATE INDEX c2d_feedback_lock ON c2d_feedback(lock_token);
        CREATE INDEX c2d_feedback_device ON c2d_feedback(device_id);
        """,
    ),
)


# -- transaction bodies (run on the db thread; pure functions of their arguments) -------------

_MESSAGE_COLUMNS: Final = (
    "seq, device_id, message_id, body, props, ack, enqueued, expiry, delivery_count,"
    " counts_next, lock_token, locked_until"
)
_DEAD_COLUMNS: Final = "seq, device_id, message_id, generation_id, ack"
_FEEDBACK_COLUMNS: Final = (
    "seq, original_message_id, device_id, generation_id, status_code, description,"
    " enqueued_time_utc"
)

_Dead: TypeAlias = tuple[int, str, str, str, str]
"""seq, device_id, message_id, generation_id, ack: what dead-lettering needs."""

ABANDONED: Final = "Abandoned"
"""The status of a settle event for an abandon that put the message back (not a feedback
status: the message stays queued)."""

Settled: TypeAlias = tuple[str, str, str]
"""A settle event: device id, message id, and the feedback status the message left the queue
with (:class:`FeedbackStatus`), or :data:`ABANDONED`."""


@dataclass(frozen=True, slots=True)
class After:
    """Absolute state after a transaction: queue lengths of the devices it touched and the
    earliest message expiry, message lock deadline and feedback expiry (None: nothing)."""

    counts: Mapping[str, int]
    message_due: float | None
    lock_due: float | None
    feedback_due: float | None
    settled: tuple[Settled, ...] = ()  # what the transaction settled, in order


def _events(rows: Iterable[_Dead], status: str) -> list[Settled]:
    return [(row[1], row[2], str(status)) for row in rows]


@dataclass(frozen=True, slots=True)
class Outcome:
    """Where dead-lettered messages' feedback goes: its creation time and expiry."""

    now: float
    feedback_expiry: float


def _after(conn: sqlite3.Connection, devices: Iterable[str],
           settled: Sequence[Settled] = ()) -> After:
    counts = {
        device: int(
            conn.execute(
                "SELECT count(*) FROM c2d_messages WHERE device_id = ?", (device,)
            ).fetchone()[0]
        )
        for device in set(devices)
    }
    message_due, lock_due, feedback_due = conn.execute(
        "SELECT (SELECT min(expiry) FROM c2d_messages),"
        " (SELECT min(locked_until) FROM c2d_messages),"
        " (SELECT min(expiry) FROM c2d_feedback)"
    ).fetchone()
    return After(counts, message_due, lock_due, feedback_due, tuple(settled))


def _wants(ack: str, status: FeedbackStatus) -> bool:
    """Does ``iothub-ack`` ``ack`` ask for feedback with ``status`` (ref §3.3)?"""
    if ack == Ack.FULL:
        return True
    if status is FeedbackStatus.SUCCESS:
        return ack == Ack.POSITIVE
    return ack == Ack.NEGATIVE


def _remove(
    conn: sqlite3.Connection, rows: Sequence[_Dead], status: FeedbackStatus, outcome: Outcome
) -> None:
    """Delete ``rows`` and write the feedback their ``iothub-ack`` asks for, together."""
    if not rows:
        return
    conn.executemany("DELETE FROM c2d_messages WHERE seq = ?", [(row[0],) for row in rows])
    when = format_time(outcome.now)
    conn.executemany(
        "INSERT INTO c2d_feedback(device_id, original_message_id, generation_id, status_code,"
        " description, enqueued_time_utc, expiry) VALUES (?, ?, ?, ?, ?, ?, ?)",
        [
            (device, message_id, generation, status.value, DESCRIPTION[status], when,
             outcome.feedback_expiry)
            for _, device, message_id, generation, ack in rows
            if _wants(ack, status)
        ],
    )


def _expire_messages(
    conn: sqlite3.Connection, outcome: Outcome, device_id: str | None, limit: int = -1
) -> list[Settled]:
    """Dead-letter messages whose expiry passed (feedback Expired), of one device or (at
    most ``limit``, earliest first) of all; return their settle events."""
    if device_id is None:
        rows = conn.execute(
            f"SELECT {_DEAD_COLUMNS} FROM c2d_messages WHERE expiry <= ? ORDER BY expiry LIMIT ?",
            (outcome.now, limit),
        ).fetchall()
    else:
        rows = conn.execute(
            f"SELECT {_DEAD_COLUMNS} FROM c2d_messages WHERE device_id = ? AND expiry <= ?",
            (device_id, outcome.now),
        ).fetchall()
    _remove(conn, rows, FeedbackStatus.EXPIRED, outcome)
    return _events(rows, FeedbackStatus.EXPIRED)


def recover_body(conn: sqlite3.Connection) -> tuple[dict[str, int], After]:
    """At open: every connection died with the previous process, so every lock is released
    (tokens are kept, so a late completion still counts); load the queue lengths."""
    conn.execute("UPDATE c2d_messages SET locked_until = NULL WHERE locked_until IS NOT NULL")
    counts = dict(
        conn.execute("SELECT device_id, count(*) FROM c2d_messages GROUP BY device_id").fetchall()
    )
    return counts, _after(conn, ())


def send_body(
    conn: sqlite3.Connection,
    *,
    row: tuple[Any, ...],
    max_pending: int,
    outcome: Outcome,
) -> After:
    device_id = row[0]
    expired = _expire_messages(conn, outcome, device_id)
    pending = conn.execute(
        "SELECT count(*) FROM c2d_messages WHERE device_id = ?", (device_id,)
    ).fetchone()[0]
    if pending >= max_pending:
        raise QueueFullError(
            f"the queue of device {device_id!r} already holds {pending} messages"
            f" (at most {max_pending})"
        )
    conn.execute(
        "INSERT INTO c2d_messages(device_id, message_id, generation_id, body, props, ack,"
        " enqueued, expiry) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        row,
    )
    return _after(conn, (device_id,), expired)


def _message_of(
    row: Sequence[Any], *, delivery_count: int, lock_token: str | None, locked_until: float | None
) -> C2DMessage:
    props = json.loads(row[4])
    return C2DMessage(
        message_id=row[2],
        device_id=row[1],
        body=row[3],
        system=props["system"],
        application=props["application"],
        enqueued=row[6],
        expiry=row[7],
        delivery_count=delivery_count,
        ack=row[5],
        lock_token=lock_token,
        locked_until=locked_until,
    )


def deliver_body(
    conn: sqlite3.Connection,
    *,
    device_id: str,
    tokens: Sequence[str],
    locked_until: float,
    max_delivery_count: int,
    outcome: Outcome,
) -> tuple[list[C2DMessage], After]:
    """Lock up to ``len(tokens)`` deliverable messages of the device, oldest first."""
    settled = _expire_messages(conn, outcome, device_id)
    rows = conn.execute(
        f"SELECT {_MESSAGE_COLUMNS}, generation_id FROM c2d_messages"
        " WHERE device_id = ? AND (locked_until IS NULL OR locked_until <= ?) ORDER BY seq",
        (device_id, outcome.now),
    ).fetchall()
    out: list[C2DMessage] = []
    exceeded: list[_Dead] = []
    for row in rows:
        if len(out) == len(tokens):
            break
        count = row[8] + row[9]
        if count > max_delivery_count:
            exceeded.append((row[0], row[1], row[2], row[12], row[5]))
            continue
        token = tokens[len(out)]
        conn.execute(
            "UPDATE c2d_messages SET delivery_count = ?, counts_next = 0, lock_token = ?,"
            " locked_until = ? WHERE seq = ?",
            (count, token, locked_until, row[0]),
        )
        out.append(
            _message_of(row, delivery_count=count, lock_token=token, locked_until=locked_until)
        )
    _remove(conn, exceeded, FeedbackStatus.DELIVERY_COUNT_EXCEEDED, outcome)
    settled += _events(exceeded, FeedbackStatus.DELIVERY_COUNT_EXCEEDED)
    return out, _after(conn, (device_id,), settled)


def _locked_row(conn: sqlite3.Connection, device_id: str, lock_token: str) -> _Dead:
    row = conn.execute(
        f"SELECT {_DEAD_COLUMNS} FROM c2d_messages WHERE device_id = ? AND lock_token = ?",
        (device_id, lock_token),
    ).fetchone()
    if row is None:
        raise LockLostError(f"no message of device {device_id!r} holds lock {lock_token!r}")
    return (row[0], row[1], row[2], row[3], row[4])


def settle_body(
    conn: sqlite3.Connection, *, device_id: str, lock_token: str, status: FeedbackStatus,
    outcome: Outcome,
) -> After:
    """Complete (``SUCCESS``) or reject (``REJECTED``) the message holding the lock."""
    row = _locked_row(conn, device_id, lock_token)
    _remove(conn, [row], status, outcome)
    return _after(conn, (device_id,), _events([row], status))


def abandon_body(
    conn: sqlite3.Connection,
    *,
    device_id: str,
    lock_token: str,
    max_delivery_count: int,
    outcome: Outcome,
) -> After:
    row = _locked_row(conn, device_id, lock_token)
    count = conn.execute(
        "SELECT delivery_count FROM c2d_messages WHERE seq = ?", (row[0],)
    ).fetchone()[0]
    if count >= max_delivery_count:
        _remove(conn, [row], FeedbackStatus.DELIVERY_COUNT_EXCEEDED, outcome)
        status: str = FeedbackStatus.DELIVERY_COUNT_EXCEEDED
    else:
        conn.execute(
            "UPDATE c2d_messages SET counts_next = 1, lock_token = NULL, locked_until = NULL"
            " WHERE seq = ?",
            (row[0],),
        )
        status = ABANDONED
    return _after(conn, (device_id,), _events([row], status))


def release_body(conn: sqlite3.Connection, *, device_id: str,
                 lock_tokens: Sequence[str] | None) -> tuple[int, After]:
    sql = ("UPDATE c2d_messages SET locked_until = NULL"
           " WHERE device_id = ? AND locked_until IS NOT NULL")
    if lock_tokens is None:
        released = conn.execute(sql, (device_id,)).rowcount
    else:
        released = sum(conn.execute(sql + " AND lock_token = ?", (device_id, token)).rowcount
                       for token in lock_tokens)
    return released, _after(conn, (device_id,))


def purge_body(
    conn: sqlite3.Connection, *, device_id: str, outcome: Outcome
) -> tuple[int, After]:
    rows = conn.execute(
        f"SELECT {_DEAD_COLUMNS} FROM c2d_messages WHERE device_id = ?", (device_id,)
    ).fetchall()
    _remove(conn, rows, FeedbackStatus.PURGED, outcome)
    return len(rows), _after(conn, (device_id,), _events(rows, FeedbackStatus.PURGED))


def drop_body(conn: sqlite3.Connection, *, device_id: str) -> tuple[int, After]:
    dropped = conn.execute("DELETE FROM c2d_messages WHERE device_id = ?", (device_id,)).rowcount
    conn.execute("DELETE FROM c2d_feedback WHERE device_id = ?", (device_id,))
    return dropped, _after(conn, (device_id,))


def sweep_body(
    conn: sqlite3.Connection, *, outcome: Outcome, limit: int
) -> tuple[int, bool, After]:
    """One chunk of the sweep: dead-letter expired messages, end lapsed locks, delete
    expired feedback, at most ``limit`` rows of each; also says whether any hit the limit."""
    expired = _expire_messages(conn, outcome, None, limit)
    unlocked = conn.execute(
        "UPDATE c2d_messages SET locked_until = NULL WHERE seq IN (SELECT seq FROM c2d_messages"
        " WHERE locked_until <= ? LIMIT ?)",
        (outcome.now, limit),
    ).rowcount
    dropped = conn.execute(
        "DELETE FROM c2d_feedback WHERE seq IN (SELECT seq FROM c2d_feedback"
        " WHERE expiry <= ? LIMIT ?)",
        (outcome.now, limit),
    ).rowcount
    more = limit in (len(expired), unlocked, dropped)
    return len(expired), more, _after(conn, [device for device, _, _ in expired], expired)


def feedback_batch_body(
    conn: sqlite3.Connection, *, now: float, token: str, locked_until: float, limit: int
) -> tuple[list[Feedback], After]:
    rows = conn.execute(
        f"SELECT {_FEEDBACK_COLUMNS} FROM c2d_feedback"
        " WHERE expiry > ? AND (locked_until IS NULL OR locked_until <= ?) ORDER BY seq LIMIT ?",
        (now, now, limit),
    ).fetchall()
    conn.executemany(
        "UPDATE c2d_feedback SET lock_token = ?, locked_until = ? WHERE seq = ?",
        [(token, locked_until, row[0]) for row in rows],
    )
    records = [Feedback(*row[1:]) for row in rows]
    return records, _after(conn, ())


def complete_feedback_body(conn: sqlite3.Connection, *, token: str) -> After:
    if conn.execute("DELETE FROM c2d_feedback WHERE lock_token = ?", (token,)).rowcount == 0:
        raise LockLostError(f"no feedback batch holds lock {token!r}")
    return _after(conn, ())


def abandon_feedback_body(
    conn: sqlite3.Connection, *, token: str, max_delivery_count: int
) -> After:
    changed = conn.execute(
        "UPDATE c2d_feedback SET abandons = abandons + 1, lock_token = NULL, locked_until = NULL"
        " WHERE lock_token = ?",
        (token,),
    ).rowcount
    if changed == 0:
        raise LockLostError(f"no feedback batch holds lock {token!r}")
    conn.execute("DELETE FROM c2d_feedback WHERE abandons >= ?", (max_delivery_count,))
    return _after(conn, ())


# -- the service's view of a send ----------------------------------------------------------------

