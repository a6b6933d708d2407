"""Cloud-to-device message queues with feedback (IoT Hub ref §3).

One durable queue per device (ref §3.2): at most ``max_pending`` (50) messages, each at most
``max_bytes`` (64 KB), living until its expiry (default TTL 1 h, at most 48 h). The lead's
shells drive it: MQTT delivery (PUBLISH on ``devices/{id}/messages/devicebound/{bag}``,
PUBACK completes, ref §3.1), the device HTTP API (receive, complete, abandon, reject) and the
service API (send, purge, feedback, ref §3.3).

Message states (ref §3.2)::

    send -> Enqueued --deliver--> Invisible (locked until now + lock_seconds)
    Invisible --complete--> Completed    (row deleted; feedback Success)
    Invisible --reject----> Dead-lettered (row deleted; feedback Rejected)
    Invisible --abandon---> Enqueued, the next delivery counts (or Dead-lettered,
                            DeliveryCountExceeded, if this was the max_delivery_count-th)
    Invisible --lock lapses / release() / hub restart--> Enqueued, the next delivery does not count
    Enqueued|Invisible --expiry--> Dead-lettered (feedback Expired)
    Enqueued|Invisible --purge--> Dead-lettered (feedback Purged)

What ``delivery_count`` counts. IoT Hub counts a delivery only when it is the first one or
follows an explicit *abandon*; a redelivery after the lock lapsed (no PUBACK within the lock
period, a dropped connection, a hub restart) is not counted (ref §3.2; today's "Understand
cloud-to-device messaging" page says the same). So ``delivery_count`` is ``1 + abandons`` once
the message was delivered, 0 before. :meth:`C2DQueues.next_for_delivery` increments it before
it returns the message when that delivery counts. The abandon that ends the
``max_delivery_count``-th counted delivery dead-letters the message (DeliveryCountExceeded);
a delivery that would exceed the maximum (possible only after the maximum was lowered)
dead-letters it instead of delivering it. Over MQTT, which cannot abandon, messages therefore
leave the queue only by PUBACK or expiry, as on IoT Hub.

Lock tokens. Each delivery gets a fresh token. A token stays good for complete, abandon and
reject until the message is delivered again (a new token) or leaves the queue; the lock
period only decides when the message may be delivered again. So a PUBACK that arrives after
the lock period still completes the message unless it was redelivered meanwhile, and a
completed message is never delivered again.

Feedback (ref §3.3) is written in the same transaction that removes the message, when its
``iothub-ack`` asks for it (positive: Success; negative: Expired, DeliveryCountExceeded,
Rejected, Purged; full: all). It lives ``feedback_ttl`` seconds and is read in locked batches
with the same abandon rule. Removing a device (:meth:`C2DQueues.drop_device`) drops its queue
and its pending feedback without writing any ("Feedback for a deleted device is dropped").

Durability: every method that changes state returns only after the transaction holding the
change committed (:meth:`gateway.store.db.Database.run`). Transaction bodies are pure
functions of their arguments (tokens, ids and ``now`` are made before they are submitted), so
they may run twice; in-memory state (per-device counts, the next wake-up) is set from the
absolute values a body returns, after the commit.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from functools import partial
from typing import Any, Final, TypeAlias

from gateway.errors import InvalidRequestError, MessageTooLargeError, NotFoundError
from gateway.hub.addresses import c2d_topic
from gateway.hub.messages import SYSTEM_TO_WIRE, format_time, message_size
from gateway.hub.propbag import encode_bag
from gateway.store.db import Database, Migration

__all__ = [
    "MIGRATION",
    "Ack",
    "C2DMessage",
    "C2DMessageTooLargeError",
    "C2DQueues",
    "Feedback",
    "FeedbackStatus",
    "LockLostError",
    "QueueFullError",
]

log = logging.getLogger(__name__)


class QueueFullError(InvalidRequestError):
    """The device queue already holds ``max_pending`` messages (ref §3.2: 403002)."""

    status = 403
    code = "DeviceMaximumQueueDepthExceeded"


class C2DMessageTooLargeError(MessageTooLargeError):
    """A C2D message is over 64 KB (IoT Hub answers 413, error ``MessageTooLarge``)."""

    status = 413
    code = "MessageTooLarge"


class LockLostError(NotFoundError):
    """The lock token is unknown: never issued, already settled, or replaced by a later
    delivery. IoT Hub's device HTTP API answers 412 ``DeviceMessageLockLost``."""

    status = 412
    code = "DeviceMessageLockLost"


