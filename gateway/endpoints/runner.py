"""One endpoint's drain loop: read the log from the endpoint's cursor, deliver, advance.

The cursor ``endpoint/{name}`` is pinned (retention keeps what the endpoint has not passed)
and moves only over messages the far side has acknowledged, or that were dead-lettered, or
that the endpoint's selection skipped. Delivery is in log order, one batch at a time, so
per-device order (indeed the log's total order) is kept; after a failure the unacknowledged
rest of the batch is sent again after a jittered, capped exponential backoff (edgeHub's
1 s .. 60 s, federation ref §1.3), without limit: nothing is dropped for being late. The
guarantee is at least once: a message acknowledged by the far side just before a crash, or
before a connection loss hid its acknowledgement, is sent again.

Health follows IoT Hub's endpoint health: ``unknown`` until the first connection or
delivery, ``healthy`` while working, ``unhealthy`` once a delivery or connection failed and
retries are under way, ``dead`` once that has lasted ``dead_after`` seconds (still retrying:
unlike IoT Hub, nothing is dropped when dead).

A message that the endpoint's enrichments push over the hub's message size limit is not sent
(IoT Hub ref §10.4: dropped for this endpoint only; the log keeps it for the others): the cursor
moves past it as past a delivered one, it is logged once and counted in the health's
``deadLettered`` with a ``lastError`` naming its seq, device and size
(:class:`gateway.hub.drops.EnrichedDrops`). The health status stays as it is: the far side is
not at fault.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from gateway.endpoints.envelope import Delivery, delivery_of
from gateway.errors import EndpointError, GatewayError, MessageTooLargeError, StoreError
from gateway.hub.drops import EnrichedDrops
from gateway.hub.messages import MAX_TELEMETRY_BYTES
from gateway.store.log import Entry, MessageLog

__all__ = ["Health", "Progress", "Runner", "Session", "Sink", "Tuning", "cursor_name"]

log = logging.getLogger(__name__)

Select = Callable[[Entry], bool]
Enrich = Callable[[Entry], Mapping[str, str]]


def cursor_name(endpoint: str) -> str:
    return f"endpoint/{endpoint}"


@dataclass(frozen=True, slots=True, kw_only=True)
class Tuning:
    """How endpoints retry and read. Defaults follow edgeHub (federation ref §1.3)."""

    backoff_initial: float = 1.0  # first retry delay, seconds
    backoff_max: float = 60.0  # cap
    dead_after: float = 3600.0  # failing this long continuously -> "dead"
    read_batch: int = 500  # log entries read at a time, at most
    batch_bytes: int = 4 << 20  # ... and about this many bytes (bodies + properties)
    cursor_interval: float = 0.25  # while behind, the cursor is stored at most this often


class Backoff:
    """Capped exponential backoff with jitter: the n-th delay is drawn from
    [d/2, d] with d = min(initial * 2**n, max)."""

    def __init__(self, initial: float, maximum: float, rng: random.Random | None = None) -> None:
        self.initial = initial
        self.maximum = maximum
        self.attempt = 0
        self._rng = rng or random.Random()

    def next(self) -> float:
        delay = min(self.initial * (2 ** min(self.attempt, 30)), self.maximum)
        self.attempt += 1
        return self._rng.uniform(delay / 2, delay)

    def reset(self) -> None:
        self.attempt = 0


class Progress:
    """Acknowledgements of one batch, in any order; ``prefix`` is how many leading messages
    are settled (delivered or dead-lettered), i.e. how far the cursor may move. ``delivered``
    and ``dead`` count within the prefix only: a message acknowledged after one that failed
    is sent again, and counted once."""

    __slots__ = ("_settled", "batch", "dead", "dead_reason", "delivered", "prefix")

    _ACK = 1
    _DEAD = 2

    def __init__(self, batch: Sequence[Delivery]) -> None:
        self.batch = batch
        self._settled = [0] * len(batch)
        self.prefix = 0
        self.delivered = 0
        self.dead = 0
        self.dead_reason = ""

    def ack(self, index: int) -> None:
        self._settle(index, self._ACK)

    def ack_through(self, end: int) -> None:
        """Messages ``[0, end)`` are delivered (those not settled yet)."""
        for i in range(self.prefix, end):
            if not self._settled[i]:
                self._settle(i, self._ACK)

    def dead_letter(self, index: int, reason: str) -> None:
        d = self.batch[index]
        log.warning("endpoint message dead-lettered seq=%d device=%s: %s", d.seq, d.device_id,
                    reason)
        self.dead_reason = reason
        self._settle(index, self._DEAD)

    def _settle(self, index: int, how: int) -> None:
        settled = self._settled
        settled[index] = how
        i, n = self.prefix, len(settled)
        while i < n and settled[i]:
            if settled[i] == self._ACK:
                self.delivered += 1
            else:
                self.dead += 1
            i += 1
        self.prefix = i

    @property
    def complete(self) -> bool:
        return self.prefix == len(self._settled)


class Session(Protocol):
    """A live connection to the far side, from :meth:`Sink.session`."""

    recovered: int
    """Highest seq the far side already holds (the file endpoint after a crash), else 0."""

    reachable: bool
    """Opening the session proved the far side works (an MQTT CONNACK), so health may say
    healthy before the first delivery; False when only a delivery can tell (HTTP)."""

    async def deliver(self, batch: Sequence[Delivery], progress: Progress) -> None:
        """Send ``batch`` in order, reporting each acknowledgement to ``progress``; raise
        :class:`EndpointError` if the far side failed (what ``progress`` holds is kept)."""

    def idle_timeout(self) -> float | None:
        """Seconds until :meth:`idle` should run if nothing arrives (None: never)."""

    async def idle(self) -> None:
        """Housekeeping while idle (the file endpoint closes a file whose time is up)."""


class Sink(Protocol):
    def session(self) -> contextlib.AbstractAsyncContextManager[Session]:
        """Connect; raise :class:`EndpointError` if the far side cannot be reached."""


class Health:
    """Status and counters of one endpoint (counters since the hub started)."""

    def __init__(self, name: str, kind: str, dead_after: float) -> None:
        self.name = name
        self.kind = kind
        self.dead_after = dead_after
        self.ok: bool | None = None  # None: unknown
        self.failing_since: float | None = None  # monotonic
        self.delivered = 0
        self.retries = 0
        self.dead_lettered = 0
        self.last_error: str | None = None
        self.last_error_time: float | None = None
        self.last_delivered_time: float | None = None
        self.last_attempt_time: float | None = None
        self.position = 0

    def succeeded(self) -> None:
        self.ok = True
        self.failing_since = None

    def dead_letter(self, count: int, error: str) -> None:
        """``count`` messages will never be delivered (the log keeps them): counted, with why."""
        self.dead_lettered += count
        self.last_error, self.last_error_time = error, time.time()

    def failed(self, error: str) -> None:
        self.ok = False
        if self.failing_since is None:
            self.failing_since = time.monotonic()
        self.retries += 1
        self.last_attempt_time = self.last_error_time = time.time()
        self.last_error = error

    @property
    def status(self) -> str:
        if self.ok is None:
            return "unknown"
        if self.ok:
            return "healthy"
        if self.failing_since is not None and time.monotonic() - self.failing_since >= self.dead_after:
            return "dead"
        return "unhealthy"

    def json(self, last_seq: int) -> dict[str, Any]:
        from gateway.hub.messages import format_time

        def stamp(t: float | None) -> str | None:
            return format_time(t) if t is not None else None

        return {
            "endpointId": self.name,
            "type": self.kind,
            "healthStatus": self.status,
            "delivered": self.delivered,
            "retries": self.retries,
            "deadLettered": self.dead_lettered,
            "backlog": max(0, last_seq - self.position),
            "cursor": self.position,
            "lastError": self.last_error,
            "lastErrorTime": stamp(self.last_error_time),
            "lastDeliveredTime": stamp(self.last_delivered_time),
            "lastSendAttemptTime": stamp(self.last_attempt_time),
        }


class Runner:
    """Drains the log into one endpoint's sink until cancelled. ``select`` and ``enrich``
    are read again for every batch, so the manager can change them live."""

    def __init__(self, log_: MessageLog, name: str, sink: Sink, health: Health, *,
                 select: Callable[[], Select], enrich: Callable[[], Enrich], host_name: str,
                 tuning: Tuning, max_message_bytes: int = MAX_TELEMETRY_BYTES,
                 drops: EnrichedDrops | None = None) -> None:
        self.log = log_
        self.name = name
        self.cursor = cursor_name(name)
        self.sink = sink
        self.health = health
        self._select = select
        self._enrich = enrich
        self._host_name = host_name
        self._tuning = tuning
        self._limit = max_message_bytes
        self._drops = drops if drops is not None else EnrichedDrops()
        self._backoff = Backoff(tuning.backoff_initial, tuning.backoff_max)
        self._stored = -1  # the position last written to the cursor (-1: none read yet)
        self._stored_at = 0.0

    async def ensure_cursor(self) -> bool:
        """Load the endpoint's position; a new endpoint starts at the log's end (it gets
        what is appended from now on). True if the cursor was created here."""
        seq = await self.log.get_cursor(self.cursor)
        created = seq is None
        if seq is None:
            seq = self.log.last_seq
            await self.log.set_cursor(self.cursor, seq, pin=True)
        self._stored = seq
        self.health.position = seq
        return created

    async def run(self) -> None:
        try:
            await self._run()
        except asyncio.CancelledError:  # stopped: keep what was delivered for the next start
            if self._stored >= 0:
                with contextlib.suppress(GatewayError):
                    await self._store(self.health.position, force=True)
            raise

    async def _run(self) -> None:
        started = False
        while True:
            error = "the session ended"
            try:
                if not started:
                    await self.ensure_cursor()
                    started = True
                async with self.sink.session() as session:
                    if session.reachable:
                        self.health.succeeded()
                    if session.recovered > self.log.last_seq:
                        log.warning("endpoint %s: the far side claims seq %d, beyond the log's"
                                    " %d (another database?): ignored", self.name,
                                    session.recovered, self.log.last_seq)
                    elif session.recovered > self.health.position:
                        await self._store(session.recovered, force=True)
                    await self._drain(session)
            except* EndpointError as group:
                error = str(group.exceptions[0])
            except* (OSError, GatewayError) as group:  # the disk, the store: retry too
                error = f"{type(group.exceptions[0]).__name__}: {group.exceptions[0]}"
            except* Exception as group:  # a bug: logged, and retried like a failure
                log.error("endpoint %s failed", self.name, exc_info=group.exceptions[0])
                error = f"internal error: {group.exceptions[0]!r}"
            if started:
                with contextlib.suppress(GatewayError):
                    await self._store(self.health.position, force=True)
            self.health.failed(error)
            delay = self._backoff.next()
            log.warning("endpoint %s unavailable (%s); retrying in %.1f s", self.name,
                        error, delay)
            await asyncio.sleep(delay)

    async def _drain(self, session: Session) -> None:
        limit = self._tuning.read_batch
        while True:
            position = self.health.position
            entries, upto = await self.log.scan(position, limit)
            # Keep a batch near batch_bytes: big messages make the next read shorter.
            size = sum(len(e.body) + len(e.props) for e in entries)
            if entries:
                per_entry = max(1, size // len(entries))
                limit = max(1, min(self._tuning.read_batch,
                                   self._tuning.batch_bytes // per_entry))
            select = self._select()
            enrich = self._enrich()
            batch = []
            for entry in entries:
                if select(entry):
                    try:
                        batch.append(delivery_of(entry, enrich(entry), self._host_name,
                                                 limit=self._limit))
                    except MessageTooLargeError as exc:  # IoT Hub ref §10.4: not for us
                        if self._drops.drop(self.name, entry, exc):
                            self.health.dead_letter(1, self._drops.last_error[self.name])
                    except StoreError as exc:  # a corrupt row: never deliverable
                        log.error("endpoint %s: dead-lettered seq=%d: %s", self.name,
                                  entry.seq, exc)
                        self.health.dead_letter(1, f"dead-lettered seq {entry.seq}: {exc}")
            if batch:
                progress = Progress(batch)
                self.health.last_attempt_time = time.time()
                try:
                    await session.deliver(batch, progress)
                finally:
                    self._account(progress, upto)
                self._backoff.reset()
                self.health.succeeded()
                caught_up = self.health.position >= self.log.last_seq
                await self._store(self.health.position, force=caught_up)
            else:
                self.health.position = upto
                await self._store(upto, force=False)
            if self.health.position >= self.log.last_seq:
                await self._wait(session)

    def _account(self, progress: Progress, upto: int) -> None:
        """Move the in-memory position over what ``progress`` settled."""
        batch = progress.batch
        if progress.complete:
            self.health.position = max(self.health.position, upto)
        elif progress.prefix:
            self.health.position = batch[progress.prefix].seq - 1
        elif batch:
            self.health.position = max(self.health.position, batch[0].seq - 1)
        self.health.delivered += progress.delivered
        if progress.delivered:
            self.health.last_delivered_time = time.time()
        if progress.dead:
            self.health.dead_letter(progress.dead,
                                    f"dead-lettered {progress.dead}: {progress.dead_reason}")

    async def _wait(self, session: Session) -> None:
        while True:
            timeout = session.idle_timeout()
            wait = self._tuning.cursor_interval if timeout is None else min(
                timeout, self._tuning.cursor_interval)
            if await self.log.wait_beyond(self.health.position, max(0.0, wait)):
                return
            if timeout is not None and timeout <= wait:
                await session.idle()
            await self._store(self.health.position, force=False)

    async def _store(self, seq: int, *, force: bool) -> None:
        """Write the cursor if it moved: at once if ``force`` (caught up, or failing), else
        at most every ``cursor_interval`` (while working through a backlog, or skipping
        entries not selected). A cursor that lags costs messages sent again after a crash,
        never a message lost."""
        self.health.position = max(self.health.position, seq)
        seq = self.health.position
        if seq == self._stored:
            return
        now = time.monotonic()
        if not force and now - self._stored_at < self._tuning.cursor_interval:
            return
        await self.log.set_cursor(self.cursor, seq, pin=True)
        self._stored = seq
        self._stored_at = now
