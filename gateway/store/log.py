"""The durable message log: one sequence of stored messages, per-consumer cursors, retention.

The hub appends every routed message here and acknowledges the PUBLISH only when the append's
future resolves, i.e. after the transaction holding it committed (DESIGN "One telemetry
message, end to end", steps 5-6). Every endpoint drains the log from its own durable cursor
(step 7), and retention removes messages every pinning cursor has passed once they are older
than the retention period, or evicts the oldest by policy at the byte cap (step 8), in the
manner of edgeHub's store-and-forward (IoT Hub ref §6.3).

Hot path: :meth:`MessageLog.append` (or :meth:`MessageLog.append_then`, the broker's, which
calls back instead of resolving a future) only turns records into row tuples and puts them in a
shared buffer; one writer body per group transaction, submitted at the end of the loop turn,
takes the whole buffer and inserts it in multi-row statements. Sequence numbers are the
table's rowids (dense, increasing, never reused: when retention empties the table the
high-water mark is kept in ``log_meta``).
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, fields, make_dataclass
from functools import partial
from typing import Any, Literal, TypeAlias

from gateway.errors import InvalidRequestError, StoreError, StoreFullError
from gateway.store._log_sql import (
    BODY_OF,
    COLUMNS,
    DROP_BYTE_CAP,
    MIGRATION,
    PROPS_OF,
    ROW_OF,
    Row,
    delete_expired,
    evict,
    insert,
    load_state,
    routes_of,
)
from gateway.store import dedupe
from gateway.store.db import Database

__all__ = ["MIGRATION", "Entry", "LogStats", "MessageLog", "PruneResult", "Record", "Waiter",
           "new_record"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Record:
    """A message as the hub appends it. ``props`` is the hub's JSON text, opaque here."""

    kind: str  # "telemetry", "connectionState", "lifecycle", "twinChange", ...
    device_id: str
    module_id: str | None
    enqueued_ms: int  # epoch milliseconds
    props: str
    body: bytes
    routes: tuple[str, ...] = ()  # names of the routes it matched (the router's decision)
    once: tuple[str, str, int, int | None] | None = None  # (key, epoch, seq, prev): dedupe.py


def _slotted_twin(cls: type) -> Any:
    """A plain slotted dataclass with the fields of the frozen ``cls``, in order: building one
    and giving it ``cls``'s class (CPython allows it, the layouts are equal) makes an object
    equal to and indistinguishable from ``cls(...)`` at a fraction of the cost. Derived from
    ``cls``, so a field added there is in the twin too."""
    return make_dataclass(f"_{cls.__name__}Twin", [(f.name, f.type) for f in fields(cls)],
                          slots=True)


# Building the frozen Record costs ~1 us on this VM (one object.__setattr__ per field), more than
# the rest of a telemetry message's hub work; the hot path builds this slotted twin and gives it
# Record's class, as the MQTT decoder does for Publish (gateway.mqtt._readers.PublishTwin).
_RecordTwin = _slotted_twin(Record)


def new_record(kind: str, device_id: str, module_id: str | None, enqueued_ms: int, props: str,
               body: bytes, routes: tuple[str, ...] = (),
               once: tuple[str, str, int, int | None] | None = None) -> Record:
    """``Record(...)``, fast (see _RecordTwin); equal to and indistinguishable from it."""
    record = _RecordTwin(kind, device_id, module_id, enqueued_ms, props, body, routes, once)
    record.__class__ = Record
    return record  # type: ignore[no-any-return]


@dataclass(frozen=True, slots=True)
class Entry:
    """A stored message as readers get it back; ``seq`` orders the log."""

    seq: int
    kind: str
    device_id: str
    module_id: str | None
    enqueued_ms: int
    props: str
    body: bytes
    routes: tuple[str, ...] = ()


# Readers build one Entry per row on the db thread, which holds the GIL meanwhile (the loop
# waits): the slotted twin, given Entry's class, as for Record above, and the route names of
# a read made once per distinct text.
_EntryTwin = _slotted_twin(Entry)


