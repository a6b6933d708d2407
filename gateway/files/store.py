"""Uploaded files at the edge: upload state in ``hub.db``, bytes under ``DATA_DIR/files``.

One directory per upload (``files/{correlationId}/``, never named after the device's blob name,
so no name can leave it): ``blocks/{hex block id}`` for staged blocks, ``data`` for the blob
once it is whole. Every write is fsynced (file and directory) before it is acknowledged, so what
a device was told is stored survives ``kill -9`` and power loss: a Put Block acknowledged
before a crash is still there after it, and the upload resumes by committing its block list.

Blocks that arrive one after the other with new ids (what the SDKs and the upstream forwarder
send) are appended to one staging file, ``stream``, each fsynced and then recorded in
``stream.idx`` (``hexid:size`` lines); a Put Block List naming exactly those blocks in that
order turns ``stream`` into ``data`` by a rename, with the SHA-256 kept as they came, so the file
is written once. Anything else (a block sent again, blocks in parallel) is staged as its own
``blocks/{hex id}`` file, which wins over the stream's copy, and the blob is then built from
the parts.

An upload is ``receiving`` from the SAS URI until the device's notification; ``stored`` once
the notification reports success and the blob is whole; ``failed`` when it reports failure;
``expired`` when no notification came before the SAS expired (plus a grace period), its bytes
then deleted. Files count against the store's byte cap together with the message log; at the
cap, ``drop-oldest`` deletes the oldest stored files first and ``reject-new`` refuses.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import hashlib
import json
import logging
import os
import secrets
import shutil
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final, Literal

from gateway.config import FilesConfig
from gateway.errors import ConflictError, InvalidRequestError, NotFoundError
from gateway.files.blob import BlobError
from gateway.store.db import Database, Migration

log = logging.getLogger(__name__)

MIGRATION: Final[Migration] = (
    "files",
    (
        """
        CREATE TABLE file_uploads(
            correlation_id TEXT PRIMARY KEY,
            doc TEXT NOT NULL) WITHOUT ROWID;
        CREATE TABLE file_notifications(
            seq INTEGER PRIMARY KEY,
            body TEXT NOT NULL,
            expiry REAL NOT NULL,
            deliveries INTEGER NOT NULL DEFAULT 0,
            lock_token TEXT,
            locked_until REAL);
        """,
    ),
)

State = Literal["receiving", "stored", "failed", "expired", "forwarded"]
# Forwarding upstream (gateway/files/forward.py): "" (not going up), "queued", "forwarding",
# "forwarded"; a forwarded file keeps state "stored" while its bytes are kept, and becomes
# state "forwarded" (bytes deleted) under files.after_forward = "delete".
Forward = Literal["", "queued", "forwarding", "forwarded"]
GRACE_S: Final = 300.0  # a receiving upload outlives its SAS by this much (slow notifications)


@dataclass(frozen=True, slots=True)
class Upload:
    correlation_id: str
    device_id: str
    name: str  # the blob name the device asked for (the blob is "{device_id}/{name}")
    state: State
    created: float
    updated: float
    expires: float  # the SAS expiry
    size: int = 0
    sha256: str = ""
    status_code: int | None = None
    status_description: str = ""
    via: str = ""  # at a parent: the gateway that uploaded it on the device's behalf
    forward: Forward = ""
    forwarded_bytes: int = 0  # bytes the parent acknowledged (blocks it holds)
    forward_error: str = ""
    parent_cid: str = ""  # the parent's upload of this file (resumed after a cut or restart)
    parent_url: str = ""  # its blob URL with the SAS token the parent issued
    parent: str = ""  # which upstream that upload is at (mode:hub:gateway)

    @property
    def blob_name(self) -> str:
        return f"{self.device_id}/{self.name}"

    @property
    def shown_state(self) -> str:
        """What ``gateway files`` shows: receiving, stored, forwarding, forwarded, ..."""
        if self.state == "stored" and self.forward in ("forwarding", "forwarded"):
            return self.forward
        return self.state

    def json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "deviceId": self.device_id, "name": self.name, "blobName": self.blob_name,
            "correlationId": self.correlation_id, "state": self.shown_state, "size": self.size,
            "sha256": self.sha256 or None, "created": _iso(self.created),
            "updated": _iso(self.updated), "statusCode": self.status_code,
            "statusDescription": self.status_description or None}
        if self.via:
            out["via"] = self.via
        if self.forward:
            out["upstream"] = {
                "state": self.forward, "bytes": self.forwarded_bytes,
                "progress": round(self.forwarded_bytes / self.size, 4) if self.size else 1.0,
                "lastError": self.forward_error or None}
        return out


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1000):03d}Z"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True, slots=True)
class Written:
    size: int
    md5: str  # base64, as Content-MD5
    sha256: str  # hex


@dataclass(slots=True)
class _Stream:
    """The in-order staging file of one upload (its index, loaded lazily)."""

    ids: list[bytes]
    sizes: list[int]
    sha: Any  # hashlib sha256 of the stream so far; None after a restart (read it again)
    busy: bool = False  # a block is being appended: a parallel one goes to its own file

    @property
    def end(self) -> int:
        return sum(self.sizes)


class FileStore:
    def __init__(self, db: Database, root: Path, config: FilesConfig, *,
                 store_cap: int, used_by_log: Callable[[], int], drop_oldest: bool,
                 clock: Callable[[], float] = time.time) -> None:
        self._db = db
        self.root = root
        self.config = config
        self._cap = store_cap
        self._used_by_log = used_by_log
        self._drop_oldest = drop_oldest
        self._clock = clock
        self.uploads: dict[str, Upload] = {}
        self._receiving: dict[str, int] = {}  # correlation id -> bytes on disk (blocks, data)
        self._streams: dict[str, _Stream] = {}
        self.dropped = 0
        # set by the upstream file forwarder: is an upstream set (a new file then goes up)?
        # and its wake-up when one is stored
        self.forwarding: Callable[[], bool] = lambda: False
        self.stored_hook: Callable[[Upload], None] | None = None

    async def open(self) -> None:
        self.root.mkdir(mode=0o700, exist_ok=True)
        await self._db.migrate(MIGRATION)
        docs = await self._db.run(
            lambda c: [r[0] for r in c.execute("SELECT doc FROM file_uploads")])
        self.uploads = {u.correlation_id: u for u in (Upload(**json.loads(d)) for d in docs)}
        for upload in self.uploads.values():
            if upload.state == "receiving":
                self._receiving[upload.correlation_id] = _du(self._dir(upload))

    # -- figures -----------------------------------------------------------------------------

    def bytes_used(self, device_id: str | None = None) -> int:
        total = 0
        for cid, upload in self.uploads.items():
            if device_id is not None and upload.device_id != device_id:
                continue
            total += self._receiving.get(cid, upload.size if upload.state == "stored" else 0)
        return total

    def _dir(self, upload: Upload) -> Path:
        return self.root / upload.correlation_id

    def data_path(self, upload: Upload) -> Path:
        return self._dir(upload) / "data"

    # -- device side -------------------------------------------------------------------------

    async def start(self, device_id: str, name: str, *, via: str = "") -> Upload:
        """A new upload (the SAS URI request). IoT Hub's limit: 10 at once per device."""
        now = self._clock()
        # an unfinished upload of the same blob (by the same gateway) is superseded: its staged
        # blocks carry over, as Storage keeps uncommitted blocks per blob, so a client whose
        # SAS expired resumes with a new one (Get Block List) instead of starting again
        previous = [u for u in self.uploads.values() if u.device_id == device_id
                    and u.name == name and u.state == "receiving" and u.via == via]
        active = sum(1 for u in self.uploads.values()
                     if u.device_id == device_id and u.state == "receiving") - len(previous)
        if active >= self.config.max_concurrent_uploads:
            raise ConflictError(f"device {device_id!r} has {active} uploads in progress; "
                                f"at most {self.config.max_concurrent_uploads} at once")
        if self.bytes_used(device_id) >= self.config.device_quota_bytes:
            raise InvalidRequestError(f"device {device_id!r} is over its file quota of "
                                      f"{self.config.device_quota_bytes} bytes")
        upload = Upload(correlation_id=base64.urlsafe_b64encode(secrets.token_bytes(24))
                        .decode().rstrip("="),
                        device_id=device_id, name=name, state="receiving", created=now,
                        updated=now, expires=now + self.config.sas_ttl_seconds, via=via)
        directory = self._dir(upload)
        directory.mkdir(parents=True, mode=0o700)
        self._receiving[upload.correlation_id] = 0
        await self._save(upload)
        if previous:
            await self._carry_over(max(previous, key=lambda u: u.created), upload)
            for old in previous:
                shutil.rmtree(self._dir(old), ignore_errors=True)
                self._receiving.pop(old.correlation_id, None)
                self._streams.pop(old.correlation_id, None)
                await self._save(replace(old, state="expired", size=0, updated=now,
                                         status_description="superseded by a new upload of "
                                                            "the same blob"))
        (directory / "blocks").mkdir(mode=0o700, exist_ok=True)
        self._receiving[upload.correlation_id] = _du(directory)
        return upload

    async def _carry_over(self, old: Upload, new: Upload) -> None:
        source, target = self._dir(old), self._dir(new)
        for name in ("blocks", "stream", "stream.idx"):
            with contextlib.suppress(FileNotFoundError):
                os.replace(source / name, target / name)
        await asyncio.to_thread(_fsync_dir, target)
        log.info("file upload %s/%s: staged blocks carried over to a new upload",
                 new.device_id, new.name)

    def receiving(self, correlation_id: str, blob_name: str) -> Upload:
        upload = self.uploads.get(correlation_id)
        if upload is None or upload.blob_name != blob_name:
            raise BlobError(404, "BlobNotFound", "no upload in progress for this blob")
        if upload.state != "receiving":
            raise BlobError(409, "BlobImmutable", f"the upload is {upload.state}; ask for a "
                            "new SAS URI to upload again")
        return upload

    async def put_blob(self, upload: Upload, chunks: AsyncIterator[bytes]) -> Written:
        directory = self._dir(upload)
        written = await self._write(upload, directory / "data.tmp", chunks, whole=True)
        os.replace(directory / "data.tmp", directory / "data")
        await asyncio.to_thread(_fsync_dir, directory)
        self._receiving[upload.correlation_id] = _du(directory)
        await self._save(replace(upload, size=written.size, sha256=written.sha256,
                                 updated=self._clock()))
        return written

    def _stream(self, upload: Upload) -> _Stream:
        stream = self._streams.get(upload.correlation_id)
        if stream is None:
            ids, sizes = _read_index(self._dir(upload) / "stream.idx")
            stream = _Stream(ids, sizes, None if ids else hashlib.sha256())
            self._streams[upload.correlation_id] = stream
        return stream

    async def put_block(self, upload: Upload, block_id: bytes,
                        chunks: AsyncIterator[bytes]) -> Written:
        directory = self._dir(upload)
        blocks = directory / "blocks"
        target = blocks / block_id.hex()
        stream = self._stream(upload)
        if not stream.busy and block_id not in stream.ids and not target.exists():
            stream.busy = True  # a new block, none in progress: append it to the stream
            try:
                sha = stream.sha.copy() if stream.sha is not None else None
                first = not stream.ids
                written = await self._write(upload, directory / "stream", chunks, whole=False,
                                            append_at=stream.end, sha=sha)
                await asyncio.to_thread(_append_index, directory / "stream.idx",
                                        f"{block_id.hex()}:{written.size}\n")
                if first:
                    await asyncio.to_thread(_fsync_dir, directory)
                stream.ids.append(block_id)
                stream.sizes.append(written.size)
                stream.sha = sha
            finally:
                stream.busy = False
            self._receiving[upload.correlation_id] = _du(directory)
            return written
        written = await self._write(upload, blocks / (block_id.hex() + ".tmp"), chunks,
                                    whole=False)
        os.replace(blocks / (block_id.hex() + ".tmp"), target)
        await asyncio.to_thread(_fsync_dir, blocks)
        self._receiving[upload.correlation_id] = _du(self._dir(upload))
        return written

    def committed_blocks(self, upload: Upload) -> list[str]:
        """Hex ids of the blocks staged so far (what survives a restart)."""
        return sorted(i.hex() for i, _ in self.block_list(upload)[1])

    def _parts(self, upload: Upload) -> dict[bytes, tuple[Path, int, int]]:
        """Every staged block: id -> (file, offset, size); its own file wins over the stream."""
        directory = self._dir(upload)
        stream = self._stream(upload)
        parts: dict[bytes, tuple[Path, int, int]] = {}
        offset = 0
        for i, n in zip(stream.ids, stream.sizes, strict=True):
            parts[i] = (directory / "stream", offset, n)
            offset += n
        with contextlib.suppress(FileNotFoundError):
            for p in (directory / "blocks").iterdir():
                if not p.name.endswith(".tmp"):
                    parts[bytes.fromhex(p.name)] = (p, 0, p.stat().st_size)
        return parts

    def block_list(self, upload: Upload) -> tuple[list[tuple[bytes, int]],
                                                  list[tuple[bytes, int]]]:
        """Get Block List: (committed, uncommitted) blocks as (id, size). Committed: the list
        of the last Put Block List, once its blob is whole; uncommitted: the staged ones."""
        directory = self._dir(upload)
        committed: list[tuple[bytes, int]] = []
        if (directory / "data").exists():
            with contextlib.suppress(FileNotFoundError):
                for line in (directory / "committed").read_text().split():
                    hexid, _, size = line.partition(":")
                    committed.append((bytes.fromhex(hexid), int(size)))
        staged = sorted((i, n) for i, (_, _, n) in self._parts(upload).items())
        return committed, staged

    async def put_block_list(self, upload: Upload, ids: list[bytes]) -> Written:
        directory = self._dir(upload)
        parts = self._parts(upload)
        missing = [i for i in ids if i not in parts]
        if missing:
            raise BlobError(400, "InvalidBlockList",
                            f"{len(missing)} of the listed blocks were never staged")
        stream = self._stream(upload)
        listed = [parts[i] for i in ids]
        await asyncio.to_thread(_write_synced, directory / "committed", " ".join(
            f"{i.hex()}:{n}" for i, (_, _, n) in zip(ids, listed, strict=True)))
        in_order = ids == stream.ids and all(p == directory / "stream" for p, _, _ in listed)
        try:
            if in_order:  # the stream is the blob: no second write
                written = await asyncio.to_thread(_seal, directory / "stream", stream.end,
                                                  stream.sha, directory / "data.tmp")
            else:
                written = await asyncio.to_thread(_concatenate, listed,
                                                  directory / "data.tmp",
                                                  self.config.max_file_bytes)
        except BaseException:
            (directory / "data.tmp").unlink(missing_ok=True)
            raise
        os.replace(directory / "data.tmp", directory / "data")
        await asyncio.to_thread(_fsync_dir, directory)
        self._clear_staging(upload)
        self._receiving[upload.correlation_id] = _du(directory)
        await self._save(replace(upload, size=written.size, sha256=written.sha256,
                                 updated=self._clock()))
        return written

    def _clear_staging(self, upload: Upload) -> None:
        directory = self._dir(upload)
        shutil.rmtree(directory / "blocks", ignore_errors=True)
        (directory / "blocks").mkdir(mode=0o700, exist_ok=True)
        for name in ("stream", "stream.idx"):
            (directory / name).unlink(missing_ok=True)
        self._streams.pop(upload.correlation_id, None)

    async def _write(self, upload: Upload, path: Path, chunks: AsyncIterator[bytes], *,
                     whole: bool, append_at: int | None = None, sha: Any = None) -> Written:
        """Write ``chunks`` to ``path`` (at ``append_at`` of it: the stream), fsynced. ``sha``:
        a running SHA-256 to continue (a whole blob starts its own; a block needs none)."""
        limit = self.config.max_file_bytes
        md5 = hashlib.md5(usedforsecurity=False)
        if whole:
            sha = hashlib.sha256()
        size = 0
        base = self._receiving.get(upload.correlation_id, 0)
        if append_at is None:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        else:  # past the last recorded block: what a crash left beyond it goes
            fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
            os.ftruncate(fd, append_at)
            os.lseek(fd, append_at, os.SEEK_SET)
        try:
            async for chunk in chunks:
                size += len(chunk)
                if size > limit or (not whole and base + size > limit):
                    raise BlobError(413, "RequestBodyTooLarge",
                                    f"the file is over the {limit}-byte limit")
                self._make_room(len(chunk), upload.device_id)
                self._receiving[upload.correlation_id] = base + size
                # hashing and writing in a thread (both release the GIL): the loop meanwhile
                # decrypts and reads the next chunk
                await asyncio.to_thread(_absorb, fd, chunk, md5, sha)
            await asyncio.to_thread(os.fsync, fd)
        except OSError as exc:
            _discard(fd, path, append_at)
            self._receiving[upload.correlation_id] = base
            if exc.errno == errno.ENOSPC:
                raise BlobError(500, "InternalError",
                                "the gateway's disk is full; retry later") from None
            raise
        except BaseException:
            _discard(fd, path, append_at)
            self._receiving[upload.correlation_id] = base
            raise
        os.close(fd)
        return Written(size, base64.b64encode(md5.digest()).decode(),
                       sha.hexdigest() if sha is not None else "")

    def _make_room(self, incoming: int, device_id: str) -> None:
        """The store's byte cap (log plus files) and the device's quota."""
        if self.bytes_used(device_id) + incoming > self.config.device_quota_bytes:
            raise BlobError(409, "QuotaExceeded", f"device {device_id!r} is over its file "
                            f"quota of {self.config.device_quota_bytes} bytes")
        while self._used_by_log() + self.bytes_used() + incoming > self._cap:
            victim = self._oldest_stored(forwarded_only=not self._drop_oldest)
            if victim is None:
                raise BlobError(409, "InsufficientAccountResources",
                                "the gateway's store is full (store.max_bytes)")
            self._drop(victim)

    def _oldest_stored(self, *, forwarded_only: bool = False) -> Upload | None:
        """The next file to drop at the cap: files already forwarded upstream first."""
        stored = [u for u in self.uploads.values() if u.state == "stored"
                  and (u.forward == "forwarded" or not forwarded_only)]
        return min(stored, key=lambda u: (u.forward != "forwarded", u.updated)) \
            if stored else None

    def _drop(self, upload: Upload) -> None:
        log.warning("file dropped at the byte cap device_id=%r name=%r size=%d",
                    upload.device_id, upload.name, upload.size)
        self.dropped += 1
        shutil.rmtree(self._dir(upload), ignore_errors=True)
        self.uploads[upload.correlation_id] = replace(upload, state="expired", size=0,
                                                      updated=self._clock())
        self._db.submit(lambda c: c.execute(
            "UPDATE file_uploads SET doc = ? WHERE correlation_id = ?",
            (json.dumps(_doc(self.uploads[upload.correlation_id])), upload.correlation_id)))

    async def complete(self, device_id: str, correlation_id: str, *, success: bool,
                       status_code: int | None, description: str) -> Upload:
        """The device's notification (ref §11 step 3)."""
        upload = self.uploads.get(correlation_id)
        if upload is None or upload.device_id != device_id:
            raise NotFoundError(f"no file upload with correlation id {correlation_id!r}")
        if upload.state != "receiving":
            raise InvalidRequestError(f"the upload was already {upload.state}")
        whole = self.data_path(upload).exists()
        state: State = "stored" if success and whole else "failed"
        if success and not whole:
            description = "the device reported success but no blob was uploaded"
        done = replace(upload, state=state, updated=self._clock(), status_code=status_code,
                       status_description=description,
                       forward="queued" if state == "stored" and self.forwarding() else "")
        self._receiving.pop(correlation_id, None)
        self._streams.pop(correlation_id, None)
        if state == "stored":
            self._clear_staging(upload)
            shutil.rmtree(self._dir(upload) / "blocks", ignore_errors=True)
            for old in [u for u in self.uploads.values() if u.device_id == device_id
                        and u.name == upload.name and u.state == "stored"]:
                await self.delete(old)  # a new upload of a name replaces the file
        else:
            shutil.rmtree(self._dir(upload), ignore_errors=True)
            done = replace(done, size=0)
        await self._save(done)
        if state == "stored" and self.stored_hook is not None:
            self.stored_hook(done)
        return done

    # -- service side ------------------------------------------------------------------------

    def find(self, device_id: str, name: str) -> Upload:
        """The latest upload of ``device_id``'s ``name`` (stored first, else the newest)."""
        candidates = [u for u in self.uploads.values()
                      if u.device_id == device_id and u.name == name]
        if not candidates:
            raise NotFoundError(f"no file {device_id}/{name}")
        return max(candidates, key=lambda u: (u.state == "stored", u.updated))

    async def delete(self, upload: Upload) -> None:
        shutil.rmtree(self._dir(upload), ignore_errors=True)
        self.uploads.pop(upload.correlation_id, None)
        self._receiving.pop(upload.correlation_id, None)
        self._streams.pop(upload.correlation_id, None)
        await self._db.run(lambda c: c.execute(
            "DELETE FROM file_uploads WHERE correlation_id = ?", (upload.correlation_id,)))

    async def expire(self) -> int:
        """Receiving uploads whose SAS expired (plus the grace) lose their bytes."""
        now = self._clock()
        stale = [u for u in self.uploads.values()
                 if u.state == "receiving" and u.expires + GRACE_S < now]
        for upload in stale:
            shutil.rmtree(self._dir(upload), ignore_errors=True)
            self._receiving.pop(upload.correlation_id, None)
            self._streams.pop(upload.correlation_id, None)
            await self._save(replace(upload, state="expired", size=0, updated=now,
                                     status_description="no notification before the SAS "
                                                        "expired"))
            log.info("file upload expired device_id=%r name=%r", upload.device_id, upload.name)
        return len(stale)

    async def save(self, upload: Upload) -> None:
        """Persist a changed upload (the forwarder's progress)."""
        await self._save(upload)

    async def forwarded(self, upload: Upload, *, keep: bool) -> Upload:
        """The parent holds the whole file: keep its bytes or delete them (files.after_forward)."""
        done = replace(upload, forward="forwarded", forwarded_bytes=upload.size,
                       forward_error="", parent_url="", updated=self._clock())
        if not keep:
            shutil.rmtree(self._dir(upload), ignore_errors=True)
            done = replace(done, state="forwarded")
        await self._save(done)
        return done

    async def _save(self, upload: Upload) -> None:
        doc = json.dumps(_doc(upload))
        await self._db.run(lambda c: c.execute(
            "INSERT OR REPLACE INTO file_uploads VALUES (?, ?)", (upload.correlation_id, doc)))
        self.uploads[upload.correlation_id] = upload

    # -- file upload notifications for the service (ref §11: C2D-like semantics) ---------------

    async def notify(self, body: dict[str, Any]) -> None:
        text = json.dumps(body)
        expiry = self._clock() + self.config.notification_ttl_seconds
        await self._db.run(lambda c: c.execute(
            "INSERT INTO file_notifications(body, expiry) VALUES (?, ?)", (text, expiry)))

    async def receive_notification(self) -> tuple[dict[str, Any], str] | None:
        """The oldest notification not locked, locked for ``lock_seconds``; None if none."""
        now = self._clock()
        lock = secrets.token_hex(16)
        cfg = self.config

        def take(conn: sqlite3.Connection) -> str | None:
            conn.execute("DELETE FROM file_notifications WHERE expiry < ? OR deliveries >= ?",
                         (now, cfg.notification_max_deliveries))
            row = conn.execute(
                "SELECT seq, body FROM file_notifications WHERE locked_until IS NULL "
                "OR locked_until < ? ORDER BY seq LIMIT 1", (now,)).fetchone()
            if row is None:
                return None
            conn.execute("UPDATE file_notifications SET lock_token = ?, locked_until = ?, "
                         "deliveries = deliveries + 1 WHERE seq = ?",
                         (lock, now + cfg.notification_lock_seconds, row[0]))
            return str(row[1])

        body = await self._db.run(take)
        return None if body is None else (json.loads(body), lock)

    async def settle_notification(self, lock: str, *, complete: bool) -> None:
        now = self._clock()

        def settle(conn: sqlite3.Connection) -> int:
            if complete:
                cur = conn.execute("DELETE FROM file_notifications WHERE lock_token = ? "
                                   "AND locked_until >= ?", (lock, now))
            else:
                cur = conn.execute("UPDATE file_notifications SET lock_token = NULL, "
                                   "locked_until = NULL WHERE lock_token = ? "
                                   "AND locked_until >= ?", (lock, now))
            return cur.rowcount

        if await self._db.run(settle) == 0:
            from gateway.errors import PreconditionFailedError

            raise PreconditionFailedError("the notification's lock was lost (expired or "
                                          "already settled)")

    async def run(self, interval: float = 60.0) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self.expire()
            except Exception:
                log.exception("file upload expiry failed")