class Ack(StrEnum):
    """``iothub-ack``: which outcomes produce feedback (ref §3.3)."""

    NONE = "none"
    POSITIVE = "positive"
    NEGATIVE = "negative"
    FULL = "full"


class FeedbackStatus(StrEnum):
    """``statusCode`` of a feedback record (ref §3.3)."""

    SUCCESS = "Success"
    EXPIRED = "Expired"
    DELIVERY_COUNT_EXCEEDED = "DeliveryCountExceeded"
    REJECTED = "Rejected"
    PURGED = "Purged"


# Only "Success" -> "Success" is documented (ref §3.3); the other texts are ours.
_DESCRIPTION: Final[Mapping[str, str]] = {
    FeedbackStatus.SUCCESS: "Success",
    FeedbackStatus.EXPIRED: "Message expired",
    FeedbackStatus.DELIVERY_COUNT_EXCEEDED: "Delivery count exceeded",
    FeedbackStatus.REJECTED: "Message rejected",
    FeedbackStatus.PURGED: "Message purged",
}

# Bag order of the system properties written to the device (ref §3.1); iothub-ack follows.
_BAG_ORDER: Final = (
    "message-id",
    "to",
    "correlation-id",
    "user-id",
    "content-type",
    "content-encoding",
    "absolute-expiry-time",
)

# Service-side property names (ref §9.4) -> system property names (gateway.hub.messages).
_SERVICE_SYSTEM: Final[Mapping[str, str]] = {
    "messageId": "message-id",
    "correlationId": "correlation-id",
    "userId": "user-id",
    "contentType": "content-type",
    "contentEncoding": "content-encoding",
}
_ACK_KEYS: Final = ("ack", "iothub-ack")
_ACK_VALUES: Final = frozenset(ack.value for ack in Ack)
MAX_MESSAGE_ID: Final = 128
SWEEP_CHUNK: Final = 1000  # rows per sweep transaction (about 6 ms of the writer thread)


def _to(device_id: str) -> str:
    return f"/devices/{device_id}/messages/devicebound"


@dataclass(frozen=True, slots=True)
class C2DMessage:
    """One queued cloud-to-device message (ref §3.1, §3.2).

    ``system`` uses the names of :mod:`gateway.hub.messages` (``message-id``, ``to``,
    ``correlation-id``, ``user-id``, ``content-type``, ``content-encoding``, and
    ``absolute-expiry-time`` only when the sender set an expiry). Times are clock seconds.
    ``lock_token``/``locked_until`` are those of the latest delivery (None before the
    first). Treat the mappings as read-only."""

    message_id: str
    device_id: str
    body: bytes
    system: Mapping[str, str]
    application: Mapping[str, str | None]
    enqueued: float
    expiry: float
    delivery_count: int
    ack: str
    lock_token: str | None
    locked_until: float | None

    def topic_bag(self) -> str:
        """The property bag the SDKs parse (ref §3.1): ``%24.mid``, ``%24.to``, ``%24.cid``,
        ``%24.uid``, ``%24.ct``, ``%24.ce``, ``%24.exp``, ``iothub-ack``, then application
        properties, all percent-encoded (so the bag is one topic level)."""
        pairs: list[tuple[str, str | None]] = [
            (SYSTEM_TO_WIRE[name], self.system[name]) for name in _BAG_ORDER if name in self.system
        ]
        pairs.append(("iothub-ack", self.ack))
        pairs.extend(self.application.items())
        return encode_bag(pairs)

    def topic(self) -> str:
        """``devices/{id}/messages/devicebound/{bag}`` (ref §3.1)."""
        return c2d_topic(self.device_id, self.topic_bag())


@dataclass(frozen=True, slots=True)
class Feedback:
    """One feedback record (ref §3.3); :meth:`to_json` gives the wire shape."""

    original_message_id: str
    device_id: str
    device_generation_id: str
    status_code: str
    description: str
    enqueued_time_utc: str

    def to_json(self) -> dict[str, str]:
        return {
            "originalMessageId": self.original_message_id,
            "enqueuedTimeUtc": self.enqueued_time_utc,
            "statusCode": self.status_code,
            "description": self.description,
            "deviceId": self.device_id,
            "deviceGenerationId": self.device_generation_id,
        }


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