def _entries(rows: Any, limit_bytes: int | None = None) -> tuple[list[Entry], bool]:
    """Entries of the ``rows`` of a read (``SELECT COLUMNS``), stopping once ``limit_bytes``
    of body and props are read (True then)."""
    out: list[Entry] = []
    known: dict[str, tuple[str, ...]] = {}
    total = 0
    append = out.append
    for seq, kind, device_id, module_id, enqueued_ms, props, body, text in rows:
        routes = known.get(text)
        if routes is None:
            routes = known[text] = routes_of(text)
        entry = _EntryTwin(seq, kind, device_id, module_id, enqueued_ms, props, body, routes)
        entry.__class__ = Entry
        append(entry)
        if limit_bytes is not None:
            total += len(body) + len(props)
            if total >= limit_bytes:
                return out, True
    return out, False


Waiter: TypeAlias = "asyncio.Future[int] | Callable[[BaseException | None], None]"
"""Who waits for an append: a future (:meth:`MessageLog.append`), or a function called on the
loop when the transaction is over, with None once committed (:meth:`MessageLog.append_then`)."""

_Waiting: TypeAlias = "tuple[Waiter, int, int, Sequence[dedupe.Once | None] | None]"
"""An append in the buffer: its waiter, how many rows, their bytes, their dedupe stamps (None
for a plain append)."""


@dataclass(frozen=True, slots=True)
class PruneResult:
    """What one :meth:`MessageLog.prune` removed. ``expired``: past retention and passed by
    every pinning cursor; ``evicted``: removed for the byte cap; ``dropped``: the evicted ones
    some pinning cursor had not read yet (lost to that endpoint)."""

    expired: int = 0
    evicted: int = 0
    dropped: int = 0
    bytes_freed: int = 0


@dataclass(frozen=True, slots=True)
class LogStats:
    """A snapshot of the log. ``bytes`` counts body + props lengths of stored messages;
    ``dropped_total`` is persistent, by reason; ``rejected``, ``appended`` and ``commits``
    (append transactions) count since :meth:`MessageLog.open`."""

    count: int
    bytes: int
    first_seq: int | None
    last_seq: int
    oldest_enqueued_ms: int | None
    dropped_total: Mapping[str, int]
    rejected: int
    appended: int
    commits: int
    pending: int


class _WriteBody:
    """The writer's transaction body: takes the whole append buffer when it first runs and
    inserts it (:func:`insert`); settles every waiting append on the loop. When some appends
    carry dedupe stamps (:meth:`MessageLog.append_once`), their duplicates are left out and
    the high-water marks raised in this same body (:func:`dedupe.filter_once`)."""

    __slots__ = ("kept", "once", "outcomes", "owner", "rows", "waiters")

    def __init__(self, owner: MessageLog) -> None:
        self.owner = owner
        self.rows: list[Row] | None = None
        self.waiters: list[_Waiting] = []
        self.once = False  # some waiter's rows carry stamps
        self.outcomes: list[dedupe.Outcome] | None = None  # per waiter, when ``once``
        self.kept: list[Row] = []  # the rows inserted, when ``once``

    def __call__(self, conn: sqlite3.Connection) -> int:
        rows = self.rows
        if rows is None:  # first run: take the buffer (a re-run reuses it)
            rows, self.waiters, self.once = self.owner._take_buffer(self)
            self.rows = rows
        if not self.once:
            return insert(conn, rows)
        self.kept, self.outcomes = dedupe.filter_once(
            conn, rows, [(count, onces) for _, count, _, onces in self.waiters])
        return insert(conn, self.kept) if self.kept else 0

    def settle(self, last: int | None, exc: BaseException | None) -> None:
        """On the loop, once the transaction is over: resolve or fail every waiter."""
        owner = self.owner
        if self.rows is None:  # never ran (database closed): the buffer is still ours
            self.rows, self.waiters, self.once = owner._take_buffer(self)
        if exc is not None or last is None:
            owner._failed(self.waiters, exc or StoreError("append not committed"))
        elif self.outcomes is not None:
            owner._committed_once(self.kept, self.waiters, last, self.outcomes)
        else:
            owner._committed(self.rows, self.waiters, last)


