"""One SQLite connection, owned by one dedicated thread, with group commit.

This module is the store's only seam between asyncio and blocking I/O. Callers hand it
*transaction bodies* (``fn(conn) -> T``); the thread runs everything submitted while it was
busy as **one** transaction (``BEGIN IMMEDIATE`` ... ``COMMIT``: one fsync for many callers),
each body under its own ``SAVEPOINT`` so a failing body rolls back alone, and hands all the
outcomes of a batch back to the event loop with a single ``call_soon_threadsafe``.

Durability contract: a future returned by :meth:`Database.submit` resolves only after the
``COMMIT`` holding its body returned. With ``synchronous="full"`` (the default) and WAL that
means the commit record was fsynced, so it survives ``kill -9`` and power loss; with
``"normal"`` it survives ``kill -9`` but the last commits may be lost on power loss
(SQLite docs, "PRAGMA synchronous" and "Write-Ahead Logging").

Schema: components own their tables. A :data:`Migration` is ``(component, [step, ...])``; the
version applied per component is kept in ``schema_versions`` and steps past it run in order,
each in its own transaction. The store's own bootstrap schema is keyed by ``PRAGMA
user_version``.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, Final, Literal, TypeAlias, TypeVar

from gateway.errors import StoreError
from gateway.store.files import private_sqlite_files

__all__ = ["Database", "Migration", "split_statements", "store_error"]

log = logging.getLogger(__name__)

T = TypeVar("T")

Migration: TypeAlias = tuple[str, Sequence[str]]
"""``(component, steps)``: ordered SQL scripts; step *i* brings the component to version *i+1*.
Steps are append-only: never edit or reorder a shipped step, add a new one."""

BUSY_TIMEOUT_MS: Final = 5000
JOURNAL_SIZE_LIMIT: Final = 64 << 20  # the WAL file is truncated back to this after a burst
MAX_BATCH_JOBS: Final = 4096  # bounds the length of one transaction, not the queue
CACHE_KIB: Final = 1024  # SQLite's page cache for this connection (its default: 2000 KiB)

# Bootstrap schema of the store itself, keyed by PRAGMA user_version.
_BOOTSTRAP: Final[tuple[str, ...]] = (
    (
        "CREATE TABLE IF NOT EXISTS schema_versions("
        " component TEXT PRIMARY KEY, version INTEGER NOT NULL) WITHOUT ROWID"
    ),
)

_ERROR_PREFIX: Final[dict[int, str]] = {
    sqlite3.SQLITE_FULL: "disk full",
    sqlite3.SQLITE_IOERR: "I/O error",
    sqlite3.SQLITE_CORRUPT: "database corrupt",
    sqlite3.SQLITE_NOTADB: "not a database",
    sqlite3.SQLITE_BUSY: "database busy",
    sqlite3.SQLITE_LOCKED: "database locked",
    sqlite3.SQLITE_READONLY: "database read-only",
    sqlite3.SQLITE_CANTOPEN: "cannot open database",
    sqlite3.SQLITE_PERM: "permission denied",
    sqlite3.SQLITE_CONSTRAINT: "constraint violated",
}


def store_error(exc: sqlite3.Error, doing: str = "") -> StoreError:
    """Map a sqlite3 error to :class:`StoreError` with a clear message
    (``SQLITE_FULL`` becomes ``"disk full: ..."``)."""
    code = getattr(exc, "sqlite_errorcode", None)
    prefix = _ERROR_PREFIX.get(code & 0xFF, "sqlite error") if code is not None else "sqlite error"
    where = f" ({doing})" if doing else ""
    return StoreError(f"{prefix}: {exc}{where}")


def split_statements(script: str) -> list[str]:
    """Split an SQL script into complete statements (triggers and quoted ``;`` stay whole).

    ``sqlite3`` runs one statement per ``execute`` and ``executescript`` commits first, so
    migration steps are split here and run inside the caller's transaction."""
    out: list[str] = []
    acc = ""
    for part in script.split(";"):
        acc += part + ";"
        if sqlite3.complete_statement(acc):
            if acc.strip(" \t\r\n;"):
                out.append(acc.strip())
            acc = ""
    if acc.strip(" \t\r\n;"):
        raise ValueError(f"incomplete SQL statement: {acc.strip()[:60]!r}")
    return out


