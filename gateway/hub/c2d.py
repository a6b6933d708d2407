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

Layout: this module is the queues' asyncio side (:class:`C2DQueues`); the message and feedback
values, vocabularies and errors are :mod:`gateway.hub.c2dmodel`, what a send means is
:mod:`gateway.hub.c2dsend`, and the schema and transaction bodies :mod:`gateway.hub._c2d_sql`.
The names importers used are still importable from here.
"""


from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Final

from gateway.errors import InvalidRequestError
from gateway.hub import _c2d_sql as sql
from gateway.hub.c2dmodel import (
    Ack,
    C2DMessage,
    C2DMessageTooLargeError,
    Feedback,
    FeedbackStatus,
    LockLostError,
    QueueFullError,
)
from gateway.hub.c2dsend import parse_send
from gateway.store.db import Database

MIGRATION = sql.MIGRATION
ABANDONED = sql.ABANDONED
Settled = sql.Settled

__all__ = [
    "ABANDONED",
    "MIGRATION",
    "Ack",
    "C2DMessage",
    "C2DMessageTooLargeError",
    "C2DQueues",
    "Feedback",
    "FeedbackStatus",
    "LockLostError",
    "QueueFullError",
    "Settled",
]

log = logging.getLogger(__name__)

SWEEP_CHUNK: Final = 1000  # rows per sweep transaction (about 6 ms of the writer thread)


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
        # Called after each commit that settled messages, whatever the way (MQTT PUBACK, the
        # device HTTP API, AMQP, expiry, purge, dead-lettering): the one place federation
        # learns that a message handed down by a parent left the queue here (c2dmirror).
        self.settle_hooks: list[Callable[[Sequence[Settled]], None]] = []

    # -- state kept in memory ------------------------------------------------------------------

    def _apply(self, after: sql.After) -> None:
        for device, count in after.counts.items():
            if count:
                self._counts[device] = count
            else:
                self._counts.pop(device, None)
        self._message_due = after.message_due
        self._lock_due = after.lock_due
        self._feedback_due = after.feedback_due
        if after.settled:
            for hook in self.settle_hooks:
                try:
                    hook(after.settled)
                except Exception:  # a hook must not fail a committed change
                    log.exception("c2d settle hook failed")

    def _outcome(self, now: float) -> sql.Outcome:
        return sql.Outcome(now, now + self.feedback_ttl)

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
        counts, after = await self._db.run(sql.recover_body)
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
        parsed = parse_send(
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
            partial(sql.send_body, row=row, max_pending=self.max_pending, outcome=self._outcome(now))
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
            partial(sql.purge_body, device_id=device_id, outcome=self._outcome(now))
        )
        self._apply(after)
        return purged

    async def drop_device(self, device_id: str) -> int:
        """The device was deleted: remove its queue and its pending feedback, writing none
        (ref §3.3). Returns how many messages were removed."""
        dropped, after = await self._db.run(partial(sql.drop_body, device_id=device_id))
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
                sql.deliver_body,
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
        await self.settle(device_id, lock_token, FeedbackStatus.SUCCESS)

    async def abandon(self, device_id: str, lock_token: str) -> None:
        """Put the message back (ref §3.2); its next delivery counts. If it has had
        ``max_delivery_count`` counted deliveries it is dead-lettered instead (feedback
        DeliveryCountExceeded). :class:`LockLostError` as for :meth:`complete`."""
        now = self._clock()
        after = await self._db.run(
            partial(sql.abandon_body, device_id=device_id, lock_token=lock_token,
                    max_delivery_count=self.max_delivery_count, outcome=self._outcome(now))
        )
        self._apply(after)

    async def reject(self, device_id: str, lock_token: str) -> None:
        """Dead-letter the message (ref §3.2); feedback Rejected if ``ack`` is negative or
        full. :class:`LockLostError` as for :meth:`complete`."""
        await self.settle(device_id, lock_token, FeedbackStatus.REJECTED)

    async def settle(self, device_id: str, lock_token: str, status: FeedbackStatus) -> None:
        """Remove the message holding the lock with feedback ``status`` (where its ``ack``
        asks): how a settle reported from a child gateway ends the copy here
        (:mod:`gateway.hub.c2dfed`). :class:`LockLostError` as for :meth:`complete`."""
        after = await self._db.run(
            partial(sql.settle_body, device_id=device_id, lock_token=lock_token, status=status,
                    outcome=self._outcome(self._clock()))
        )
        self._apply(after)

    async def release(self, device_id: str, lock_tokens: Sequence[str] | None = None) -> int:
        """End the locks of the device now (all, or those of ``lock_tokens``), as if the
        lock periods had lapsed: the messages are deliverable again at once and their next
        delivery does not count. Call it when the device's MQTT connection ends with C2D
        PUBLISHes unacknowledged. Returns how many locks ended."""
        if not self.pending(device_id):
            return 0
        released, after = await self._db.run(partial(sql.release_body, device_id=device_id,
                                                     lock_tokens=lock_tokens))
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
                partial(sql.sweep_body, outcome=self._outcome(now), limit=SWEEP_CHUNK)
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
            partial(sql.feedback_batch_body, now=now, token=token,
                    locked_until=now + self.feedback_lock_seconds, limit=max_records)
        )
        self._apply(after)
        return (token, records) if records else None

    async def complete_feedback(self, lock_token: str) -> None:
        """Delete the batch's records (``DELETE .../feedback/{lockToken}``, ref §3.3);
        :class:`LockLostError` if no record holds the token."""
        after = await self._db.run(partial(sql.complete_feedback_body, token=lock_token))
        self._apply(after)

    async def abandon_feedback(self, lock_token: str) -> None:
        """Make the batch's records available again (``POST .../{lockToken}/abandon``);
        records abandoned ``feedback_max_delivery_count`` times are dropped."""
        after = await self._db.run(
            partial(sql.abandon_feedback_body, token=lock_token,
                    max_delivery_count=self.feedback_max_delivery_count)
        )
        self._apply(after)

