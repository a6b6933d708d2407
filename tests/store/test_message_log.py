"""MessageLog: durable appends with group commit, reads, cursors, waiting, retention, byte cap."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from gateway.errors import InvalidRequestError, StoreError, StoreFullError
from gateway.store import Database, Entry, MessageLog, Record
from tests.dbheld import held
from tests.waiting import eventually as until


class Clock:
    """A settable wall clock (seconds)."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def record(i: int, *, clock: Clock | None = None, size: int = 200, **kw: Any) -> Record:
    fields: dict[str, Any] = {
        "kind": "telemetry",
        "device_id": f"dev{i % 3}",
        "module_id": None,
        "enqueued_ms": int((clock() if clock else 1_700_000_000.0) * 1000),
        "props": f'{{"i":{i}}}',
        "body": (f"body-{i}-".encode() * size)[:size],
    }
    fields.update(kw)
    return Record(**fields)


class Store:
    """An opened Database + MessageLog that can be reopened on the same file."""

    def __init__(self, path: Path, **log_args: Any) -> None:
        self.path = path
        self.log_args = log_args
        self.db = Database(path)
        self.log = MessageLog(self.db, **log_args)

    async def open(self) -> Store:
        await self.db.open()
        await self.log.open()
        return self

    async def reopen(self, **log_args: Any) -> Store:
        await self.db.close()
        return await Store(self.path, **(log_args or self.log_args)).open()


@pytest.fixture
async def clock() -> Clock:
    return Clock()


@pytest.fixture
async def store(tmp_path: Path, clock: Clock) -> AsyncIterator[Store]:
    s = await Store(tmp_path / "log.sqlite", retention_s=60, clock=clock).open()
    yield s
    await s.db.close()


# -- append and read ---------------------------------------------------------------------------


async def test_append_resolves_with_the_seq_of_the_last_record(store: Store) -> None:
    log = store.log
    assert await log.append([record(1)]) == 1
    assert await log.append([record(2), record(3), record(4)]) == 4
    assert await log.append([]) == 4
    assert log.last_seq == 4
    entries = await log.read(0)
    assert [e.seq for e in entries] == [1, 2, 3, 4]
    r = record(3)
    assert entries[2] == Entry(3, r.kind, r.device_id, r.module_id, r.enqueued_ms, r.props, r.body)


async def test_read_filters_by_position_device_and_kind(store: Store) -> None:
    log = store.log
    await log.append(
        [record(i, kind="lifecycle" if i % 4 == 0 else "telemetry") for i in range(1, 21)]
    )
    assert [e.seq for e in await log.read(15)] == [16, 17, 18, 19, 20]
    assert [e.seq for e in await log.read(0, limit=3)] == [1, 2, 3]
    assert [e.seq for e in await log.read(0, device_id="dev1")] == [1, 4, 7, 10, 13, 16, 19]
    assert [e.seq for e in await log.read(0, kinds={"lifecycle"})] == [4, 8, 12, 16, 20]
    assert [e.seq for e in await log.read(5, device_id="dev0", kinds=["lifecycle"])] == [12]
    assert await log.read(0, kinds=()) == []
    assert await log.read(20) == []
    with pytest.raises(InvalidRequestError):
        await log.read(0, limit=0)


async def test_read_never_returns_rows_not_yet_committed(store: Store) -> None:
    log = store.log
    await log.append([record(i) for i in range(5)])
    async with held(store.db):
        appended = log.append([record(9)])  # its writer runs before the read, same transaction
        reading = asyncio.ensure_future(log.read(0))
        await asyncio.sleep(0)
    assert [e.seq for e in await reading] == [1, 2, 3, 4, 5]
    assert await appended == 6


async def test_concurrent_appenders_coalesce_into_few_commits(store: Store) -> None:
    log = store.log

    async def appender(n: int) -> list[int]:
        return [await log.append([record(n * 1000 + i)]) for i in range(30)]

    seqs = await asyncio.gather(*(appender(n) for n in range(100)))
    stats = log.stats()
    assert sorted(s for chunk in seqs for s in chunk) == list(range(1, 3001))
    assert stats.appended == 3000 and stats.count == 3000
    assert stats.commits <= 3000 // 20, stats.commits  # ~one commit per round of 100


async def test_many_appends_in_one_tick_share_one_transaction(store: Store) -> None:
    log = store.log
    async with held(store.db):
        futures = [log.append([record(i), record(i)]) for i in range(500)]
    assert await asyncio.gather(*futures) == list(range(2, 1001, 2))
    assert log.stats().commits == 1


async def test_stats_track_count_bytes_and_bounds(store: Store, clock: Clock) -> None:
    log = store.log
    assert log.stats().first_seq is None and log.stats().bytes == 0
    records = [record(i, clock=clock, size=100 + i) for i in range(10)]
    await log.append(records)
    stats = log.stats()
    assert stats.count == 10
    assert stats.bytes == sum(len(r.body) + len(r.props) for r in records)
    assert (stats.first_seq, stats.last_seq) == (1, 10)
    assert stats.oldest_enqueued_ms == int(clock() * 1000)
    assert stats.pending == 0
    again = await store.reopen()
    reopened = again.log.stats()
    assert (reopened.count, reopened.bytes, reopened.first_seq, reopened.last_seq) == (
        10,
        stats.bytes,
        1,
        10,
    )
    await again.db.close()


