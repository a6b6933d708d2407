"""Stamped appends share the group commit with every other append (gateway.store.dedupe's
``filter_once`` in the log's writer body): each append is deduplicated and gap-checked on its
own, a refused one stores nothing and leaves the others of the same commit alone."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from gateway.errors import StoreError
from gateway.store import Record
from tests.store.test_message_log import Store, record


def _rec(seq: int, prev: int | None, key: str = "gw/d1", epoch: str = "e1") -> Record:
    return record(seq, device_id=key.split("/")[1], body=f"{key}:{seq}".encode(),
                  once=(key, epoch, seq, prev))


def _plain(body: bytes) -> Record:
    return record(0, device_id="local", body=body)


async def test_one_commit_holds_plain_deduplicated_and_refused_appends(tmp_path: Path) -> None:
    store = await Store(tmp_path / "log.sqlite").open()
    log = store.log
    try:
        await log.append_once([_rec(1, None), _rec(2, 1)])
        commits = log.stats().commits
        # appended in one loop turn: one group commit
        plain = log.append([_plain(b"p1")])
        dup = log.append_once([_rec(2, 1), _rec(3, 2)])  # 2 is a duplicate, 3 is new
        gap = log.append_once([_rec(1, None, key="gw/d3"), _rec(6, 5)])  # 4 and 5 missing
        other = log.append_once([_rec(1, None, key="gw/d2")])  # after the refused one
        then: list[BaseException | None] = []
        log.append_once_then([_rec(4, 3)], then.append)
        results = await asyncio.gather(plain, dup, gap, other, return_exceptions=True)
        assert log.stats().commits == commits + 1
        assert isinstance(results[2], StoreError) and "follows 5" in str(results[2])
        assert not isinstance(results[0], BaseException)
        assert not isinstance(results[1], BaseException)
        assert not isinstance(results[3], BaseException)
        assert then == [None]
        entries, _ = await log.scan(0, 100)
        bodies = [e.body for e in entries]
        # the refused append stored nothing, not even its record without a gap (d3)
        assert bodies == [b"gw/d1:1", b"gw/d1:2", b"p1", b"gw/d1:3", b"gw/d2:1", b"gw/d1:4"]
        assert log.deduplicated == 1
        assert log.stats().count == 6
        # each append's future gives the seq of its last stored row
        assert [results[0], results[1], results[3]] == [3, 4, 5]
        # the marks moved with the rows: a resend of all of it is dropped whole
        assert await log.append_once([_rec(1, None), _rec(4, 3), _rec(1, None, key="gw/d2")]) \
            == 6
        assert log.deduplicated == 4
        with pytest.raises(StoreError, match="follows 5"):  # d2 is stored up to 1
            await log.append_once([_rec(9, 5, key="gw/d2")])
    finally:
        await store.db.close()
