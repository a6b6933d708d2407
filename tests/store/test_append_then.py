"""MessageLog.append_then (the broker's PUBACK path: a callback per commit, no future) and
new_record (the hot path's Record, built through a slotted twin)."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest

from gateway.errors import StoreError, StoreFullError
from gateway.store import Database, MessageLog, Record
from gateway.store.log import new_record
from tests.store.test_message_log import Store, record
from tests.waiting import eventually as until


@pytest.fixture
async def store(tmp_path: Path) -> Store:
    s = await Store(tmp_path / "log.sqlite").open()
    yield s  # type: ignore[misc]
    await s.db.close()


def test_new_record_is_a_record_equal_to_one_built_the_usual_way() -> None:
    fields = ("telemetry", "dev-1", "m", 1_700_000_000_000, '{"a":1}', b"body", ("r1", "r2"),
              ("key", "epoch", 7))
    fast, usual = new_record(*fields), Record(*fields)
    assert type(fast) is Record and fast == usual and hash(fast) == hash(usual)
    assert repr(fast) == repr(usual)
    with pytest.raises(dataclasses.FrozenInstanceError):
        fast.body = b"other"  # type: ignore[misc]
    assert new_record("telemetry", "d", None, 1, "{}", b"") == Record("telemetry", "d", None, 1,
                                                                        "{}", b"")


async def test_append_then_calls_back_once_committed_in_append_order(store: Store) -> None:
    log = store.log
    calls: list[tuple[str, BaseException | None, int]] = []
    first = log.append([record(0)])
    log.append_then([record(1), record(2)], lambda e: calls.append(("a", e, log.last_seq)))
    log.append_then([record(3)], lambda e: calls.append(("b", e, log.last_seq)))
    last = log.append([record(4)])
    assert calls == []  # never before the commit
    assert await first == 1 and await last == 5
    await until(lambda: len(calls) == 2)
    # the log's state is updated before a waiter runs (as a future's callback would see it)
    assert [(name, error) for name, error, _ in calls] == [("a", None), ("b", None)]
    assert all(seen >= 4 for _, _, seen in calls)
    assert [e.seq for e in await log.read(0, 10)] == [1, 2, 3, 4, 5]
    assert log.stats().pending == 0


async def test_append_then_of_nothing_calls_back_at_once(store: Store) -> None:
    calls: list[BaseException | None] = []
    store.log.append_then([], calls.append)
    assert calls == [None]


async def test_append_then_refused_over_the_cap_calls_back_at_once(tmp_path: Path) -> None:
    s = await Store(tmp_path / "cap.sqlite", max_bytes=500, overflow="reject-new").open()
    calls: list[BaseException | None] = []
    s.log.append_then([record(1, size=1000)], calls.append)
    assert len(calls) == 1 and isinstance(calls[0], StoreFullError)
    assert s.log.stats().rejected == 1 and s.log.stats().pending == 0
    await s.db.close()


async def test_append_then_before_open_or_after_close_reports_store_error(tmp_path: Path) -> None:
    db = Database(tmp_path / "x.sqlite")
    log = MessageLog(db)
    calls: list[BaseException | None] = []
    log.append_then([record(1)], calls.append)
    assert len(calls) == 1 and type(calls[0]) is StoreError
    await db.open()
    await log.open()
    await db.close()
    log.append_then([record(2)], calls.append)
    await until(lambda: len(calls) == 2)
    assert isinstance(calls[1], StoreError) and log.stats().pending == 0


async def test_a_failing_waiter_does_not_keep_the_others_from_being_told(store: Store) -> None:
    log = store.log
    calls: list[BaseException | None] = []

    def bad(_: BaseException | None) -> None:
        raise RuntimeError("a bug in one caller")

    log.append_then([record(1)], bad)
    log.append_then([record(2)], calls.append)
    later = log.append([record(3)])
    assert await later == 3
    await until(lambda: calls == [None])


async def test_a_failed_commit_tells_every_waiter(store: Store) -> None:
    log, db = store.log, store.db
    await log.append([record(0)])
    pages = await db.run(lambda conn: conn.execute("PRAGMA page_count").fetchone()[0])
    await db.run(lambda conn: conn.execute(f"PRAGMA max_page_count = {pages + 2}"))
    calls: list[BaseException | None] = []
    for i in range(3):
        log.append_then([record(10 + i, size=20000)], calls.append)
    future = log.append([record(20, size=20000)])
    with pytest.raises(StoreError):
        await future
    await until(lambda: len(calls) == 3)
    assert all(isinstance(c, StoreError) for c in calls)
    assert log.stats().pending == 0
    await asyncio.sleep(0)


@pytest.mark.parametrize("count", [1, 63, 64, 65, 200])
async def test_batches_of_any_size_keep_order_and_seqs_also_after_the_log_empties(
    tmp_path: Path, count: int
) -> None:
    """Chunks of INSERT_CHUNK rows go in as one multi-row INSERT, the rest row by row; the
    first row of an empty table takes the seq after the kept high-water mark."""
    from tests.store.test_message_log import Clock

    clock = Clock()
    s = await Store(tmp_path / "log.sqlite", retention_s=60, clock=clock).open()
    log = s.log
    await log.append([record(i, clock=clock) for i in range(3)])
    clock.now += 61
    await log.prune()
    assert log.stats().count == 0
    batch = [record(100 + i, clock=clock, module_id=f"m{i}" if i % 2 else None,
                    routes=("a", "b") if i % 3 else ()) for i in range(count)]
    assert await log.append(batch) == 3 + count
    assert await log.append(batch[:count]) == 3 + 2 * count  # a non-empty table this time
    entries = await log.read(0, limit=1000)
    assert [e.seq for e in entries] == list(range(4, 4 + 2 * count))
    got = [(e.device_id, e.module_id, e.props, e.body, e.routes) for e in entries]
    want = [(r.device_id, r.module_id, r.props, r.body, r.routes) for r in batch] * 2
    assert got == want
    await s.db.close()