async def test_append_before_open_or_after_close_fails_with_store_error(tmp_path: Path) -> None:
    db = Database(tmp_path / "x.sqlite")
    log = MessageLog(db)
    with pytest.raises(StoreError, match="not open"):
        await log.append([record(1)])
    await db.open()
    await log.open()
    await log.append([record(1)])
    await db.close()
    with pytest.raises(StoreError, match="not open"):
        await log.append([record(2)])
    assert log.stats().pending == 0


# -- disk full ---------------------------------------------------------------------------------


async def test_disk_full_fails_the_append_and_the_store_keeps_working(store: Store) -> None:
    log, db = store.log, store.db
    await log.append([record(i) for i in range(10)])
    pages = await db.run(lambda conn: conn.execute("PRAGMA page_count").fetchone()[0])
    await db.run(lambda conn: conn.execute(f"PRAGMA max_page_count = {pages + 8}"))
    failure: StoreError | None = None
    for i in range(100):
        try:
            await log.append([record(100 + i, size=4000)])
        except StoreError as exc:
            failure = exc
            break
    assert failure is not None and type(failure) is StoreError
    assert str(failure).startswith("disk full: ")
    stats = log.stats()
    assert stats.pending == 0
    assert stats.count == 10 + i and stats.last_seq == 10 + i
    assert stats.bytes == sum(len(e.body) + len(e.props) for e in await log.read(0, 1000))

    await db.run(lambda conn: conn.execute("PRAGMA max_page_count = 1073741823"))
    assert await log.append([record(999, size=4000)]) == 11 + i
    assert [e.seq for e in await log.read(0, 1000)] == list(range(1, 12 + i))


# -- waiting -------------------------------------------------------------------------------------


async def test_wait_beyond_wakes_on_commit_and_times_out(store: Store) -> None:
    log = store.log
    assert await log.wait_beyond(0, timeout=0.01) is False
    waiter = asyncio.ensure_future(log.wait_beyond(0))
    other = asyncio.ensure_future(log.wait_beyond(0, timeout=10))
    await asyncio.sleep(0.05)
    assert not waiter.done()
    await log.append([record(1)])
    async with asyncio.timeout(1):
        assert await waiter is True
        assert await other is True
    assert await log.wait_beyond(0) is True  # already beyond: immediate
    assert await log.wait_beyond(1, timeout=0.01) is False


# -- cursors -------------------------------------------------------------------------------------


async def test_cursors_survive_reopen(store: Store) -> None:
    log = store.log
    await log.append([record(i) for i in range(10)])
    await log.set_cursor("$upstream", 4, pin=True)
    await log.set_cursor("events/$Default", 7)
    await log.set_cursor("events/cg2", 2)
    await log.delete_cursor("events/cg2")
    await log.delete_cursor("never-existed")
    assert await log.get_cursor("$upstream") == 4
    assert await log.get_cursor("events/cg2") is None

    again = await store.reopen()
    assert await again.log.cursors() == {"$upstream": 4, "events/$Default": 7}
    assert again.log.last_seq == 10
    await again.db.close()


async def test_set_cursor_rejects_positions_outside_the_log(store: Store) -> None:
    await store.log.append([record(1)])
    with pytest.raises(InvalidRequestError):
        await store.log.set_cursor("a", 2)
    with pytest.raises(InvalidRequestError):
        await store.log.set_cursor("a", -1)
    with pytest.raises(InvalidRequestError):
        await store.log.set_cursor("", 0)


# -- retention -----------------------------------------------------------------------------------


async def test_retention_deletes_old_messages_only_once_every_pinning_cursor_passed(
    store: Store, clock: Clock
) -> None:
    log = store.log
    await log.append([record(i, clock=clock) for i in range(10)])  # old soon
    await log.set_cursor("$upstream", 0, pin=True)
    await log.set_cursor("module/in", 6, pin=True)
    await log.set_cursor("events/$Default", 0)  # an external reader does not pin
    clock.now += 61
    await log.append([record(i, clock=clock) for i in range(10, 15)])  # young

    assert (await log.prune()).expired == 0
    await log.set_cursor("$upstream", 15, pin=True)
    result = await log.prune()
    assert (result.expired, result.evicted, result.dropped) == (6, 0, 0)
    assert result.bytes_freed > 0
    assert log.stats().first_seq == 7
    await log.set_cursor("module/in", 15, pin=True)
    assert (await log.prune()).expired == 4  # 7..10; 11..15 are young
    stats = log.stats()
    assert (stats.count, stats.first_seq, stats.oldest_enqueued_ms) == (5, 11, int(clock() * 1000))
    assert [e.seq for e in await log.read(0)] == [11, 12, 13, 14, 15]

    clock.now += 61
    assert (await log.prune()).expired == 5
    stats = log.stats()
    assert (stats.count, stats.bytes, stats.first_seq, stats.oldest_enqueued_ms) == (
        0,
        0,
        None,
        None,
    )