@dataclass(frozen=True, slots=True)
class _After:
    """Absolute state after a transaction: queue lengths of the devices it touched and the
    earliest message expiry, message lock deadline and feedback expiry (None: nothing)."""

    counts: Mapping[str, int]
    message_due: float | None
    lock_due: float | None
    feedback_due: float | None


@dataclass(frozen=True, slots=True)
class _Outcome:
    """Where dead-lettered messages' feedback goes: its creation time and expiry."""

    now: float
    feedback_expiry: float


def _after(conn: sqlite3.Connection, devices: Iterable[str]) -> _After:
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
    return _After(counts, message_due, lock_due, feedback_due)


def _wants(ack: str, status: FeedbackStatus) -> bool:
    """Does ``iothub-ack`` ``ack`` ask for feedback with ``status`` (ref §3.3)?"""
    if ack == Ack.FULL:
        return True
    if status is FeedbackStatus.SUCCESS:
        return ack == Ack.POSITIVE
    return ack == Ack.NEGATIVE


def _remove(
    conn: sqlite3.Connection, rows: Sequence[_Dead], status: FeedbackStatus, outcome: _Outcome
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
            (device, message_id, generation, status.value, _DESCRIPTION[status], when,
             outcome.feedback_expiry)
            for _, device, message_id, generation, ack in rows
            if _wants(ack, status)
        ],
    )


def _expire_messages(
    conn: sqlite3.Connection, outcome: _Outcome, device_id: str | None, limit: int = -1
) -> list[str]:
    """Dead-letter messages whose expiry passed (feedback Expired), of one device or (at
    most ``limit``, earliest first) of all; return their device ids."""
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
    return [row[1] for row in rows]


def _recover_body(conn: sqlite3.Connection) -> tuple[dict[str, int], _After]:
    """At open: every connection died with the previous process, so every lock is released
    (tokens are kept, so a late completion still counts); load the queue lengths."""
    conn.execute("UPDATE c2d_messages SET locked_until = NULL WHERE locked_until IS NOT NULL")
    counts = dict(
        conn.execute("SELECT device_id, count(*) FROM c2d_messages GROUP BY device_id").fetchall()
    )
    return counts, _after(conn, ())


def _send_body(
    conn: sqlite3.Connection,
    *,
    row: tuple[Any, ...],
    max_pending: int,
    outcome: _Outcome,
) -> _After:
    device_id = row[0]
    _expire_messages(conn, outcome, device_id)
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
    return _after(conn, (device_id,))


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


def _deliver_body(
    conn: sqlite3.Connection,
    *,
    device_id: str,
    tokens: Sequence[str],
    locked_until: float,
    max_delivery_count: int,
    outcome: _Outcome,
) -> tuple[list[C2DMessage], _After]:
    """Lock up to ``len(tokens)`` deliverable messages of the device, oldest first."""
    _expire_messages(conn, outcome, device_id)
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
    return out, _after(conn, (device_id,))


def _locked_row(conn: sqlite3.Connection, device_id: str, lock_token: str) -> _Dead:
    row = conn.execute(
        f"SELECT {_DEAD_COLUMNS} FROM c2d_messages WHERE device_id = ? AND lock_token = ?",
        (device_id, lock_token),
    ).fetchone()
    if row is None:
        raise LockLostError(f"no message of device {device_id!r} holds lock {lock_token!r}")
    return (row[0], row[1], row[2], row[3], row[4])


def _settle_body(
    conn: sqlite3.Connection, *, device_id: str, lock_token: str, status: FeedbackStatus,
    outcome: _Outcome,
) -> _After:
    """Complete (``SUCCESS``) or reject (``REJECTED``) the message holding the lock."""
    row = _locked_row(conn, device_id, lock_token)
    _remove(conn, [row], status, outcome)
    return _after(conn, (device_id,))


