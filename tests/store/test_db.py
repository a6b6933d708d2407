"""Database: the one-thread connection, group commit, per-caller isolation, error mapping,
migrations."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from gateway.errors import StoreError
from gateway.store.db import Database, split_statements
from tests.dbheld import held

SCHEMA = ("t", ["CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT NOT NULL UNIQUE)"])


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    database = Database(tmp_path / "db.sqlite", migrations=[SCHEMA])
    await database.open()
    yield database
    await database.close()


def insert(value: str) -> Callable[[sqlite3.Connection], int]:
    def job(conn: sqlite3.Connection) -> int:
        return conn.execute("INSERT INTO t(v) VALUES (?)", (value,)).lastrowid or 0

    return job


def values(conn: sqlite3.Connection) -> list[str]:
    return [v for (v,) in conn.execute("SELECT v FROM t ORDER BY id")]


async def test_open_sets_wal_synchronous_foreign_keys_and_busy_timeout(tmp_path: Path) -> None:
    for mode, level in (("full", 2), ("normal", 1)):
        db = Database(tmp_path / f"{mode}.sqlite", synchronous=mode)  # type: ignore[arg-type]
        await db.open()

        def pragmas(conn: sqlite3.Connection) -> tuple[object, ...]:
            return tuple(
                conn.execute(f"PRAGMA {name}").fetchone()[0]
                for name in ("journal_mode", "synchronous", "foreign_keys", "busy_timeout")
            )

        assert await db.run(pragmas) == ("wal", level, 1, 5000)
        await db.close()


async def test_run_returns_the_result_after_commit(db: Database) -> None:
    assert await db.run(insert("a")) == 1
    assert await db.run(values) == ["a"]


async def test_run_reraises_the_callers_own_exception_and_rolls_back(db: Database) -> None:
    def fails(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO t(v) VALUES ('gone')")
        raise KeyError("mine")

    with pytest.raises(KeyError, match="mine"):
        await db.run(fails)
    assert await db.run(values) == []


async def test_sqlite_errors_become_store_errors_with_a_clear_message(db: Database) -> None:
    await db.run(insert("a"))
    with pytest.raises(StoreError, match="^constraint violated: UNIQUE constraint failed"):
        await db.run(insert("a"))
    with pytest.raises(StoreError, match="^sqlite error: no such table: nope"):
        await db.run(lambda conn: conn.execute("SELECT * FROM nope"))


async def test_concurrent_callers_share_one_commit(db: Database) -> None:
    async with held(db):
        before = db.commits
        futures = [db.submit(insert(f"v{i}")) for i in range(200)]
    assert sorted(await asyncio.gather(*futures)) == list(range(1, 201))
    # the blocker's batch and one batch for all 200 callers
    assert db.commits - before == 2


def half_done(conn: sqlite3.Connection) -> None:
    insert("half")(conn)
    raise ZeroDivisionError("after writing")


async def test_a_failing_caller_does_not_poison_its_batch(db: Database) -> None:
    await db.run(insert("taken"))
    async with held(db):
        before = db.commits
        first = db.submit(insert("a"))
        bad = db.submit(insert("taken"))  # UNIQUE violation
        worse = db.submit(half_done)  # wrote a row, then failed: its row must go
        last = db.submit(insert("b"))
    assert await first == 2
    with pytest.raises(StoreError, match="UNIQUE"):
        await bad
    with pytest.raises(ZeroDivisionError):
        await worse
    assert await last == 3  # half_done's row (rowid 3) was rolled back
    assert db.commits - before == 2
    assert await db.run(values) == ["taken", "a", "b"]


async def test_disk_full_maps_to_store_error_and_rolls_back_only_that_caller(
    db: Database,
) -> None:
    pages = await db.run(lambda conn: conn.execute("PRAGMA page_count").fetchone()[0])
    await db.run(lambda conn: conn.execute(f"PRAGMA max_page_count = {pages + 4}"))
    calls: list[str] = []

    def counted(value: str) -> Callable[[sqlite3.Connection], int]:
        def job(conn: sqlite3.Connection) -> int:
            calls.append(value)
            return insert(value)(conn)

        return job

    async with held(db):
        small = db.submit(counted("small"))
        huge = db.submit(insert("x" * 200_000))  # SQLITE_FULL rolls back the whole batch
        after = db.submit(counted("after"))
    with pytest.raises(StoreError, match=r"^disk full: database or disk is full"):
        await huge
    assert await small > 0
    assert await after > 0
    assert calls == ["small", "small", "after"]  # the survivor ran again in a new transaction
    assert await db.run(values) == ["small", "after"]
    # and the store keeps working
    await db.run(lambda conn: conn.execute("PRAGMA max_page_count = 1073741823"))
    await db.run(insert("y" * 200_000))
    assert len(await db.run(values)) == 3


async def test_close_drains_pending_work_and_refuses_new_work(tmp_path: Path) -> None:
    db = Database(tmp_path / "db.sqlite", migrations=[SCHEMA])
    await db.open()
    pending = [db.submit(insert(f"v{i}")) for i in range(50)]
    await db.close()
    assert all(f.done() and not f.exception() for f in pending)
    with pytest.raises(StoreError, match="not open"):
        await db.run(values)
    assert not (tmp_path / "db.sqlite-wal").exists() or (
        (tmp_path / "db.sqlite-wal").stat().st_size == 0
    )  # checkpointed
    again = Database(tmp_path / "db.sqlite")
    await again.open()
    assert len(await again.run(values)) == 50
    await again.close()


async def test_open_fails_with_store_error_on_a_file_that_is_not_a_database(
    tmp_path: Path,
) -> None:
    path = tmp_path / "junk.sqlite"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match="not a database|database corrupt"):
        await Database(path).open()


async def test_memory_database_works_for_tests() -> None:
    db = Database(":memory:", migrations=[SCHEMA])
    await db.open()
    await db.run(insert("a"))
    assert await db.run(values) == ["a"]
    await db.close()


async def test_migrations_apply_in_order_once_per_component(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    one = ("twins", ["CREATE TABLE twins(id TEXT PRIMARY KEY)"])
    other = ("ids", ["CREATE TABLE ids(id TEXT PRIMARY KEY); INSERT INTO ids VALUES ('a;b')"])
    db = Database(path, migrations=[one, other])
    await db.open()
    await db.close()

    two = ("twins", [*one[1], "ALTER TABLE twins ADD COLUMN version INTEGER NOT NULL DEFAULT 1"])
    db = Database(path, migrations=[two, other])
    await db.open()  # only the new step runs; re-running step 1 would fail (table exists)

    def versions(conn: sqlite3.Connection) -> dict[str, int]:
        return dict(conn.execute("SELECT component, version FROM schema_versions"))

    assert await db.run(versions) == {"twins": 2, "ids": 1}
    assert await db.run(lambda conn: conn.execute("SELECT id FROM ids").fetchall()) == [("a;b",)]
    await db.run(lambda conn: conn.execute("INSERT INTO twins(id) VALUES ('d')"))
    assert await db.migrate(two) == 2
    await db.close()


async def test_a_failing_migration_step_rolls_back_and_raises(tmp_path: Path) -> None:
    db = Database(tmp_path / "db.sqlite")
    await db.open()
    broken = ("x", ["CREATE TABLE x(a); CREATE TABLE x(b)"])
    with pytest.raises(StoreError, match="already exists"):
        await db.migrate(broken)
    fixed = ("x", ["CREATE TABLE x(a)"])
    assert await db.migrate(fixed) == 1
    await db.close()


async def test_a_schema_newer_than_the_code_is_refused(tmp_path: Path) -> None:
    db = Database(tmp_path / "db.sqlite", migrations=[("x", ["CREATE TABLE a(x)", "SELECT 1"])])
    await db.open()
    with pytest.raises(StoreError, match="newer than this code"):
        await db.migrate(("x", ["CREATE TABLE a(x)"]))
    await db.close()


def test_split_statements_keeps_triggers_and_quoted_semicolons_whole() -> None:
    script = """
        CREATE TABLE a(x TEXT);
        CREATE TRIGGER tr AFTER INSERT ON a BEGIN
            INSERT INTO a VALUES ('x;y'); SELECT 1;
        END;
        INSERT INTO a VALUES ('p;q')
    """
    assert [s.split()[0:2] for s in split_statements(script)] == [
        ["CREATE", "TABLE"],
        ["CREATE", "TRIGGER"],
        ["INSERT", "INTO"],
    ]
    with pytest.raises(ValueError, match="incomplete"):
        split_statements("INSERT INTO a VALUES ('open")


async def test_a_call_cancelled_before_its_batch_starts_never_runs(db: Database) -> None:
    async with held(db):
        cancelled = db.submit(insert("never"))
        kept = db.submit(insert("kept"))
        cancelled.cancel()
    assert await kept == 1
    assert await db.run(values) == ["kept"]


async def test_submit_then_calls_back_in_the_batch_with_futures_around_it(db: Database) -> None:
    """submit_then: no future; the function gets (result, None) or (None, error) in the same
    pass as the batch's futures, and one that raises does not keep the others from theirs."""
    seen: list[tuple[object, object]] = []

    def broken(_value: object, _exc: object) -> None:
        raise RuntimeError("a bug in one caller")

    async with held(db):
        first = db.submit(insert("a"))
        db.submit_then(insert("b"), lambda v, e: seen.append((v, e)))
        db.submit_then(insert("c"), broken)
        db.submit_then(insert("a"), lambda v, e: seen.append((v, type(e))))  # UNIQUE violation
        last = db.submit(insert("d"))
        assert seen == []
    assert await first == 1 and await last == 4
    assert seen == [(2, None), (None, StoreError)]
    assert await db.run(values) == ["a", "b", "c", "d"]
    await db.close()
    db.submit_then(insert("e"), lambda v, e: seen.append((v, str(e))))
    assert seen[-1] == (None, "database is not open")
