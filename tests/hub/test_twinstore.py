"""The durable twin store: memory served, written through to SQLite, one writer per twin."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from gateway.errors import (
    InvalidRequestError,
    NotFoundError,
    PreconditionFailedError,
    StoreError,
)
from gateway.hub.twins import format_time
from gateway.hub.twinstore import TwinStore
from gateway.store.db import Database
from tests.dbheld import held

T0 = 1_717_243_200.0


class Clock:
    """Epoch seconds that advance by one per reading."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        self.now += 1
        return self.now


@asynccontextmanager
async def opened(path: Path, clock: Callable[[], float] | None = None,
                 ) -> AsyncIterator[tuple[Database, TwinStore]]:
    db = Database(path)
    await db.open()
    store = TwinStore(db, clock=clock or Clock())
    try:
        await store.open()
        yield db, store
    finally:
        await db.close()


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[TwinStore]:
    async with opened(tmp_path / "hub.db") as (_, twin_store):
        yield twin_store


def rows(path: Path) -> list[tuple[Any, ...]]:
    """The table as another process would see it."""
    with sqlite3.connect(path) as conn:
        return conn.execute(
            "SELECT device_id, module_id, version, reported_version, desired_version FROM twins"
            " ORDER BY device_id, module_id").fetchall()


# --- create, read, delete ---------------------------------------------------------------------

async def test_ensure_creates_an_empty_twin_once(store: TwinStore) -> None:
    assert store.get("devA") is None
    twin = await store.ensure("devA")
    assert twin.version == 1 and twin.reported == {} and store.get("devA") is twin
    assert await store.ensure("devA") is twin
    module = await store.ensure("devA", "m1")
    assert module.module_id == "m1" and store.get("devA", "m1") is module
    assert len(store) == 2 and store.module_twins("devA") == [module]


async def test_every_change_to_what_get_returns_is_counted(store: TwinStore) -> None:
    """The router looks a twin up again only when this count moved (gateway.routing.router)."""
    seen = store.changes
    twin = await store.ensure("devA")
    assert store.changes > seen
    seen = store.changes
    assert store.get("devA") is twin and store.changes == seen  # reads count nothing
    changed, _ = await store.update_reported("devA", None, {"t": 1})
    assert store.changes > seen and store.get("devA") is changed is not twin  # a new object
    seen = store.changes
    await store.delete("devA")
    assert store.changes > seen and store.get("devA") is None


async def test_concurrent_ensure_creates_one_twin(tmp_path: Path) -> None:
    async with opened(tmp_path / "hub.db") as (_, store):
        made = await asyncio.gather(*(store.ensure("devA") for _ in range(10)))
        assert all(twin is made[0] for twin in made)
    assert rows(tmp_path / "hub.db") == [("devA", "", 1, 1, 1)]


async def test_deleting_a_device_deletes_its_module_twins(tmp_path: Path) -> None:
    async with opened(tmp_path / "hub.db") as (_, store):
        for device, module in (("devA", None), ("devA", "m1"), ("devA", "m2"), ("devB", None),
                               ("devB", "m1")):
            await store.ensure(device, module)
        await store.delete("devB", "m1")
        assert store.get("devB", "m1") is None and store.get("devB") is not None
        await store.delete("devA")
        assert [store.get("devA", m) for m in (None, "m1", "m2")] == [None, None, None]
        await store.delete("devA")  # already gone: fine
        await store.delete("nobody", "m9")
    assert rows(tmp_path / "hub.db") == [("devB", "", 1, 1, 1)]
    async with opened(tmp_path / "hub.db") as (_, store):
        assert len(store) == 1 and store.get("devB") is not None


async def test_writing_a_missing_twin_is_not_found(store: TwinStore) -> None:
    with pytest.raises(NotFoundError, match="twin 'ghost' does not exist"):
        await store.update_reported("ghost", None, {"a": 1})
    with pytest.raises(NotFoundError, match="twin 'ghost/m1' does not exist"):
        await store.update_desired("ghost", "m1", {"tags": {}})


# --- writes and persistence ---------------------------------------------------------------------

async def test_twins_survive_a_reopen_exactly(tmp_path: Path) -> None:
    clock = Clock()
    async with opened(tmp_path / "hub.db", clock) as (_, store):
        await store.ensure("devA")
        await store.ensure("devA", "m1")
        await store.update_reported("devA", None, {"battery": 55, "cfg": {"a": [1, 2]}})
        twin, change, push = await store.update_desired(
            "devA", None, {"tags": {"site": "43"}, "properties": {"desired": {"f": "5m"}}},
            if_match="*")
        assert push == {"f": "5m", "$version": 2}
        assert change["version"] == 3 == twin.version
        await store.update_desired("devA", "m1", {"properties": {"desired": {"x": {"y": 1}}}},
                                   replace=True)
        await store.update_reported("devA", "m1", {"é": "€ and ünïcode"})
        before = {key: store.get(*key) for key in (("devA", None), ("devA", "m1"))}
    async with opened(tmp_path / "hub.db", clock) as (_, store):
        for key, saved in before.items():
            assert saved is not None and store.get(*key) == saved
        loaded = store.get("devA")
        assert loaded is not None and loaded.device_view() == {
            "desired": {"f": "5m", "$version": 2},
            "reported": {"battery": 55, "cfg": {"a": [1, 2]}, "$version": 2}}
        assert loaded.reported_meta["battery"] == {"$lastUpdated": format_time(T0 + 3)}
        again, _ = await store.update_reported("devA", None, {"battery": 54})
        assert (again.version, again.reported_version) == (4, 3)


