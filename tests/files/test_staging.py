"""Staging blocks (gateway/files/store.py): in-order blocks become the blob by a rename; a
block sent again, blocks in parallel, a list in another order, and what a crash leaves
behind in the stream all still give exactly the listed bytes. A real FileStore and database."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from gateway.config import FilesConfig
from gateway.files.store import FileStore, Upload
from gateway.store.db import Database


async def _chunks(data: bytes, pause: float = 0.0) -> AsyncIterator[bytes]:
    for i in range(0, len(data), 1000):
        if pause:
            await asyncio.sleep(pause)
        yield data[i:i + 1000]


def _run(tmp: Path, body: Callable[[FileStore, Upload], Awaitable[Any]],
         name: str = "x.bin") -> Any:
    async def main() -> Any:
        db = Database(tmp / "hub.db")
        await db.open()
        try:
            store = FileStore(db, tmp / "files", FilesConfig(), store_cap=1 << 30,
                              used_by_log=lambda: 0, drop_oldest=True)
            await store.open()
            upload = await store.start("cam", name)
            return await body(store, upload)
        finally:
            await db.close()

    return asyncio.run(main())


def _blob(store: FileStore, upload: Upload) -> bytes:
    return store.data_path(upload).read_bytes()


A, B, C = b"a" * 2500, b"b" * 1500, b"c" * 10


def test_in_order_blocks_become_the_blob_without_a_copy(tmp_path: Path) -> None:
    async def body(store: FileStore, upload: Upload) -> None:
        for i, data in enumerate((A, B, C)):
            await store.put_block(upload, bytes([i]), _chunks(data))
        d = store.root / upload.correlation_id
        assert not list((d / "blocks").iterdir()) and (d / "stream").stat().st_size == 4010
        inode = (d / "stream").stat().st_ino
        written = await store.put_block_list(upload, [b"\x00", b"\x01", b"\x02"])
        assert (d / "data").stat().st_ino == inode  # renamed, not rewritten
        assert written.sha256 == hashlib.sha256(A + B + C).hexdigest()
        assert _blob(store, upload) == A + B + C
        assert store.block_list(upload)[0] == [(b"\x00", 2500), (b"\x01", 1500), (b"\x02", 10)]

    _run(tmp_path, body)


def test_resent_block_reordered_list_and_parallel_blocks(tmp_path: Path) -> None:
    async def body(store: FileStore, upload: Upload) -> None:
        await store.put_block(upload, b"A", _chunks(A))
        await store.put_block(upload, b"B", _chunks(B))
        await store.put_block(upload, b"A", _chunks(b"z" * 7))  # sent again: it wins
        slow = asyncio.ensure_future(store.put_block(upload, b"C", _chunks(C * 300, 0.01)))
        await asyncio.sleep(0.02)
        await store.put_block(upload, b"D", _chunks(b"d" * 5))  # beside the one in progress
        await slow
        staged = dict(store.block_list(upload)[1])
        assert staged == {b"A": 7, b"B": 1500, b"C": 3000, b"D": 5}
        written = await store.put_block_list(upload, [b"D", b"A", b"C", b"B"])
        expected = b"d" * 5 + b"z" * 7 + C * 300 + B
        assert _blob(store, upload) == expected
        assert written.sha256 == hashlib.sha256(expected).hexdigest()

    _run(tmp_path, body)


def test_what_a_crash_leaves_in_the_stream_is_cut(tmp_path: Path) -> None:
    async def first(store: FileStore, upload: Upload) -> str:
        await store.put_block(upload, b"A", _chunks(A))
        await store.put_block(upload, b"B", _chunks(B))
        d = store.root / upload.correlation_id
        with open(d / "stream", "ab") as fh:  # noqa: ASYNC230 - a block written, killed before its record
            fh.write(b"garbage" * 100)
        with open(d / "stream.idx", "ab") as fh:  # noqa: ASYNC230 - and a record cut half way
            fh.write(b"4300:")
        return upload.correlation_id

    cid = _run(tmp_path, first)

    async def again(store: FileStore, _new: Upload) -> None:  # a restarted hub
        upload = store.uploads[cid]
        assert store.block_list(upload)[1] == [(b"A", 2500), (b"B", 1500)]
        await store.put_block(upload, b"C", _chunks(C))
        written = await store.put_block_list(upload, [b"A", b"B", b"C"])
        assert _blob(store, upload) == A + B + C
        assert written.sha256 == hashlib.sha256(A + B + C).hexdigest()  # read once again

    _run(tmp_path, again, "other.bin")


def test_a_new_sas_for_the_same_blob_takes_over_its_staged_blocks(tmp_path: Path) -> None:
    async def body(store: FileStore, old: Upload) -> None:
        await store.put_block(old, b"A", _chunks(A))
        await store.put_block(old, b"B", _chunks(b"q" * 3))  # into the stream ...
        await store.put_block(old, b"B", _chunks(B))  # ... sent again: its own file, it wins
        new = await store.start("cam", "x.bin")  # the SAS expired: a new one, same blob
        assert store.uploads[old.correlation_id].state == "expired"
        assert store.block_list(new)[1] == [(b"A", 2500), (b"B", 1500)]
        await store.put_block(new, b"C", _chunks(C))
        await store.put_block_list(new, [b"A", b"B", b"C"])
        assert _blob(store, new) == A + B + C
        other = await store.start("cam", "y.bin")  # another blob: nothing carried
        assert store.block_list(other)[1] == []

    _run(tmp_path, body)
