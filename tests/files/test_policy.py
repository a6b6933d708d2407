"""After forwarding (files.after_forward): at the store's byte cap, files the parent already
holds are dropped first, even under reject-new; files not yet forwarded only under drop-oldest.
A real FileStore on a real database in a temporary directory."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest

from gateway.config import FilesConfig
from gateway.files.blob import BlobError
from gateway.files.store import FileStore
from gateway.store.db import Database

MB = 1 << 20


async def _chunks(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def _stored(store: FileStore, device: str, name: str, size: int) -> str:
    upload = await store.start(device, name)
    await store.put_blob(upload, _chunks(b"x" * size))
    done = await store.complete(device, upload.correlation_id, success=True, status_code=200,
                                description="ok")
    assert done.state == "stored"
    return done.correlation_id


async def _scenario(tmp: Path, *, drop_oldest: bool, keep: bool) -> dict[str, str]:
    db = Database(tmp / "hub.db")
    await db.open()
    try:
        store = FileStore(db, tmp / "files", FilesConfig(), store_cap=3 * MB + 1000,
                          used_by_log=lambda: 0, drop_oldest=drop_oldest)
        await store.open()
        store.forwarding = lambda: True  # an upstream is set: new files are queued to go up
        old = await _stored(store, "cam", "old.bin", MB)
        sent = await _stored(store, "cam", "sent.bin", MB)
        assert store.uploads[sent].forward == "queued"
        await store.forwarded(store.uploads[sent], keep=keep)  # the parent has it
        third = await _stored(store, "cam", "third.bin", MB)
        outcome = {}
        try:
            await _stored(store, "cam", "fourth.bin", MB)  # over the cap: someone goes
            outcome["fourth"] = "stored"
        except BlobError as exc:
            outcome["fourth"] = exc.code
        for name, cid in (("old", old), ("sent", sent), ("third", third)):
            outcome[name] = store.uploads[cid].shown_state
        # reopened from the database: the same states
        again = FileStore(db, tmp / "files", FilesConfig(), store_cap=3 * MB,
                          used_by_log=lambda: 0, drop_oldest=drop_oldest)
        await again.open()
        assert {c: replace(u) for c, u in again.uploads.items()} == store.uploads
        return outcome
    finally:
        await db.close()


@pytest.mark.parametrize("drop_oldest", [True, False])
def test_forwarded_files_go_first_at_the_cap(tmp_path: Path, drop_oldest: bool) -> None:
    got = asyncio.run(_scenario(tmp_path, drop_oldest=drop_oldest, keep=True))
    # the forwarded file is dropped (state expired), not the older one still only here
    assert got == {"fourth": "stored", "old": "stored", "sent": "expired", "third": "stored"}


@pytest.mark.parametrize("drop_oldest", [True, False])
def test_deleted_after_forwarding_frees_the_room_at_once(tmp_path: Path,
                                                         drop_oldest: bool) -> None:
    got = asyncio.run(_scenario(tmp_path, drop_oldest=drop_oldest, keep=False))
    # after_forward = "delete": the forwarded file's bytes went at once (state forwarded), so
    # the fourth fits beside the other two without dropping anything
    assert got == {"fourth": "stored", "old": "stored", "sent": "forwarded", "third": "stored"}