def _abandon_body(
    conn: sqlite3.Connection,
    *,
    device_id: str,
    lock_token: str,
    max_delivery_count: int,
    outcome: _Outcome,
) -> _After:
    row = _locked_row(conn, device_id, lock_token)
    count = conn.execute(
        "SELECT delivery_count FROM c2d_messages WHERE seq = ?", (row[0],)
    ).fetchone()[0]
    if count >= max_delivery_count:
        _remove(conn, [row], FeedbackStatus.DELIVERY_COUNT_EXCEEDED, outcome)
    else:
        conn.execute(
            "UPDATE c2d_messages SET counts_next = 1, lock_token = NULL, locked_until = NULL"
            " WHERE seq = ?",
            (row[0],),
        )
    return _after(conn, (device_id,))


def _release_body(conn: sqlite3.Connection, *, device_id: str) -> tuple[int, _After]:
    released = conn.execute(
        "UPDATE c2d_messages SET locked_until = NULL"
        " WHERE device_id = ? AND locked_until IS NOT NULL",
        (device_id,),
    ).rowcount
    return released, _after(conn, (device_id,))


def _purge_body(
    conn: sqlite3.Connection, *, device_id: str, outcome: _Outcome
) -> tuple[int, _After]:
    rows = conn.execute(
        f"SELECT {_DEAD_COLUMNS} FROM c2d_messages WHERE device_id = ?", (device_id,)
    ).fetchall()
    _remove(conn, rows, FeedbackStatus.PURGED, outcome)
    return len(rows), _after(conn, (device_id,))


def _drop_body(conn: sqlite3.Connection, *, device_id: str) -> tuple[int, _After]:
    dropped = conn.execute("DELETE FROM c2d_messages WHERE device_id = ?", (device_id,)).rowcount
    conn.execute("DELETE FROM c2d_feedback WHERE device_id = ?", (device_id,))
    return dropped, _after(conn, (device_id,))


def _sweep_body(
    conn: sqlite3.Connection, *, outcome: _Outcome, limit: int
) -> tuple[int, bool, _After]:
    """One chunk of the sweep: dead-letter expired messages, end lapsed locks, delete
    expired feedback, at most ``limit`` rows of each; also says whether any hit the limit."""
    devices = _expire_messages(conn, outcome, None, limit)
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
    more = limit in (len(devices), unlocked, dropped)
    return len(devices), more, _after(conn, devices)


def _feedback_batch_body(
    conn: sqlite3.Connection, *, now: float, token: str, locked_until: float, limit: int
) -> tuple[list[Feedback], _After]:
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


def _complete_feedback_body(conn: sqlite3.Connection, *, token: str) -> _After:
    if conn.execute("DELETE FROM c2d_feedback WHERE lock_token = ?", (token,)).rowcount == 0:
        raise LockLostError(f"no feedback batch holds lock {token!r}")
    return _after(conn, ())


def _abandon_feedback_body(
    conn: sqlite3.Connection, *, token: str, max_delivery_count: int
) -> _After:
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