async def test_a_write_returns_the_committed_twin_and_its_notification(store: TwinStore) -> None:
    await store.ensure("devA")
    twin, change = await store.update_reported("devA", None, {"a": 1}, expected_version=1)
    assert store.get("devA") is twin
    assert change["properties"]["reported"]["$version"] == twin.reported_version == 2
    with pytest.raises(PreconditionFailedError):
        await store.update_reported("devA", None, {"a": 2}, expected_version=1)
    replaced, whole, push = await store.update_desired(
        "devA", None, {"properties": {"desired": {"d": 1}}}, if_match=twin.etag, replace=True)
    assert whole == replaced.document() and push == {"d": 1, "$version": 2}


async def test_only_the_changed_columns_are_rewritten(tmp_path: Path) -> None:
    async with opened(tmp_path / "hub.db") as (db, store):
        await store.ensure("devA")
        await store.update_desired("devA", None, {"properties": {"desired": {"d": 1}}})

        def watch(conn: sqlite3.Connection) -> None:
            conn.execute("CREATE TABLE seen(col TEXT)")
            for column in ("tags", "desired", "desired_meta", "reported", "reported_meta"):
                conn.execute(f"CREATE TRIGGER t_{column} AFTER UPDATE OF {column} ON twins"
                             f" BEGIN INSERT INTO seen VALUES ('{column}'); END")

        await db.run(watch)
        await store.update_reported("devA", None, {"r": 1})
        await store.update_desired("devA", None, {"tags": {"t": 1}})
        await store.update_desired("devA", None, {"properties": {"desired": {"d": 2}}})
        seen = await db.run(lambda c: [col for (col,) in c.execute("SELECT col FROM seen")])
        assert sorted(seen) == ["desired", "desired_meta", "reported", "reported_meta", "tags"]


async def test_refused_writes_change_nothing_and_release_the_twin(tmp_path: Path) -> None:
    async with opened(tmp_path / "hub.db") as (_, store):
        await store.ensure("devA")
        ok, _ = await store.update_reported("devA", None, {"a": 1})
        with pytest.raises(InvalidRequestError, match="over the limit of 32768"):
            await store.update_reported("devA", None, {f"k{i}": "x" * 4096 for i in range(9)})
        with pytest.raises(PreconditionFailedError):
            await store.update_desired("devA", None, {"tags": {"t": 1}}, if_match="stale")
        assert store.get("devA") is ok
        after, _ = await store.update_reported("devA", None, {"b": 2})
        assert after.reported == {"a": 1, "b": 2}
    assert rows(tmp_path / "hub.db") == [("devA", "", 3, 3, 1)]


async def test_a_failed_commit_leaves_memory_as_it_was(tmp_path: Path) -> None:
    async with opened(tmp_path / "hub.db") as (db, store):
        await store.ensure("devA")
        await db.run(lambda c: c.execute(
            "CREATE TRIGGER no_more BEFORE UPDATE ON twins BEGIN SELECT RAISE(ABORT, 'boom'); END"))
        before = store.get("devA")
        with pytest.raises(StoreError, match="boom"):
            await store.update_reported("devA", None, {"a": 1})
        assert store.get("devA") is before
        await db.run(lambda c: c.execute("DROP TRIGGER no_more"))
        twin, _ = await store.update_reported("devA", None, {"a": 1})
        assert twin.reported_version == 2


async def test_memory_changes_only_after_the_commit(tmp_path: Path) -> None:
    async with opened(tmp_path / "hub.db") as (db, store):
        first = await store.ensure("devA")
        async with held(db):
            write = asyncio.ensure_future(store.update_reported("devA", None, {"a": 1}))
            await asyncio.sleep(0.05)
            assert not write.done() and store.get("devA") is first
        twin, _ = await write
        assert store.get("devA") is twin and twin.reported == {"a": 1}


# --- writes to one twin are chained -------------------------------------------------------------------------

async def test_concurrent_reported_patches_are_serialized(tmp_path: Path) -> None:
    count = 50
    async with opened(tmp_path / "hub.db") as (db, store):
        await store.ensure("devA")
        await store.ensure("devB")
        results = await asyncio.gather(*(
            store.update_reported(device, None, {f"k{i}": i})
            for i in range(count) for device in ("devA", "devB")))
        for device in ("devA", "devB"):
            versions = [twin.reported_version for twin, _ in results if twin.device_id == device]
            assert versions == list(range(2, count + 2))  # in call order, none skipped
            final = store.get(device)
            assert final is not None and final.reported == {f"k{i}": i for i in range(count)}
        assert db.commits < 2 * count  # different twins shared transactions
    assert rows(tmp_path / "hub.db") == [("devA", "", count + 1, count + 1, 1),
                                         ("devB", "", count + 1, count + 1, 1)]


