"""The ``file`` endpoint: JSON lines or Avro files, named and rolled like Azure Storage's.

Names: ``{path}/{hub}/{YYYY}/{MM}/{DD}/{HH}/{mm}.{first seq}.jsonl`` (or ``.avro``), the time
being the UTC minute the file was opened (Azure Storage's default ``{iothub}/{partition}/
{YYYY}/{MM}/{DD}/{HH}/{mm}``, with the first message's log seq instead of the partition, so
names never collide). A file is closed once it is ``rollSeconds`` old or ``rollBytes`` big,
and a restart always starts a new one. JSON lines hold the JSON envelope
(:func:`gateway.endpoints.envelope.json_envelope`), one per line; Avro files use IoT Hub's
storage record (:data:`gateway.endpoints.envelope.AVRO_SCHEMA`), one block per batch.

Delivered means fsynced: every batch is written, then the file is fsynced (and its directory
when the file is new), and only then does the cursor move. The guarantee across a kill -9 or
power loss: every message the cursor has passed is in a file, whole; and on restart the
current file is read back, anything after its last whole line (or Avro block) is cut off,
and the cursor moves past what the file holds, so no message is lost and none appears twice.
(Messages written but not yet fsynced when the power went may be gone from the file; they
were not delivered, so they are written again.) The current file's name is kept in
``{path}/.{endpoint}.current``, replaced atomically when a file is opened (after the file is
created, before anything is written to it: an empty file it does not name yet is taken over
on restart). A new endpoint forgets that state; a name that is taken by a non-empty file is
never overwritten (``-1``, ``-2``, ... are appended).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import fastavro
from fastavro.write import Writer as AvroWriter

from gateway.endpoints.envelope import AVRO_SCHEMA, Delivery, avro_record, json_line
from gateway.endpoints.runner import Progress, Session
from gateway.endpoints.spec import FileEndpointSpec
from gateway.errors import EndpointError

__all__ = ["FileSink", "recover"]

log = logging.getLogger(__name__)

_SCHEMA = fastavro.parse_schema(AVRO_SCHEMA)
_FILE_MODE = 0o640
_DIR_MODE = 0o750


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _makedirs(path: Path) -> None:
    """``mkdir -p`` that fsyncs the parent of every directory it creates."""
    if path.is_dir():
        return
    _makedirs(path.parent)
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=_DIR_MODE)
        _fsync_dir(path.parent)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fo:
        fo.write(text)
        fo.flush()
        os.fsync(fo.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


@dataclass(slots=True)
class _Open:
    path: Path
    fo: IO[bytes]
    opened: float
    size: int
    avro: AvroWriter | None
    dirty: bool = False


def _scan_jsonl(fo: IO[bytes]) -> tuple[int, int]:
    """(offset after the last whole line whose seq follows the previous one, its seq)."""
    good = last = 0
    offset = 0
    for line in fo:
        offset += len(line)
        if not line.endswith(b"\n"):
            break
        try:
            seq = json.loads(line)["systemProperties"]["x-opt-sequence-number"]
        except (ValueError, KeyError, TypeError):
            break
        if not isinstance(seq, int) or seq <= last:
            break
        good, last = offset, seq
    return good, last


def _scan_avro(fo: IO[bytes]) -> tuple[int, int]:
    """(offset after the last whole Avro block, the last record's seq); (0, 0) if even the
    header is not whole."""
    good = last = 0
    try:
        blocks = fastavro.block_reader(fo)
        good = fo.tell()
        for block in blocks:
            records: list[Any] = list(block)
            if records:
                last = max(last, int(records[-1]["SystemProperties"]["sequenceNumber"]))
            good = fo.tell()
    except Exception:  # noqa: BLE001 - any decoding failure marks the torn tail
        pass
    return good, last


def recover(path: Path, fmt: str) -> int:
    """Cut ``path`` after its last whole line (block), fsync it, and return the last seq in
    it (0 if none; an empty file is removed)."""
    try:
        fo = open(path, "r+b")
    except FileNotFoundError:
        return 0
    with fo:
        good, last = _scan_avro(fo) if fmt == "avro" else _scan_jsonl(fo)
        if last == 0:
            good = 0
        size = os.fstat(fo.fileno()).st_size
        if good < size:
            log.warning("file endpoint: cutting torn tail of %s (%d of %d bytes kept)",
                        path, good, size)
            fo.truncate(good)
        os.fsync(fo.fileno())
    if good == 0:
        path.unlink()
        _fsync_dir(path.parent)
    return last


class FileSink:
    def __init__(self, spec: FileEndpointSpec, *, hub_name: str,
                 clock: Callable[[], float] = time.time) -> None:
        self.spec = spec
        self.hub_name = hub_name
        self.clock = clock
        self.root = Path(spec.path)
        self.state = self.root / f".{spec.name}.current"

    def _recover(self) -> int:
        _makedirs(self.root)
        try:
            state = json.loads(self.state.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return 0
        except (OSError, ValueError) as exc:
            raise EndpointError(f"cannot read {self.state}: {exc}") from None
        current = self.root / str(state.get("file", ""))
        before = int(state.get("after", 0))
        fmt = "avro" if current.suffix == ".avro" else "jsonl"
        return max(before, recover(current, fmt) if current != self.root else 0)

    @contextlib.asynccontextmanager
    async def session(self) -> AsyncIterator[Session]:
        try:
            recovered = await asyncio.to_thread(self._recover)
        except OSError as exc:
            raise EndpointError(f"{self.root}: {exc.strerror or exc}") from None
        session = _FileSession(self, recovered)
        try:
            yield session
        finally:
            await asyncio.to_thread(session.close)

    def forget(self) -> None:
        """Drop what the directory says about earlier files (a new endpoint, or a new
        database, must not take an old file's sequence numbers for its own)."""
        with contextlib.suppress(FileNotFoundError):
            self.state.unlink()

    def name_for(self, seq: int, now: float) -> Path:
        t = datetime.fromtimestamp(now, tz=UTC)
        ext = "avro" if self.spec.format == "avro" else "jsonl"
        return Path(self.hub_name, f"{t:%Y}", f"{t:%m}", f"{t:%d}", f"{t:%H}",
                    f"{t:%M}.{seq:012d}.{ext}")


class _FileSession:
    reachable = True

    def __init__(self, sink: FileSink, recovered: int) -> None:
        self.sink = sink
        self.spec = sink.spec
        self.recovered = recovered
        self.last_synced = recovered  # seq of the last message known durable
        self.current: _Open | None = None

    def idle_timeout(self) -> float | None:
        if self.current is None:
            return None
        return max(0.0, self.current.opened + self.spec.roll_seconds - self.sink.clock())

    async def idle(self) -> None:
        if self.current is not None and self.idle_timeout() == 0.0:
            await asyncio.to_thread(self.close)

    def close(self) -> None:
        current, self.current = self.current, None
        if current is not None:
            current.fo.close()

    def _open(self, seq: int) -> _Open:
        now = self.sink.clock()
        relative = self.sink.name_for(seq, now)
        _makedirs((self.sink.root / relative).parent)
        for attempt in range(1, 1000):
            path = self.sink.root / relative
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _FILE_MODE)
                break
            except FileExistsError:
                if path.stat().st_size == 0:  # created just before a crash, never written
                    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
                    break
                # Someone else's data (a directory kept across a new database): never
                # overwrite it, take the next free name.
                relative = relative.with_name(f"{relative.name.split('.')[0]}"
                                              f".{seq:012d}-{attempt}{relative.suffix}")
        else:
            raise OSError(f"no free file name for {relative}")
        fo = os.fdopen(fd, "wb")
        _fsync_dir(path.parent)
        _write_atomic(self.sink.state, json.dumps({"file": str(relative),
                                                   "after": self.last_synced}))
        avro = AvroWriter(fo, _SCHEMA) if self.spec.format == "avro" else None
        return _Open(path, fo, now, fo.tell(), avro)

    def _sync(self, current: _Open) -> None:
        if current.avro is not None:
            current.avro.flush()
        current.fo.flush()
        os.fsync(current.fo.fileno())
        current.size = current.fo.tell()
        current.dirty = False

    def write(self, items: Sequence[tuple[int, Any, int]]) -> int:
        """Write and fsync ``items`` ((seq, line bytes or Avro record, size)), rolling as
        needed (a file is fsynced before it is closed); return how many there were. On an
        error the file is dropped (the next session's recovery cuts it back) and the error
        carries how many leading items are durable."""
        done = 0
        try:
            for i, (seq, item, nbytes) in enumerate(items):
                current = self.current
                if current is not None and (
                        current.size >= self.spec.roll_bytes
                        or self.sink.clock() - current.opened >= self.spec.roll_seconds):
                    if current.dirty:
                        self._sync(current)
                        done, self.last_synced = i, items[i - 1][0]
                    self.close()
                    current = None
                if current is None:
                    current = self.current = self._open(seq)
                if current.avro is not None:
                    current.avro.write(item)
                else:
                    current.fo.write(item)
                current.size += nbytes
                current.dirty = True
            if self.current is not None and self.current.dirty:
                self._sync(self.current)
            if items:
                done, self.last_synced = len(items), items[-1][0]
            return done
        except OSError as exc:
            with contextlib.suppress(OSError):
                self.close()
            raise _WriteFailed(done, exc) from None

    async def deliver(self, batch: Sequence[Delivery], progress: Progress) -> None:
        items: list[tuple[int, Any, int]]
        if self.spec.format == "avro":  # the size counts the body and a guess for the rest
            items = [(d.seq, avro_record(d), len(d.body) + 200) for d in batch]
        else:
            items = [(d.seq, line, len(line)) for d in batch for line in (json_line(d),)]
        try:
            done = await asyncio.to_thread(self.write, items)
        except _WriteFailed as failed:
            progress.ack_through(failed.done)
            exc = failed.error
            raise EndpointError(f"{self.sink.root}: {exc.strerror or exc}") from None
        progress.ack_through(done)


class _WriteFailed(Exception):
    def __init__(self, done: int, error: OSError) -> None:
        super().__init__(str(error))
        self.done = done
        self.error = error