class _Job:
    """One submitted transaction body and the future that receives its outcome."""

    __slots__ = ("fn", "future")

    def __init__(self, fn: Callable[[sqlite3.Connection], Any], future: asyncio.Future[Any]):
        self.fn = fn
        self.future = future


class _Then:
    """Stands in for a job's future when the caller gave a function instead
    (:meth:`Database.submit_then`): :func:`_deliver` calls it directly, without a future's
    callback and the loop turn that costs."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[[Any, BaseException | None], None]) -> None:
        self.fn = fn

    def cancelled(self) -> bool:
        return False

    def done(self) -> bool:
        return False

    def set_result(self, value: Any) -> None:
        self._call(value, None)

    def set_exception(self, exc: BaseException) -> None:
        self._call(None, exc)

    def _call(self, value: Any, exc: BaseException | None) -> None:
        try:
            self.fn(value, exc)
        except Exception:  # noqa: BLE001 - the batch's other outcomes must still be delivered
            log.exception("store outcome callback failed")


_STOP: Final = object()
_Outcome: TypeAlias = tuple[asyncio.Future[Any], bool, Any]


class Database:
    """One sqlite3 connection on one thread; awaitable, group-committed transactions.

    Lifecycle: ``await open()`` ... ``await close()``; reusable is not a goal (make a new one).
    Counters (read from any thread, updated by the db thread): :attr:`commits` (successful
    COMMITs) and :attr:`jobs` (bodies run)."""

    def __init__(
        self,
        path: str | Path,
        *,
        synchronous: Literal["full", "normal"] = "full",
        migrations: Sequence[Migration] = (),
    ) -> None:
        if synchronous not in ("full", "normal"):
            raise ValueError(f"synchronous must be 'full' or 'normal', not {synchronous!r}")
        self.path = str(path)
        self.synchronous = synchronous
        self._migrations = tuple(migrations)
        self._queue: queue.SimpleQueue[_Job | object] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._conn: sqlite3.Connection | None = None  # touched only by the db thread
        self._accepting = False
        self._stopped: asyncio.Future[None] | None = None
        self.commits = 0
        self.jobs = 0
        self.on_commit: Callable[[float], None] | None = None  # seconds per COMMIT (metrics)

    # -- lifecycle -------------------------------------------------------------------------

    async def open(self) -> None:
        """Start the thread, open the connection (WAL, synchronous, foreign keys, busy
        timeout), bootstrap the schema and apply the constructor's migrations."""
        if self._thread is not None:
            raise StoreError("database already opened")
        loop = asyncio.get_running_loop()
        self._loop = loop
        opened: asyncio.Future[None] = loop.create_future()
        self._stopped = loop.create_future()
        self._thread = threading.Thread(
            target=self._main, args=(opened,), name=f"sqlite:{Path(self.path).name}", daemon=True
        )
        self._thread.start()
        try:
            await opened
        except BaseException:
            self._queue.put(_STOP)  # in case the connection opened after all
            await asyncio.shield(self._stopped)
            self._thread.join()
            raise
        self._accepting = True
        try:
            for migration in self._migrations:
                await self.migrate(migration)
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Refuse new work, drain what was submitted, checkpoint the WAL, close, join."""
        if self._thread is None or self._stopped is None or not self._accepting:
            return
        self._accepting = False
        self._queue.put(_STOP)
        await asyncio.shield(self._stopped)
        self._thread.join()

    @property
    def is_open(self) -> bool:
        return self._accepting

    # -- work --------------------------------------------------------------------------------

    def submit(self, fn: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        """Queue ``fn`` to run on the db thread inside the next group transaction.

        Returns a future resolved (on the event loop) with ``fn``'s result once the COMMIT
        holding it succeeded, or failed with ``fn``'s exception (sqlite3 errors become
        :class:`StoreError`). Must be called on the loop thread. ``fn`` must only use the
        connection it is given, must not BEGIN/COMMIT/ROLLBACK, and may be called a second
        time if SQLite rolls back the whole batch because another body hit a disk-full or
        I/O error (bodies are transaction bodies: only their last run counts)."""
        loop = self._loop
        if loop is None:
            loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        if not self._accepting:
            future.set_exception(StoreError("database is not open"))
            return future
        self._queue.put(_Job(fn, future))
        return future

    def submit_then(self, fn: Callable[[sqlite3.Connection], T],
                    done: Callable[[T | None, BaseException | None], None]) -> None:
        """:meth:`submit` without a future: ``done(result, None)`` or ``done(None, error)`` is
        called on the loop once the transaction is over (at once if the database is not
        open), in the same pass that settles the rest of its batch."""
        if not self._accepting:
            done(None, StoreError("database is not open"))
            return
        self._queue.put(_Job(fn, _Then(done)))  # type: ignore[arg-type]

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn(conn)`` in its own (savepoint of a group) transaction; see :meth:`submit`."""
        return await self.submit(fn)

    async def migrate(self, migration: Migration) -> int:
        """Apply the steps of ``migration`` past the component's recorded version, in order,
        each in its own transaction. Returns the component's version afterwards."""
        component, steps = migration
        statements = [split_statements(step) for step in steps]
        version = await self.run(lambda conn: _component_version(conn, component))
        if version > len(statements):
            raise StoreError(
                f"schema of {component!r} is at version {version}, newer than this code "
                f"({len(statements)})"
            )
        for number in range(version + 1, len(statements) + 1):
            step = statements[number - 1]
            await self.run(partial(_apply_step, component=component, number=number, step=step))
            log.info("schema migrated component=%s version=%d", component, number)
        return len(statements)

    # -- the db thread -----------------------------------------------------------------------

    def _main(self, opened: asyncio.Future[None]) -> None:
        loop = self._loop
        assert loop is not None
        try:
            self._conn = self._connect()
        except Exception as exc:  # noqa: BLE001 - handed to open()
            err = (
                store_error(exc, f"opening {self.path}") if isinstance(exc, sqlite3.Error) else exc
            )
            loop.call_soon_threadsafe(_settle_exception, opened, err)
            loop.call_soon_threadsafe(_settle_result, self._stopped, None)
            return
        loop.call_soon_threadsafe(_settle_result, opened, None)
        try:
            self._serve()
        finally:
            try:
                self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error as exc:
                log.warning("checkpoint at close failed: %s", exc)
            self._conn.close()
            self._conn = None
            _call_soon(loop, _settle_result, self._stopped, None)

    def _connect(self) -> sqlite3.Connection:
        if self.path != ":memory:":
            private_sqlite_files(Path(self.path))  # messages and sessions: 0600, WAL too
        conn = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=True, cached_statements=256
        )
        try:
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode != "wal" and not (self.path == ":memory:" and mode == "memory"):
                raise StoreError(f"cannot enable WAL on {self.path} (journal_mode={mode})")
            conn.execute(f"PRAGMA synchronous = {self.synchronous.upper()}")
            conn.execute(f"PRAGMA journal_size_limit = {JOURNAL_SIZE_LIMIT}")
            conn.execute(f"PRAGMA cache_size = -{CACHE_KIB}")
            conn.execute("PRAGMA foreign_keys = ON")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > len(_BOOTSTRAP):
                raise StoreError(f"{self.path}: store format {version} is newer than this code")
            if version < len(_BOOTSTRAP):
                conn.execute("BEGIN IMMEDIATE")
                for statement in _BOOTSTRAP[version:]:
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {len(_BOOTSTRAP)}")
                conn.execute("COMMIT")
        except BaseException:
            conn.close()
            raise
        return conn

    def _serve(self) -> None:
        loop = self._loop
        assert loop is not None
        get = self._queue.get
        get_nowait = self._queue.get_nowait
        stopping = False
        while not stopping:
            first = get()
            batch: list[_Job] = []
            item: _Job | object = first
            while True:
                if item is _STOP:
                    stopping = True  # drain what is already queued, then stop
                else:
                    assert isinstance(item, _Job)
                    if not item.future.cancelled():
                        batch.append(item)
                if len(batch) >= MAX_BATCH_JOBS:
                    break
                try:
                    item = get_nowait()
                except queue.Empty:
                    break
            if batch:
                started = time.perf_counter()
                try:
                    outcomes = self._transact(batch)
                except BaseException as exc:  # a bug here must not hang every caller
                    log.exception("store thread failed a batch")
                    if self._conn is not None:
                        _rollback(self._conn)
                    err = StoreError(f"internal store error: {exc!r}")
                    outcomes = [(job.future, False, err) for job in batch]
                hook = self.on_commit
                if hook is not None:
                    hook(time.perf_counter() - started)
                _call_soon(loop, _deliver, outcomes)

    def _transact(self, batch: list[_Job]) -> list[_Outcome]:
        """Run ``batch`` as one transaction; every job gets an outcome, failures stay local.

        Each body runs under ``SAVEPOINT job`` (skipped when the batch holds one body). If a
        failure leaves no transaction open (SQLite rolls the whole transaction back on
        ``SQLITE_FULL``, ``SQLITE_IOERR``, ...), the bodies that had succeeded are run again in
        a fresh transaction; each restart retires at least one failed body."""
        conn = self._conn
        assert conn is not None
        results: list[tuple[bool, Any]] = [(False, None)] * len(batch)
        single = len(batch) == 1
        todo = list(range(len(batch)))
        while todo:
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                err = store_error(exc, "beginning a transaction")
                for index in todo:
                    results[index] = (False, err)
                break
            done: list[int] = []
            restart: list[int] = []
            for position, index in enumerate(todo):
                self.jobs += 1
                try:
                    results[index] = (True, self._run_one(conn, batch[index].fn, single))
                    done.append(index)
                except Exception as exc:  # noqa: BLE001 - handed to the caller
                    results[index] = (False, _mapped(exc))
                    if not conn.in_transaction:
                        restart = done + todo[position + 1 :]
                        break
            todo = restart
        if conn.in_transaction:
            try:
                if single and not results[0][0]:
                    conn.execute("ROLLBACK")
                else:
                    conn.execute("COMMIT")
                    self.commits += 1
            except sqlite3.Error as exc:
                err = store_error(exc, "committing")
                _rollback(conn)
                results = [(False, err) if ok else (ok, value) for ok, value in results]
        return [(job.future, ok, value) for job, (ok, value) in zip(batch, results)]

    @staticmethod
    def _run_one(conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], T], alone: bool) -> T:
        """Run one body; on failure undo exactly its work (or, if that is impossible, the
        whole transaction, which the caller then sees as ``not conn.in_transaction``)."""
        if alone:
            return fn(conn)
        conn.execute("SAVEPOINT job")
        try:
            value = fn(conn)
        except BaseException:
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK TO job")
                    conn.execute("RELEASE job")
                except sqlite3.Error:
                    _rollback(conn)
            raise
        conn.execute("RELEASE job")
        return value