async def test_two_writers_with_the_same_etag_one_wins(store: TwinStore) -> None:
    twin = await store.ensure("devA")
    outcomes = await asyncio.gather(
        store.update_desired("devA", None, {"properties": {"desired": {"w": 1}}},
                             if_match=twin.etag),
        store.update_desired("devA", None, {"properties": {"desired": {"w": 2}}},
                             if_match=twin.etag),
        return_exceptions=True)
    assert isinstance(outcomes[1], PreconditionFailedError)
    assert not isinstance(outcomes[0], BaseException)
    final = store.get("devA")
    assert final is not None and final.desired == {"w": 1} and final.desired_version == 2


async def test_a_cancelled_caller_does_not_lose_or_fork_the_write(tmp_path: Path) -> None:
    async with opened(tmp_path / "hub.db") as (db, store):
        await store.ensure("devA")
        async with held(db):
            first = asyncio.ensure_future(store.update_reported("devA", None, {"a": 1}))
            second = asyncio.ensure_future(store.update_reported("devA", None, {"b": 2}))
            await asyncio.sleep(0.05)
            first.cancel()
            await asyncio.sleep(0.05)
        with pytest.raises(asyncio.CancelledError):
            await first
        twin, _ = await second
        assert twin.reported == {"a": 1, "b": 2} and twin.reported_version == 3
    assert rows(tmp_path / "hub.db") == [("devA", "", 3, 3, 1)]


async def test_delete_waits_for_writes_in_flight_and_wins(tmp_path: Path) -> None:
    async with opened(tmp_path / "hub.db") as (db, store):
        await store.ensure("devA")
        await store.ensure("devA", "m1")
        async with held(db):
            write = asyncio.ensure_future(store.update_reported("devA", "m1", {"a": 1}))
            await asyncio.sleep(0.01)
            gone = asyncio.ensure_future(store.delete("devA"))
            late = asyncio.ensure_future(store.update_reported("devA", "m1", {"b": 1}))
            await asyncio.sleep(0.05)
        await write
        await gone
        with pytest.raises(NotFoundError):
            await late
        assert len(store) == 0
    assert rows(tmp_path / "hub.db") == []


async def test_head_entries_are_dropped_when_idle(store: TwinStore) -> None:
    await store.ensure("devA")
    await asyncio.gather(*(store.update_reported("devA", None, {"a": i}) for i in range(5)))
    with pytest.raises(InvalidRequestError):
        await store.update_reported("devA", None, {"bad key": 1})
    await store.delete("devA")
    assert store._heads == {}


async def test_writes_to_one_twin_share_a_commit(tmp_path: Path) -> None:
    """A device with patches outstanding gets them into one transaction, in order."""
    async with opened(tmp_path / "hub.db") as (db, store):
        await store.ensure("devA")
        async with held(db):
            commits = db.commits
            writes = [asyncio.ensure_future(store.update_reported("devA", None, {"n": i}))
                      for i in range(20)]
            await asyncio.sleep(0.05)
            assert store.get("devA").reported_version == 1  # type: ignore[union-attr]
        results = await asyncio.gather(*writes)
        assert [t.reported_version for t, _ in results] == list(range(2, 22))
        assert db.commits - commits <= 2  # the blocker's transaction and one for all 20
        assert store.get("devA") is results[-1][0]
    assert rows(tmp_path / "hub.db") == [("devA", "", 21, 21, 1)]


async def test_a_failed_write_fails_the_writes_chained_on_it_and_no_more(tmp_path: Path) -> None:
    async with opened(tmp_path / "hub.db") as (db, store):
        await store.ensure("devA")
        first, _ = await store.update_reported("devA", None, {"a": 1})
        await db.run(lambda c: c.execute(
            "CREATE TRIGGER once BEFORE UPDATE ON twins WHEN NEW.reported_version = 3"
            " BEGIN SELECT RAISE(ABORT, 'boom'); END"))
        async with held(db):
            failing = asyncio.ensure_future(store.update_reported("devA", None, {"b": 1}))
            chained = asyncio.ensure_future(store.update_reported("devA", None, {"c": 1}))
            await asyncio.sleep(0.05)
        with pytest.raises(StoreError, match="boom"):
            await failing
        with pytest.raises(NotFoundError, match="changed underneath"):
            await chained
        assert store.get("devA") is first and store._heads == {}
        await db.run(lambda c: c.execute("DROP TRIGGER once"))
        twin, _ = await store.update_reported("devA", None, {"d": 1})
        assert twin.reported == {"a": 1, "d": 1} and twin.reported_version == 3
    assert rows(tmp_path / "hub.db") == [("devA", "", 3, 3, 1)]