def _doc(upload: Upload) -> dict[str, Any]:
    return {f: getattr(upload, f) for f in Upload.__slots__}


def _absorb(fd: int, chunk: bytes, md5: Any, sha: Any) -> None:
    md5.update(chunk)
    if sha is not None:
        sha.update(chunk)
    view = memoryview(chunk)
    while view:
        view = view[os.write(fd, view):]


def _discard(fd: int, path: Path, append_at: int | None) -> None:
    """A write that failed: its file goes, or the stream is cut back to its last block."""
    try:
        if append_at is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, append_at)
    finally:
        os.close(fd)
    if append_at is None:
        path.unlink(missing_ok=True)


def _read_index(path: Path) -> tuple[list[bytes], list[int]]:
    """``stream.idx``: the blocks the stream holds. A line cut by a crash is dropped (and cut
    from the file, so the next record starts on its own line)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return [], []
    whole = raw[:raw.rfind(b"\n") + 1]
    if len(whole) != len(raw):
        os.truncate(path, len(whole))
    ids, sizes = [], []
    for line in whole.decode().split():
        hexid, _, size = line.partition(":")
        ids.append(bytes.fromhex(hexid))
        sizes.append(int(size))
    return ids, sizes


def _append_index(path: Path, line: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, line.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def _seal(stream: Path, end: int, sha: Any, out: Path) -> Written:
    """The stream becomes the blob (renamed to ``out``): cut to its last block, its SHA-256
    the running one (or read once after a restart)."""
    with open(stream, "r+b") as fh:
        os.ftruncate(fh.fileno(), end)
        os.fsync(fh.fileno())
        if sha is None:
            sha = hashlib.sha256()
            while chunk := fh.read(4 << 20):
                sha.update(chunk)
    os.replace(stream, out)
    return Written(end, "", sha.hexdigest())


def _write_synced(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _du(path: Path) -> int:
    total = 0
    for root, _dirs, names in os.walk(path):
        for name in names:
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def _concatenate(parts: list[tuple[Path, int, int]], out: Path, limit: int) -> Written:
    """The blob from its blocks (file, offset, size), in one pass (sha256 of the whole; Put
    Block List's Content-MD5 is the block list's own, so no MD5 here)."""
    sha = hashlib.sha256()
    size = 0
    with open(out, "wb") as fh:
        os.fchmod(fh.fileno(), 0o600)
        for part, offset, length in parts:
            with open(part, "rb", buffering=0) as src:
                src.seek(offset)
                left = length
                while left:
                    chunk = src.read(min(left, 4 << 20))
                    if not chunk:
                        raise BlobError(500, "InternalError", f"staged block {part.name} "
                                        "is shorter than recorded")
                    left -= len(chunk)
                    size += len(chunk)
                    if size > limit:
                        raise BlobError(413, "RequestBodyTooLarge",
                                        f"the file is over the {limit}-byte limit")
                    sha.update(chunk)
                    fh.write(chunk)
        fh.flush()
        os.fsync(fh.fileno())
    return Written(size, "", sha.hexdigest())