def _rollback(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error:
            log.exception("rollback failed")


def _mapped(exc: Exception) -> Exception:
    return store_error(exc) if isinstance(exc, sqlite3.Error) else exc


def _component_version(conn: sqlite3.Connection, component: str) -> int:
    row = conn.execute(
        "SELECT version FROM schema_versions WHERE component = ?", (component,)
    ).fetchone()
    return int(row[0]) if row else 0


def _apply_step(conn: sqlite3.Connection, component: str, number: int, step: list[str]) -> None:
    if _component_version(conn, component) >= number:  # applied concurrently; nothing to do
        return
    for statement in step:
        conn.execute(statement)
    conn.execute(
        "INSERT INTO schema_versions(component, version) VALUES (?, ?)"
        " ON CONFLICT(component) DO UPDATE SET version = excluded.version",
        (component, number),
    )


def _deliver(outcomes: list[_Outcome]) -> None:
    """On the loop: settle every future of one batch (one wake-up per batch)."""
    for future, ok, value in outcomes:
        if future.done():
            continue
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)


def _settle_result(future: asyncio.Future[Any] | None, value: Any) -> None:
    if future is not None and not future.done():
        future.set_result(value)


def _settle_exception(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Callable[..., None], *args: Any) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # the loop is closed: nobody is left to tell
        log.debug("event loop closed; dropping store outcomes")