def _parse_expiry(text: str) -> float:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidRequestError(f"expiryTimeUtc is not an ISO 8601 time: {text!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


@dataclass(frozen=True, slots=True)
class _Parsed:
    message_id: str
    system: dict[str, str]
    application: dict[str, str | None]
    ack: str
    expiry: float


def _parse_send(
    device_id: str,
    body: bytes,
    properties: Mapping[str, object],
    *,
    now: float,
    default_ttl: float,
    max_ttl: float,
    max_bytes: int,
) -> _Parsed:
    """Validate a send as the service gives it (ref §3.2, §9.4); pure."""
    sent: dict[str, str] = {}  # every system value the sender gave, by its name here
    application: dict[str, str | None] = {}
    for key, value in properties.items():
        if not isinstance(key, str) or not key:
            raise InvalidRequestError(f"property names must be non-empty strings: {key!r}")
        if key in _SERVICE_SYSTEM or key in _ACK_KEYS or key == "expiryTimeUtc":
            if value is None:
                continue
            if not isinstance(value, str):
                raise InvalidRequestError(f"{key} must be a string, not {type(value).__name__}")
            if key in _ACK_KEYS and value not in _ACK_VALUES:
                raise InvalidRequestError(
                    f"{key} must be one of none, positive, negative, full: {value!r}"
                )
            sent[_SERVICE_SYSTEM.get(key, key)] = value
        elif key == "to":
            continue  # the hub sets it (ref §3.1)
        elif key.startswith("$."):
            raise InvalidRequestError(f"application property {key!r} would read as a system key")
        elif value is not None and not isinstance(value, str):
            raise InvalidRequestError(
                f"application property {key!r} must be a string, not {type(value).__name__}"
            )
        else:
            application[key] = value
    size = message_size(body, sent, application)
    if size > max_bytes:
        raise C2DMessageTooLargeError(
            f"C2D message for {device_id!r} is {size} bytes, over the limit of {max_bytes}"
        )
    wire_ack, plain_ack = sent.pop("iothub-ack", None), sent.pop("ack", None)
    ack: str = wire_ack or plain_ack or Ack.NONE
    expiry_text = sent.pop("expiryTimeUtc", None)
    message_id = sent.pop("message-id", None) or str(uuid.uuid4())
    if len(message_id) > MAX_MESSAGE_ID or not message_id.isascii():
        raise InvalidRequestError(f"messageId must be at most {MAX_MESSAGE_ID} ASCII characters")
    system = {"message-id": message_id, "to": _to(device_id), **sent}
    if expiry_text is None:
        expiry = now + default_ttl
    else:
        expiry = _parse_expiry(expiry_text)
        if expiry <= now:
            raise InvalidRequestError(f"expiryTimeUtc {expiry_text!r} is in the past")
        if expiry - now > max_ttl:
            raise InvalidRequestError(
                f"expiryTimeUtc {expiry_text!r} is more than {max_ttl:g} s away"
            )
        system["absolute-expiry-time"] = format_time(expiry)
    return _Parsed(message_id, system, application, ack, expiry)


def _min(*values: float | None) -> float | None:
    present = [value for value in values if value is not None]
    return min(present) if present else None


class C2DQueues:
    """Durable per-device C2D queues and the feedback queue (ref §3). See the module doc.

    All methods must run on the event loop that opened ``db``; ``clock`` gives wall-clock
    seconds (the same clock for expiry, locks and feedback times)."""

    def __init__(
        self,
        db: Database,
        *,
        max_pending: int = 50,
        default_ttl: float = 3600,
        max_ttl: float = 172800,
        max_bytes: int = 65536,
        lock_seconds: float = 60,
        max_delivery_count: int = 10,
        feedback_ttl: float = 3600,
        feedback_lock_seconds: float = 60,
        feedback_max_delivery_count: int = 10,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_pending < 1 or max_bytes < 1:
            raise ValueError("max_pending and max_bytes must be positive")
        if not 0 < default_ttl <= max_ttl:
            raise ValueError("need 0 < default_ttl <= max_ttl")
        if lock_seconds <= 0 or feedback_lock_seconds <= 0 or feedback_ttl <= 0:
            raise ValueError("lock periods and feedback_ttl must be positive")
        if max_delivery_count < 1 or feedback_max_delivery_count < 1:
            raise ValueError("delivery counts must be at least 1")
        self._db = db
        self.max_pending = max_pending
        self.default_ttl = default_ttl
        self.max_ttl = max_ttl
        self.max_bytes = max_bytes
        self.lock_seconds = lock_seconds
        self.max_delivery_count = max_delivery_count
        self.feedback_ttl = feedback_ttl
        self.feedback_lock_seconds = feedback_lock_seconds
        self.feedback_max_delivery_count = feedback_max_delivery_count
        self._clock = clock
        self._counts: dict[str, int] = {}
        self._message_due: float | None = None
        self._lock_due: float | None = None
        self._feedback_due: float | None = None

    # -- state kept in memory ------------------------------------------------------------------

    def _apply(self, after: _After) -> None:
        for device, count in after.counts.items():
            if count:
                self._counts[device] = count
            else:
                self._counts.pop(device, None)
        self._message_due = after.message_due
        self._lock_due = after.lock_due
        self._feedback_due = after.feedback_due

    def _outcome(self, now: float) -> _Outcome:
        return _Outcome(now, now + self.feedback_ttl)

    def pending(self, device_id: str) -> int:
        """Messages in the device's queue, locked or not (those that expired since the last
        sweep included): the ``cloudToDeviceMessageCount`` of the device."""
        return self._counts.get(device_id, 0)

    def next_wakeup(self) -> float | None:
        """The earliest clock time at which a message expires, a message lock lapses or a
        feedback record expires; None when nothing is due. Call :meth:`expire` then (a time
        already past means now); it moves this forward."""
        return _min(self._message_due, self._lock_due, self._feedback_due)

    # -- lifecycle ------------------------------------------------------------------------------

    async def open(self) -> None:
        """Migrate the tables, release every lock (all connections ended with the previous
        process; the delivery counts stay), load the queue lengths."""
        await self._db.migrate(MIGRATION)
        counts, after = await self._db.run(_recover_body)
        self._counts = counts
        self._apply(after)

    # -- service side -----------------------------------------------------------------------------

    async def send(
        self,
        device_id: str,
        body: bytes,
        *,
        properties: Mapping[str, object],
        generation_id: str,
    ) -> C2DMessage:
        """Enqueue a message (ref §3.2, §9.4). ``properties`` as the service sends them:
        ``messageId`` (a uuid4 when absent), ``correlationId``, ``userId``, ``contentType``,
        ``contentEncoding``, ``expiryTimeUtc`` (ISO 8601; naive means UTC), ``ack`` or
        ``iothub-ack``; any other key is an application property (``to`` is ignored).

        Size counts the body, the sender's system property values and the application names
        and values (ref §2.4). Raises :class:`QueueFullError` (the 51st pending message),
        :class:`C2DMessageTooLargeError`, or :class:`InvalidRequestError` (expiry in the past
        or more than ``max_ttl`` away, bad ``ack``, non-string values, ``$.`` names)."""
        now = self._clock()
        parsed = _parse_send(
            device_id, body, properties, now=now, default_ttl=self.default_ttl,
            max_ttl=self.max_ttl, max_bytes=self.max_bytes,
        )
        props = json.dumps(
            {"system": parsed.system, "application": parsed.application},
            separators=(",", ":"), ensure_ascii=False,
        )
        row = (device_id, parsed.message_id, generation_id, body, props, parsed.ack, now,
               parsed.expiry)
        after = await self._db.run(
            partial(_send_body, row=row, max_pending=self.max_pending, outcome=self._outcome(now))
        )
        self._apply(after)
        return C2DMessage(
            message_id=parsed.message_id,
            device_id=device_id,
            body=body,
            system=parsed.system,
            application=parsed.application,
            enqueued=now,
            expiry=parsed.expiry,
            delivery_count=0,
            ack=parsed.ack,
            lock_token=None,
            locked_until=None,
        )

    async def purge(self, device_id: str) -> int:
        """Empty the device's queue (``DELETE /devices/{id}/commands``, ref §3.3); feedback
        Purged where asked. Returns how many messages were removed."""
        if not self.pending(device_id):
            return 0
        now = self._clock()
        purged, after = await self._db.run(
            partial(_purge_body, device_id=device_id, outcome=self._outcome(now))
        )
        self._apply(after)
        return purged

    async def drop_device(self, device_id: str) -> int:
        """The device was deleted: remove its queue and its pending feedback, writing none
        (ref §3.3). Returns how many messages were removed."""
        dropped, after = await self._db.run(partial(_drop_body, device_id=device_id))
        self._apply(after)
        return dropped

    # -- device side ------------------------------------------------------------------------------

    async def deliverable(self, device_id: str, *, limit: int | None = None) -> list[C2DMessage]:
        """Lock and return up to ``limit`` (default: all) deliverable messages of the device,
        oldest first: not expired, and not locked or with a lapsed lock. Each gets a fresh
        lock token, ``locked_until = now + lock_seconds`` and, if this delivery counts (see
        the module doc), ``delivery_count + 1``. For MQTT delivery (ref §3.1)."""
        want = self.pending(device_id) if limit is None else min(limit, self.pending(device_id))
        if want <= 0:
            return []
        now = self._clock()
        tokens = [str(uuid.uuid4()) for _ in range(want)]
        messages, after = await self._db.run(
            partial(
                _deliver_body,
                device_id=device_id,
                tokens=tokens,
                locked_until=now + self.lock_seconds,
                max_delivery_count=self.max_delivery_count,
                outcome=self._outcome(now),
            )
        )
        self._apply(after)
        return messages

    async def next_for_delivery(self, device_id: str) -> C2DMessage | None:
        """The oldest deliverable message, locked (see :meth:`deliverable`), or None. A message
        whose delivery would exceed ``max_delivery_count`` is dead-lettered instead
        (feedback DeliveryCountExceeded) and the next one is tried."""
        messages = await self.deliverable(device_id, limit=1)
        return messages[0] if messages else None

    async def complete(self, device_id: str, lock_token: str) -> None:
        """Remove the message (MQTT PUBACK, HTTP complete; ref §3.2); feedback Success if
        ``ack`` is positive or full. :class:`LockLostError` (a NotFoundError) if no message
        of the device holds ``lock_token`` (unknown, settled, or redelivered since)."""
        await self._settle(device_id, lock_token, FeedbackStatus.SUCCESS)

    async def abandon(self, device_id: str, lock_token: str) -> None:
        """Put the message back (ref §3.2); its next delivery counts. If it has had
        ``max_delivery_count`` counted deliveries it is dead-lettered instead (feedback
        DeliveryCountExceeded). :class:`LockLostError` as for :meth:`complete`."""
        now = self._clock()
        after = await self._db.run(
            partial(_abandon_body, device_id=device_id, lock_token=lock_token,
                    max_delivery_count=self.max_delivery_count, outcome=self._outcome(now))
        )
        self._apply(after)

    async def reject(self, device_id: str, lock_token: str) -> None:
        """Dead-letter the message (ref §3.2); feedback Rejected if ``ack`` is negative or
        full. :class:`LockLostError` as for :meth:`complete`."""
        await self._settle(device_id, lock_token, FeedbackStatus.REJECTED)

    async def _settle(self, device_id: str, lock_token: str, status: FeedbackStatus) -> None:
        after = await self._db.run(
            partial(_settle_body, device_id=device_id, lock_token=lock_token, status=status,
                    outcome=self._outcome(self._clock()))
        )
        self._apply(after)

    async def release(self, device_id: str) -> int:
        """End every lock of the device now, as if the lock periods had lapsed: the
        messages are deliverable again at once and their next delivery does not count. Call
        it when the device's MQTT connection ends with C2D PUBLISHes unacknowledged. Returns
        how many locks ended."""
        if not self.pending(device_id):
            return 0
        released, after = await self._db.run(partial(_release_body, device_id=device_id))
        self._apply(after)
        return released

    async def expire(self) -> int:
        """The sweep, at :meth:`next_wakeup`: dead-letter expired messages (feedback Expired
        where asked), end lapsed locks (so they are deliverable again; tokens stay good until
        a redelivery), delete expired feedback. Works in transactions of at most
        :data:`SWEEP_CHUNK` rows each, so other writers interleave. Returns how many
        messages expired."""
        now = self._clock()
        total, more = 0, True
        while more:
            expired, more, after = await self._db.run(
                partial(_sweep_body, outcome=self._outcome(now), limit=SWEEP_CHUNK)
            )
            self._apply(after)
            total += expired
        if total:
            log.info("c2d messages expired count=%d", total)
        return total

    # -- feedback (service side) ------------------------------------------------------------------

    async def feedback_batch(self, max_records: int = 64) -> tuple[str, list[Feedback]] | None:
        """Lock and return the oldest available feedback records, at most ``max_records``,
        with the batch's lock token (``GET /messages/serviceBound/feedback``, ref §3.3);
        None when there are none. The lock lasts ``feedback_lock_seconds``."""
        if max_records < 1:
            raise InvalidRequestError("max_records must be at least 1")
        now = self._clock()
        token = str(uuid.uuid4())
        records, after = await self._db.run(
            partial(_feedback_batch_body, now=now, token=token,
                    locked_until=now + self.feedback_lock_seconds, limit=max_records)
        )
        self._apply(after)
        return (token, records) if records else None

    async def complete_feedback(self, lock_token: str) -> None:
        """Delete the batch's records (``DELETE .../feedback/{lockToken}``, ref §3.3);
        :class:`LockLostError` if no record holds the token."""
        after = await self._db.run(partial(_complete_feedback_body, token=lock_token))
        self._apply(after)

    async def abandon_feedback(self, lock_token: str) -> None:
        """Make the batch's records available again (``POST .../{lockToken}/abandon``);
        records abandoned ``feedback_max_delivery_count`` times are dropped."""
        after = await self._db.run(
            partial(_abandon_feedback_body, token=lock_token,
                    max_delivery_count=self.feedback_max_delivery_count)
        )
        self._apply(after)