class MessageLog:
    """Durable, group-committed message log with per-consumer cursors and retention.

    All methods must be called on the event loop that opened the :class:`Database`."""

    def __init__(
        self,
        db: Database,
        *,
        retention_s: float = 7 * 86400,
        max_bytes: int = 1 << 30,
        overflow: Literal["drop-oldest", "reject-new"] = "drop-oldest",
        clock: Callable[[], float] = time.time,
    ) -> None:
        if overflow not in ("drop-oldest", "reject-new"):
            raise ValueError(f"overflow must be 'drop-oldest' or 'reject-new', not {overflow!r}")
        if max_bytes <= 0 or retention_s < 0:
            raise ValueError("max_bytes must be positive and retention_s not negative")
        self._db = db
        self._retention_s = retention_s
        self._max_bytes = max_bytes
        self._reject_new = overflow == "reject-new"
        self._clock = clock
        self.last_seq = 0  # highest committed seq
        self._count = 0
        self._bytes = 0  # committed
        self._pending_bytes = 0  # appended, not yet committed or failed
        self._first_seq: int | None = None
        self._oldest_ms: int | None = None
        self._cursors: dict[str, tuple[int, bool]] = {}
        self._dropped: dict[str, int] = {}
        self._rejected = 0
        self.deduplicated = 0  # on-behalf-of resends dropped by append_once since open
        self._appended = 0
        self._commits = 0
        # The append buffer, shared with the db thread (guarded by _lock).
        self._lock = threading.Lock()
        self._rows: list[Row] = []
        self._waiters: list[_Waiting] = []
        self._buffer_once = False  # an append in the buffer carries dedupe stamps
        self._writer: _WriteBody | None = None
        self._advanced: asyncio.Event | None = None
        self._over_cap = asyncio.Event()
        self._opened = False

    async def open(self) -> None:
        """Create or migrate the schema, then load last_seq, counts, bytes and cursors."""
        await self._db.migrate(MIGRATION)
        await self._db.migrate(dedupe.MIGRATION)
        state = await self._db.run(load_state)
        (
            self.last_seq,
            self._count,
            self._bytes,
            self._first_seq,
            self._oldest_ms,
            self._cursors,
            self._dropped,
        ) = state
        self._opened = True

    # -- appending (hot path) --------------------------------------------------------------

    def append(self, records: Sequence[Record]) -> asyncio.Future[int]:
        """Store ``records`` in order; the future resolves with the seq of the last one once
        the transaction holding them has committed, or fails with :class:`StoreError`
        (:class:`StoreFullError` under ``reject-new`` at the byte cap). Appends made while a
        transaction commits are coalesced into the next one (one ``executemany``)."""
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        if not records:
            future.set_result(self.last_seq)
            return future
        error = self._enqueue(records, future)
        if error is not None:
            future.set_exception(error)
        return future

    def append_then(self, records: Sequence[Record],
                    done: Callable[[BaseException | None], None]) -> None:
        """:meth:`append` without a future: ``done(None)`` is called on the loop once the
        transaction holding ``records`` committed, ``done(error)`` if it failed; at once (in
        this call) if the append is refused. The waiters of one commit are called in append
        order in one pass, without a loop turn each (the broker's PUBACK path)."""
        if not records:
            done(None)
            return
        error = self._enqueue(records, done)
        if error is not None:
            done(error)

    def _enqueue(self, records: Sequence[Record], waiter: Waiter,
                 onces: Sequence[dedupe.Once | None] | None = None) -> StoreError | None:
        """Put ``records`` into the append buffer for ``waiter``; the error refusing them.
        ``onces``: their dedupe stamps (:meth:`append_once`)."""
        if len(records) == 1:
            record = records[0]
            rows = [ROW_OF(record)]
            nbytes = len(record.body) + len(record.props)
        else:
            rows = list(map(ROW_OF, records))
            nbytes = sum(map(len, map(BODY_OF, records))) + sum(map(len, map(PROPS_OF, records)))
        if not self._opened:
            return StoreError("message log is not open")
        if self._reject_new and self._bytes + self._pending_bytes + nbytes > self._max_bytes:
            self._rejected += len(rows)
            return StoreFullError(f"store full: {self._bytes} of {self._max_bytes} bytes used")
        self._pending_bytes += nbytes
        writer = None
        with self._lock:
            self._rows += rows
            self._waiters.append((waiter, len(rows), nbytes, onces))
            if onces is not None:
                self._buffer_once = True
            if self._writer is None:
                writer = self._writer = _WriteBody(self)
        if writer is not None:
            # Submitted at the end of this loop turn, not now: the appends of every read this
            # turn handles join one transaction (one fsync, one wake-up of the db thread) even
            # when the db thread is idle and would otherwise commit the first one alone.
            asyncio.get_running_loop().call_soon(self._submit, writer)
        return None

    def _submit(self, writer: _WriteBody) -> None:
        self._db.submit_then(writer, writer.settle)

    def append_once(self, records: Sequence[Record]) -> asyncio.Future[int]:
        """:meth:`append` for records that may carry a dedupe stamp (``Record.once``): those at
        or below their key's durable high-water mark are dropped, in the same transaction that
        stores the rest and raises the marks (:mod:`gateway.store.dedupe`); the gap check
        refuses the whole append (:class:`StoreError`). It joins the next group commit like
        any append; the future resolves with the seq of its last stored row (the log's last
        seq when every one was a duplicate)."""
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        if not records:
            future.set_result(self.last_seq)
            return future
        error = self._enqueue(records, future, [r.once for r in records])
        if error is not None:
            future.set_exception(error)
        return future

    def append_once_then(self, records: Sequence[Record],
                         done: Callable[[BaseException | None], None]) -> None:
        """:meth:`append_once` without a future, as :meth:`append_then` (the broker's PUBACK
        path for a child gateway's forwarded messages)."""
        if not records:
            done(None)
            return
        error = self._enqueue(records, done, [r.once for r in records])
        if error is not None:
            done(error)

    def _take_buffer(self, writer: _WriteBody) -> tuple[list[Row], list[_Waiting], bool]:
        """Hand the whole buffer to ``writer`` (db thread, or loop if it never ran)."""
        with self._lock:
            assert self._writer is writer
            rows, self._rows = self._rows, []
            waiters, self._waiters = self._waiters, []
            once, self._buffer_once = self._buffer_once, False
            self._writer = None
        return rows, waiters, once

    def _committed(self, rows: list[Row], waiters: list[_Waiting], last: int) -> None:
        """The log's state first, then the waiters in append order: a waiter called here
        sees the log as a future's callback would."""
        nbytes = 0
        for _waiter, _count, size, _ in waiters:
            nbytes += size
        self._pending_bytes -= nbytes
        self._stored(rows, nbytes, last)
        seq = last - len(rows)
        for waiter, count, _size, _ in waiters:
            seq += count
            if isinstance(waiter, asyncio.Future):
                if not waiter.done():
                    waiter.set_result(seq)
            else:
                _call_waiter(waiter, None)

    def _committed_once(self, kept: list[Row], waiters: list[_Waiting], last: int,
                        outcomes: list[dedupe.Outcome]) -> None:
        """:meth:`_committed` for a body that left duplicates out: ``kept``, the rows it
        inserted; ``outcomes`` per waiter, what it stored or the gap check's refusal."""
        for _waiter, _count, size, _ in waiters:
            self._pending_bytes -= size
        self.deduplicated += sum([o[2] for o in outcomes])
        self._stored(kept, sum([o[1] for o in outcomes]), last)
        seq = last - len(kept)
        for (waiter, _count, _size, _), (count, _b, _d, error) in zip(waiters, outcomes):
            seq += count
            result = seq if count else self.last_seq
            if isinstance(waiter, asyncio.Future):
                if not waiter.done():
                    if error is not None:
                        waiter.set_exception(error)
                    else:
                        waiter.set_result(result)
            else:
                _call_waiter(waiter, error)

    def _stored(self, rows: list[Row], nbytes: int, last: int) -> None:
        """The log's state after a commit that inserted ``rows`` (``nbytes`` of body and
        props), the last of them at seq ``last``."""
        self._commits += 1
        if not rows:
            return
        if self._count == 0:
            self._first_seq = last - len(rows) + 1
            self._oldest_ms = rows[0][3]
        self._count += len(rows)
        self._bytes += nbytes
        self._appended += len(rows)
        self.last_seq = max(self.last_seq, last)
        if self._advanced is not None:
            self._advanced.set()
            self._advanced = None
        if not self._reject_new and self._bytes > self._max_bytes:
            self._over_cap.set()

    def _failed(self, waiters: list[_Waiting], exc: BaseException) -> None:
        for waiter, _count, size, _ in waiters:
            self._pending_bytes -= size
            if isinstance(waiter, asyncio.Future):
                if not waiter.done():
                    waiter.set_exception(exc)
            else:
                _call_waiter(waiter, exc)

    # -- reading and waiting ---------------------------------------------------------------

    async def read(
        self,
        after_seq: int,
        limit: int = 500,
        *,
        device_id: str | None = None,
        kinds: Collection[str] | None = None,
        where: Callable[[Entry], bool] | None = None,
        max_bytes: int | None = None,
    ) -> list[Entry]:
        """Committed entries with ``seq > after_seq``, ascending, at most ``limit``, and no
        more than ``max_bytes`` of bodies and properties (but always at least one entry).
        Filters scan in seq order (no secondary index, to keep appends cheap); ``where``
        (e.g. "went to this endpoint") is applied here, reading on until ``limit`` entries
        pass it, ``max_bytes`` of them are read, or the log ends."""
        entries, _full = await self._read(after_seq, limit, device_id, kinds, max_bytes, where)
        return entries

    async def _read(
        self,
        after_seq: int,
        limit: int,
        device_id: str | None,
        kinds: Collection[str] | None,
        max_bytes: int | None,
        where: Callable[[Entry], bool] | None = None,
    ) -> tuple[list[Entry], bool]:
        """:meth:`read`, and whether it stopped at ``limit`` or ``max_bytes`` (True) rather
        than at the end of what was committed (False)."""
        if where is None:
            return await self._read_rows(after_seq, limit, device_id, kinds, max_bytes)
        out: list[Entry] = []
        total = 0
        while True:  # batches bounded like any read, filtered here
            batch, full = await self._read_rows(after_seq, limit, device_id, kinds, max_bytes)
            for entry in batch:
                if where(entry):
                    out.append(entry)
                    total += len(entry.body) + len(entry.props)
                    if len(out) == limit or (max_bytes is not None and total >= max_bytes):
                        return out, True
            if not full:
                return out, False
            after_seq = batch[-1].seq

    async def _read_rows(
        self,
        after_seq: int,
        limit: int,
        device_id: str | None,
        kinds: Collection[str] | None,
        max_bytes: int | None,
    ) -> tuple[list[Entry], bool]:
        if limit <= 0:
            raise InvalidRequestError(f"limit must be positive, not {limit}")
        upto = self.last_seq
        if after_seq >= upto or (kinds is not None and not kinds):
            return [], False
        sql = f"SELECT {COLUMNS} FROM log_messages WHERE seq > ? AND seq <= ?"
        args: list[Any] = [after_seq, upto]
        if device_id is not None:
            sql += " AND device_id = ?"
            args.append(device_id)
        if kinds is not None:
            kind_list = sorted(set(kinds))
            sql += f" AND kind IN ({', '.join('?' * len(kind_list))})"
            args.extend(kind_list)
        sql += " ORDER BY seq LIMIT ?"
        args.append(limit)

        def query(conn: sqlite3.Connection) -> tuple[list[Entry], bool]:
            cursor = conn.execute(sql, args)
            if max_bytes is None:
                out, _ = _entries(cursor.fetchall())
                return out, len(out) == limit
            out, full = _entries(cursor, max_bytes)  # row by row: stop at the byte bound
            return out, full or len(out) == limit

        return await self._db.run(query)

    async def scan(
        self,
        after_seq: int,
        limit: int = 500,
        *,
        device_id: str | None = None,
        kinds: Collection[str] | None = None,
        where: Callable[[Entry], bool] | None = None,
        max_bytes: int | None = None,
    ) -> tuple[list[Entry], int]:
        """:meth:`read`, plus the position a filtering reader may move to: when the read
        comes back short, every entry committed before it started was examined, matching or
        not, so the reader can skip past those its filters hid (and wait for commits beyond
        that position, not beyond its last match). A read cut short by ``limit`` or
        ``max_bytes`` moves only to its last entry."""
        examined = self.last_seq  # everything up to here is visible to the read below
        entries, full = await self._read(after_seq, limit, device_id, kinds, max_bytes, where)
        if full:
            return entries, entries[-1].seq
        return entries, max(examined, after_seq, entries[-1].seq if entries else 0)

    async def seq_before_time(self, enqueued_ms: int, *, inclusive: bool = False) -> int:
        """The position a reader starts after to see the messages enqueued after
        ``enqueued_ms`` (at or after it with ``inclusive``): one less than the first such seq,
        or ``last_seq`` when there is none. (Event Hubs' enqueued-time filter.)"""
        upto = self.last_seq
        op = ">=" if inclusive else ">"

        def query(conn: sqlite3.Connection) -> int:
            row = conn.execute(
                f"SELECT seq FROM log_messages WHERE enqueued_ms {op} ? AND seq <= ?"
                " ORDER BY seq LIMIT 1", (enqueued_ms, upto)).fetchone()
            return upto if row is None else int(row[0]) - 1

        return await self._db.run(query)

    async def wait_beyond(self, seq: int, timeout: float | None = None) -> bool:
        """Return True as soon as ``last_seq > seq`` (woken by commits), False on timeout."""
        try:
            async with asyncio.timeout(timeout):
                while self.last_seq <= seq:
                    if self._advanced is None:
                        self._advanced = asyncio.Event()
                    await self._advanced.wait()
        except TimeoutError:
            return self.last_seq > seq
        return True

    # -- cursors -------------------------------------------------------------------------------

    async def get_cursor(self, name: str) -> int | None:
        """The durable position of consumer ``name`` (last seq it has consumed), or None."""
        entry = self._cursors.get(name)
        return entry[0] if entry is not None else None

    async def set_cursor(self, name: str, seq: int, *, pin: bool = False) -> None:
        """Durably store consumer ``name``'s position. ``pin=True`` marks an internal endpoint
        (upstream forwarder, module input): retention keeps what it has not read."""
        if not name:
            raise InvalidRequestError("cursor name must not be empty")
        if seq < 0 or seq > self.last_seq:
            raise InvalidRequestError(f"cursor {name!r}: seq {seq} outside 0..{self.last_seq}")

        def store(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO log_cursors(name, seq, pinned) VALUES (?, ?, ?)"
                " ON CONFLICT(name) DO UPDATE SET seq = excluded.seq, pinned = excluded.pinned",
                (name, seq, int(pin)),
            )

        await self._db.run(store)
        self._cursors[name] = (seq, pin)

    async def delete_cursor(self, name: str) -> None:
        """Forget consumer ``name`` (no error if it does not exist)."""
        await self._db.run(
            lambda conn: conn.execute("DELETE FROM log_cursors WHERE name = ?", (name,))
        )
        self._cursors.pop(name, None)

    async def cursors(self) -> dict[str, int]:
        return {name: seq for name, (seq, _pin) in self._cursors.items()}

    # -- retention -----------------------------------------------------------------------------

    async def prune(self) -> PruneResult:
        """Delete messages older than the retention that every pinning cursor has passed;
        then, over the byte cap under ``drop-oldest``, evict the oldest (even unread by a
        pinning cursor: counted as dropped) until under 90 % of the cap. Works in chunks of
        :data:`CHUNK_ROWS` rows per transaction so appends keep flowing."""
        self._over_cap.clear()
        expired = evicted = dropped = freed = 0
        cutoff_ms = int((self._clock() - self._retention_s) * 1000)
        more = True
        while more:
            upto = min(self._pin_floor(), self.last_seq)  # cursors may move between chunks
            deleted, nbytes, more, first = await self._db.run(
                partial(delete_expired, upto=upto, cutoff_ms=cutoff_ms)
            )
            self._removed(deleted, nbytes, first)
            expired += deleted
            freed += nbytes
        if not self._reject_new and self._bytes > self._max_bytes:
            target = self._max_bytes * 9 // 10
            while self._bytes > target:
                floor = self._pin_floor()
                deleted, nbytes, lost, first = await self._db.run(
                    partial(evict, need=self._bytes - target, upto=self.last_seq, pin_floor=floor)
                )
                if not deleted:
                    break
                self._removed(deleted, nbytes, first)
                evicted += deleted
                dropped += lost
                freed += nbytes
                if lost:
                    self._dropped[DROP_BYTE_CAP] = self._dropped.get(DROP_BYTE_CAP, 0) + lost
            log.warning(
                "store over byte cap: evicted=%d dropped_unread=%d bytes=%d max_bytes=%d",
                evicted,
                dropped,
                self._bytes,
                self._max_bytes,
            )
        return PruneResult(expired=expired, evicted=evicted, dropped=dropped, bytes_freed=freed)

    async def reusable_bytes(self) -> int:
        """Bytes of the database file SQLite keeps free for reuse (deleted rows' pages)."""
        def free(conn: sqlite3.Connection) -> int:
            pages = conn.execute("PRAGMA freelist_count").fetchone()[0]
            return int(pages) * int(conn.execute("PRAGMA page_size").fetchone()[0])

        return await self._db.run(free)

    async def evict_oldest(self, nbytes: int) -> tuple[int, int]:
        """Delete the oldest messages until ``nbytes`` are freed (a full disk: the upstream's
        ``drop-oldest``), unread ones counted as dropped ``byte-cap``. Returns (rows, highest
        seq deleted)."""
        freed = rows = upto = 0
        while freed < nbytes:
            first = self._first_seq
            deleted, size, lost, new_first = await self._db.run(
                partial(evict, need=nbytes - freed, upto=self.last_seq,
                        pin_floor=self._pin_floor()))
            if not deleted:
                break
            self._removed(deleted, size, new_first)
            if lost:
                self._dropped[DROP_BYTE_CAP] = self._dropped.get(DROP_BYTE_CAP, 0) + lost
            freed += size
            rows += deleted
            upto = (new_first[0] - 1) if new_first else self.last_seq
            if first is None:
                break
        return rows, upto

    def _pin_floor(self) -> int:
        """The highest seq every pinning cursor has consumed (last_seq when none pins)."""
        return min((seq for seq, pin in self._cursors.values() if pin), default=self.last_seq)

    def _removed(self, deleted: int, nbytes: int, first: tuple[int, int] | None) -> None:
        self._count -= deleted
        self._bytes -= nbytes
        self._first_seq, self._oldest_ms = first if first is not None else (None, None)

    async def run_retention(self, interval: float = 60.0) -> None:
        """Prune every ``interval`` seconds, and as soon as a commit crosses the byte cap.
        Runs until cancelled (the app owns it in its TaskGroup)."""
        failing = False
        while True:
            try:
                await self.prune()
            except StoreError as exc:
                if not failing:
                    log.error("store retention failing: %s", exc)
                failing = True
                await asyncio.sleep(interval)
                continue
            if failing:
                log.info("store retention recovered")
                failing = False
            try:
                async with asyncio.timeout(interval):
                    await self._over_cap.wait()
            except TimeoutError:
                pass

    def stats(self) -> LogStats:
        return LogStats(
            count=self._count,
            bytes=self._bytes,
            first_seq=self._first_seq,
            last_seq=self.last_seq,
            oldest_enqueued_ms=self._oldest_ms,
            dropped_total=dict(self._dropped),
            rejected=self._rejected,
            appended=self._appended,
            commits=self._commits,
            pending=len(self._rows),
        )


def _call_waiter(fn: Callable[[BaseException | None], None], error: BaseException | None) -> None:
    """One :meth:`MessageLog.append_then` waiter; a failing one must not keep the rest of its
    commit's waiters from being told."""
    try:
        fn(error)
    except Exception:  # noqa: BLE001 - logged; the other waiters still run
        log.exception("commit waiter failed")