async def test_retention_works_in_chunks_across_many_rows(store: Store, clock: Clock) -> None:
    log = store.log
    await log.append([record(i, clock=clock, size=10) for i in range(12_000)])
    clock.now += 61
    result = await log.prune()
    assert result.expired == 12_000
    assert log.stats().count == 0


async def test_seqs_are_never_reused_after_the_log_empties(store: Store, clock: Clock) -> None:
    log = store.log
    await log.append([record(i, clock=clock) for i in range(3)])
    clock.now += 61
    await log.prune()
    assert log.stats().count == 0
    again = await store.reopen()
    assert again.log.last_seq == 3
    assert await again.log.append([record(4, clock=clock), record(5, clock=clock)]) == 5
    assert [e.seq for e in await again.log.read(0)] == [4, 5]
    await again.db.close()


# -- byte cap ------------------------------------------------------------------------------------


def thousand(i: int, clock: Clock) -> Record:
    return record(i, clock=clock, size=1000, props="{}")  # 1002 bytes


async def test_drop_oldest_evicts_to_90_percent_and_counts_unread_as_dropped(
    tmp_path: Path, clock: Clock
) -> None:
    s = await Store(tmp_path / "cap.sqlite", max_bytes=10_020, clock=clock).open()
    log = s.log
    await log.append([thousand(i, clock) for i in range(12)])  # 12024 bytes
    await log.set_cursor("$upstream", 1, pin=True)
    await log.set_cursor("events/$Default", 0)
    result = await log.prune()
    # 90 % of 10020 is 9018: 9 records of 1002 fit, so 3 are evicted; 2 unread upstream
    assert (result.expired, result.evicted, result.dropped, result.bytes_freed) == (0, 3, 2, 3006)
    stats = log.stats()
    assert (stats.count, stats.bytes, stats.first_seq) == (9, 9018, 4)
    assert stats.dropped_total == {"byte-cap": 2}
    again = await s.reopen()
    assert again.log.stats().dropped_total == {"byte-cap": 2}
    await again.db.close()


async def test_run_retention_evicts_as_soon_as_a_commit_crosses_the_cap(
    tmp_path: Path, clock: Clock
) -> None:
    s = await Store(tmp_path / "cap.sqlite", max_bytes=10_020, clock=clock).open()
    log = s.log
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(log.run_retention(interval=3600))
        for i in range(10):
            await log.append([thousand(i, clock)])
        assert log.stats().count == 10
        await log.append([thousand(10, clock)])  # 11022 > 10020
        await until(lambda: log.stats().count == 9)
        task.cancel()
    await s.db.close()


async def test_reject_new_refuses_appends_over_the_cap_until_space_is_freed(
    tmp_path: Path, clock: Clock
) -> None:
    s = await Store(
        tmp_path / "cap.sqlite", max_bytes=5010, overflow="reject-new", retention_s=60, clock=clock
    ).open()
    log = s.log
    futures = [log.append([thousand(i, clock)]) for i in range(5)]
    with pytest.raises(StoreFullError):
        await log.append([thousand(5, clock)])  # counted with the 5 still pending
    assert await asyncio.gather(*futures) == [1, 2, 3, 4, 5]
    with pytest.raises(StoreFullError, match="store full"):
        await log.append([thousand(6, clock)])
    assert (await log.prune()).evicted == 0  # reject-new never evicts
    assert log.stats().rejected == 2

    clock.now += 61
    assert (await log.prune()).expired == 5
    assert await log.append([thousand(7, clock)]) == 6
    await s.db.close()


# -- reads bounded by bytes (issue 8) ------------------------------------------------------------


async def test_reads_stop_at_max_bytes_but_return_at_least_one(store: Store) -> None:
    log = store.log
    await log.append([record(i, size=1000) for i in range(1, 21)])  # 20 x (1000 + props)
    page = await log.read(0, 500, max_bytes=4500)
    assert [e.seq for e in page] == [1, 2, 3, 4, 5]  # the 5th crosses 4,500 bytes
    assert [e.seq for e in await log.read(0, 500, max_bytes=1)] == [1]
    assert len(await log.read(0, 500)) == 20
    assert len(await log.read(0, 3, max_bytes=10**9)) == 3


async def test_a_scan_cut_by_bytes_moves_only_to_its_last_entry(store: Store) -> None:
    """A filtered scan that came back short because of its byte bound must not skip the
    matching entries it did not read yet."""
    log = store.log
    await log.append([record(i, size=1000) for i in range(1, 31)])  # dev0, dev1, dev2, ...
    seen: list[int] = []
    after = 0
    while True:
        entries, after = await log.scan(after, 500, device_id="dev1", max_bytes=2500)
        assert len(entries) <= 3
        seen += [e.seq for e in entries]
        if not entries:
            break
    assert seen == [i for i in range(1, 31) if i % 3 == 1]
    assert after == log.last_seq
