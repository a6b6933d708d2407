"""The durable twin store: every twin in memory, written through to SQLite (IoT Hub ref §4).

Reads (:meth:`TwinStore.get`) are dictionary look-ups. Writes compute the new twin with the
pure :mod:`gateway.hub.twins`, commit it through the shared :class:`~gateway.store.db.Database`
(one writer thread, group commit: concurrent writes to different twins share one fsync) and
only then replace the twin in memory, so a twin that was read has been durable.

Writes to one twin are chained, not serialized: each computes its new twin from the state the
twin will have once the writes already in flight commit (the twin's *head*), and is queued
behind them, so a device with several reported patches outstanding gets them all into one
group commit instead of one fsync each. Each UPDATE is guarded by the version it started
from: if a write fails, the writes chained on it fail too (their guard no longer matches)
and the head falls back to the committed twin. Computing and queueing happen in one step on
the event loop, so the queue order is the order in which callers asked. The memory copy is
replaced by a callback on the commit's future, in commit order, so it matches the database
whether or not the caller is still waiting.

One row per twin; a write updates only the columns of the sections it changed. The JSON
encoding happens on the event loop before the write is queued, so transaction bodies are
plain SQL (they may run twice, see :meth:`Database.submit`) and every UPDATE is guarded by
the version it started from.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import time
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any, Final, TypeAlias, TypeVar

import orjson

from gateway.errors import NotFoundError
from gateway.hub import twins
from gateway.hub.twinmirror import OWNER, mirror_desired
from gateway.hub.twins import Twin
from gateway.store.db import Database, Migration

__all__ = ["MIGRATION", "TwinStore"]

log = logging.getLogger(__name__)

T = TypeVar("T")
Key: TypeAlias = tuple[str, str | None]  # (device_id, module_id); None for a device twin

MIGRATION: Final[Migration] = (
    "twins",
    (
        # module_id is '' for a device twin (module ids are never empty). A rowid table, not
        # WITHOUT ROWID: rows may reach a few hundred KB.
        """
        CREATE TABLE twins(
            device_id TEXT NOT NULL,
            module_id TEXT NOT NULL,
            version INTEGER NOT NULL,
            etag TEXT NOT NULL,
            tags TEXT NOT NULL,
            desired TEXT NOT NULL,
            desired_meta TEXT NOT NULL,
            desired_version INTEGER NOT NULL,
            reported TEXT NOT NULL,
            reported_meta TEXT NOT NULL,
            reported_version INTEGER NOT NULL,
            PRIMARY KEY (device_id, module_id));
        """,
    ),
)

_COLUMNS: Final = (
    "device_id", "module_id", "version", "etag", "tags", "desired", "desired_meta",
    "desired_version", "reported", "reported_meta", "reported_version",
)
_INSERT: Final = (
    f"INSERT INTO twins({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})"
    " ON CONFLICT(device_id, module_id) DO NOTHING"
)
_json_encode = json.JSONEncoder(ensure_ascii=False, allow_nan=False,
                                separators=(",", ":")).encode


def _encode(value: Any) -> str:
    """A section's stored JSON text. orjson first (several times faster than ``json``; its
    output parses to the same tree): every section value passed ``twins.validate_patch``
    (finite floats, integers within 2**52), so orjson's NaN-as-null never applies; anything
    it refuses goes through ``json`` (which raises as before)."""
    try:
        return orjson.dumps(value).decode()
    except TypeError:
        return _json_encode(value)


class _Head:
    """What a twin will be once its writes in flight commit (None: deleted, or not created),
    how many writes are in flight, and the commit future of the last one."""

    __slots__ = ("last", "twin", "writes")

    def __init__(self, twin: Twin | None, last: asyncio.Future[Any]) -> None:
        self.twin = twin
        self.last = last
        self.writes = 0


_Start = Callable[[], tuple["asyncio.Future[Any] | None", Callable[[], T], Mapping[Key, "Twin | None"]]]


class TwinStore:
    """Device and module twins, served from memory and written through to SQLite.

    ``await open()`` first (it migrates the ``twins`` table and loads every twin). All methods
    must be called on the event loop that opened the database. ``clock`` gives epoch seconds
    for the ``$metadata`` timestamps."""

    def __init__(self, db: Database, *, clock: Callable[[], float] = time.time) -> None:
        self._db = db
        self._clock = clock
        self._twins: dict[str, dict[str | None, Twin]] = {}  # device_id -> module_id -> twin
        self._heads: dict[Key, _Head] = {}  # twins with writes in flight
        self.changes = 0  # counts changes to what get() returns (the router's cue to look again)

    async def open(self) -> None:
        """Create or migrate the table, then load every twin into memory."""
        await self._db.migrate(MIGRATION)
        loaded = await self._db.run(_load_all)
        self._twins = {}
        self.changes += 1
        for twin in loaded:
            self._twins.setdefault(twin.device_id, {})[twin.module_id] = twin
        log.info("twins loaded count=%d", len(loaded))

    def __len__(self) -> int:
        return sum(len(by_module) for by_module in self._twins.values())

    # -- reads ---------------------------------------------------------------------------------

    def get(self, device_id: str, module_id: str | None = None) -> Twin | None:
        """The committed twin, or None."""
        by_module = self._twins.get(device_id)
        return None if by_module is None else by_module.get(module_id)

    def module_twins(self, device_id: str) -> list[Twin]:
        """The twins of ``device_id``'s modules."""
        by_module = self._twins.get(device_id, {})
        return [twin for module_id, twin in by_module.items() if module_id is not None]

    # -- writes --------------------------------------------------------------------------------

    async def ensure(self, device_id: str, module_id: str | None = None) -> Twin:
        """The twin of an identity, created (empty, version 1) if it has none yet: call it
        when an identity is created, and for every identity at start-up. Returns a committed
        twin (a creation in flight is waited for)."""
        key = (device_id, module_id)
        while True:
            twin = self.get(device_id, module_id)
            if twin is not None:
                return twin
            head = self._heads.get(key)
            if head is None or head.twin is None:
                return await self._write([key], partial(self._create, key))
            await asyncio.wait([head.last])

    async def delete(self, device_id: str, module_id: str | None = None) -> None:
        """Remove a twin because its identity was deleted; for a device (``module_id`` None)
        also the twins of its modules. Missing twins are not an error."""
        keys: list[Key] = [(device_id, module_id)]
        if module_id is None:
            modules = {m for m in self._twins.get(device_id, {}) if m is not None}
            modules.update(m for d, m in self._heads if d == device_id and m is not None)
            keys += [(device_id, m) for m in sorted(modules)]
        await self._write(keys, partial(self._remove, keys))

    async def update_reported(
        self, device_id: str, module_id: str | None, patch: Mapping[str, Any], *,
        expected_version: int | None = None, notify: bool = True,
    ) -> tuple[Twin, dict[str, Any]]:
        """Merge a device's reported patch (see :func:`twins.patch_reported`) and commit it.
        Returns the committed twin (its ``reported_version`` is the ``$version`` of the MQTT
        204 reply) and the ``updateTwin`` notification body (empty unless ``notify``).
        Raises NotFoundError if the twin does not exist, InvalidRequestError /
        PreconditionFailedError from the model."""
        return await asyncio.shield(self.start_update_reported(
            device_id, module_id, patch, expected_version=expected_version, notify=notify))

    def start_update_reported(
        self, device_id: str, module_id: str | None, patch: Mapping[str, Any], *,
        expected_version: int | None = None, notify: bool = True,
    ) -> asyncio.Future[tuple[Twin, dict[str, Any]]]:
        """:meth:`update_reported` without a coroutine (the MQTT patch path: no task per
        patch): the merge runs now, and errors of the model (NotFoundError,
        InvalidRequestError, PreconditionFailedError) are raised now; the returned future
        resolves once the write committed and memory holds it (or with the store's error)."""
        key = (device_id, module_id)

        def compute() -> tuple[Twin, Twin, tuple[Twin, dict[str, Any]]]:
            twin = self._existing(key)
            new, change = twins.patch_reported(twin, patch, now=self._clock(),
                                               expected_version=expected_version,
                                               notify=notify)
            return twin, new, (new, change)

        return self._start_write([key], partial(self._update, compute, ("reported",)))

    async def update_desired(
        self, device_id: str, module_id: str | None, body: Mapping[str, Any], *,
        if_match: str | None = None, replace: bool = False,
    ) -> tuple[Twin, dict[str, Any], dict[str, Any] | None]:
        """Apply a service twin write: PATCH (:func:`twins.patch_desired_and_tags`, an
        ``updateTwin`` notification) or, with ``replace``, PUT (:func:`twins.replace_twin`,
        a ``replaceTwin`` notification). Returns the committed twin, the notification body
        and the desired patch to push to the device (None if desired was not written)."""
        key = (device_id, module_id)
        operation = twins.replace_twin if replace else twins.patch_desired_and_tags

        def compute() -> tuple[Twin, Twin, tuple[Twin, dict[str, Any], dict[str, Any] | None]]:
            twin = self._existing(key)
            new, change, push = operation(twin, body, now=self._clock(), if_match=if_match)
            return twin, new, (new, change, push)

        return await self._write([key], partial(self._update, compute, ("tags", "desired")))

    async def mirror_desired(
        self, device_id: str, module_id: str | None, *, version: int,
        patch: Mapping[str, Any] | None, desired: Mapping[str, Any], owner: str,
    ) -> tuple[Twin, dict[str, Any], dict[str, Any] | None] | None:
        """Apply the parent's desired state (:func:`twinmirror.mirror_desired`); None if it
        was already applied. Federation: the owner's ``$version`` is kept."""
        key = (device_id, module_id)
        current = self._existing(key)
        if version < current.desired_version or (
                version == current.desired_version and OWNER in current.desired_meta):
            return None  # a resend of what we have: no write
        skipped: list[bool] = []

        def compute() -> tuple[Twin, Twin, tuple[Twin, dict[str, Any], dict[str, Any] | None]]:
            twin = self._existing(key)
            done = mirror_desired(twin, version=version, patch=patch, desired=desired,
                                  owner=owner, now=self._clock())
            if done is None:
                skipped.append(True)
                return twin, twin, (twin, {}, {})
            return twin, done[0], done

        result = await self._write([key], partial(self._update, compute, ("desired",)))
        return None if skipped else result

    # -- the write protocol ----------------------------------------------------------------------

    async def _write(self, keys: list[Key], start: _Start[T]) -> T:
        """``start()`` computes the write from the heads of ``keys`` and queues its body; it
        returns the commit future (None if there is nothing to write), the function that
        applies the result to memory, and each key's twin once it commits. The heads move
        on at once; memory, when the commit succeeds."""
        return await asyncio.shield(self._start_write(keys, start))

    def _start_write(self, keys: list[Key], start: _Start[T]) -> asyncio.Future[T]:
        """:meth:`_write` up to the commit: the future of its result (set, in commit order,
        by the commit's callback, after memory was updated)."""
        result: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        committed, apply, after = start()
        if committed is None:
            result.set_result(apply())
            return result
        heads: list[tuple[Key, _Head]] = []
        for key in keys:
            head = self._heads.get(key)
            if head is None:
                head = self._heads[key] = _Head(after[key], committed)
            else:
                head.twin, head.last = after[key], committed
            head.writes += 1
            heads.append((key, head))

        def settle(done: asyncio.Future[Any]) -> None:
            ok = not done.cancelled() and done.exception() is None
            try:
                if ok:
                    value = apply()
                    if not result.done():
                        result.set_result(value)
                elif not result.done():
                    exc = done.exception() if not done.cancelled() else None
                    if exc is None:
                        result.cancel()
                    else:
                        result.set_exception(exc)
            except BaseException as exc:  # applying failed: the caller hears of it
                if not result.done():
                    result.set_exception(exc)
                raise
            finally:
                for key, head in heads:
                    head.writes -= 1
                    if not ok:  # writes chained on this one fail on their version guard
                        head.twin = self.get(*key)
                    if head.writes == 0 and self._heads.get(key) is head:
                        del self._heads[key]

        committed.add_done_callback(settle)
        return result

    def _create(self, key: Key) -> tuple[asyncio.Future[Any] | None, Callable[[], Twin],
                                         Mapping[Key, Twin | None]]:
        existing = self._current(key)
        if existing is not None:
            return None, lambda: existing, {}
        twin = twins.new_twin(key[0], key[1], now=self._clock())
        row = _row(twin)

        def apply() -> Twin:
            self._put(twin)
            return twin

        return self._db.submit(partial(_insert, row)), apply, {key: twin}

    def _remove(self, keys: list[Key]) -> tuple[asyncio.Future[Any] | None, Callable[[], None],
                                                Mapping[Key, Twin | None]]:
        device_id, module_id = keys[0]

        def apply() -> None:
            self.changes += 1
            if module_id is None:
                self._twins.pop(device_id, None)
            else:
                by_module = self._twins.get(device_id)
                if by_module is not None:
                    by_module.pop(module_id, None)
                    if not by_module:
                        del self._twins[device_id]

        return (self._db.submit(partial(_delete, device_id, module_id)), apply,
                dict.fromkeys(keys))

    def _update(self, compute: Callable[[], tuple[Twin, Twin, T]], sections: tuple[str, ...],
                ) -> tuple[asyncio.Future[Any] | None, Callable[[], T], Mapping[Key, Twin | None]]:
        old, new, result = compute()
        values: dict[str, Any] = {"version": new.version, "etag": new.etag}
        for section in sections:
            if _changed(old, new, section):
                values.update(_section_columns(new, section))

        def apply() -> T:
            self._put(new)
            return result

        body = partial(_update_row, old.device_id, old.module_id, old.version, values)
        return self._db.submit(body), apply, {(old.device_id, old.module_id): new}

    def _current(self, key: Key) -> Twin | None:
        """Where the next write to ``key`` starts: its head, else the committed twin."""
        head = self._heads.get(key)
        return head.twin if head is not None else self.get(*key)

    def _existing(self, key: Key) -> Twin:
        twin = self._current(key)
        if twin is None:
            name = key[0] if key[1] is None else f"{key[0]}/{key[1]}"
            raise NotFoundError(f"twin {name!r} does not exist")
        return twin

    def _put(self, twin: Twin) -> None:
        self.changes += 1
        self._twins.setdefault(twin.device_id, {})[twin.module_id] = twin


def _changed(old: Twin, new: Twin, section: str) -> bool:
    if section == "tags":
        return old.tags is not new.tags
    if section == "desired":  # (a mirror's owner mark changes the metadata alone)
        return (old.desired_version != new.desired_version
                or old.desired_meta is not new.desired_meta)
    return old.reported_version != new.reported_version


def _section_columns(twin: Twin, section: str) -> dict[str, Any]:
    """The columns of one section, encoded (only what a write changed is encoded)."""
    if section == "tags":
        return {"tags": _encode(twin.tags)}
    if section == "desired":
        return {"desired": _encode(twin.desired), "desired_meta": _encode(twin.desired_meta),
                "desired_version": twin.desired_version}
    return {"reported": _encode(twin.reported), "reported_meta": _encode(twin.reported_meta),
            "reported_version": twin.reported_version}


def _row(twin: Twin) -> tuple[Any, ...]:
    return (
        twin.device_id, twin.module_id or "", twin.version, twin.etag, _encode(twin.tags),
        _encode(twin.desired), _encode(twin.desired_meta), twin.desired_version,
        _encode(twin.reported), _encode(twin.reported_meta), twin.reported_version,
    )


# --- transaction bodies (run on the db thread; may run twice) ---------------------------------

def _load_all(conn: sqlite3.Connection) -> list[Twin]:
    """Every twin. Metadata leaves with equal content become one shared mapping (in memory
    the twins share the stamp of each write; decoding would otherwise give every leaf its own
    dict and string, several times the memory)."""
    loads = json.loads
    stamps: dict[tuple[tuple[str, Any], ...], dict[str, Any]] = {}

    def shared(node: dict[str, Any]) -> dict[str, Any]:
        for key in node:
            if key[:1] != "$":
                return node
        return stamps.setdefault(tuple(node.items()), node)

    def loads_meta(text: str) -> Any:
        return json.loads(text, object_hook=shared)

    return [
        Twin(device_id=device_id, module_id=module_id or None, tags=loads(tags),
             desired=loads(desired), reported=loads(reported),
             desired_meta=loads_meta(desired_meta), reported_meta=loads_meta(reported_meta),
             desired_version=desired_version, reported_version=reported_version,
             version=version, etag=etag)
        for (device_id, module_id, version, etag, tags, desired, desired_meta, desired_version,
             reported, reported_meta, reported_version)
        in conn.execute(f"SELECT {', '.join(_COLUMNS)} FROM twins")
    ]


def _insert(row: tuple[Any, ...], conn: sqlite3.Connection) -> None:
    if conn.execute(_INSERT, row).rowcount != 1:  # a delete before it failed: do not fork
        raise NotFoundError(f"twin {row[0]!r}/{row[1]!r} still exists (an earlier delete failed)")


def _delete(device_id: str, module_id: str | None, conn: sqlite3.Connection) -> None:
    if module_id is None:
        conn.execute("DELETE FROM twins WHERE device_id = ?", (device_id,))
    else:
        conn.execute("DELETE FROM twins WHERE device_id = ? AND module_id = ?",
                     (device_id, module_id))


def _update_row(device_id: str, module_id: str | None, from_version: int,
                values: Mapping[str, Any], conn: sqlite3.Connection) -> None:
    # Column names come from _COLUMNS, never from callers.
    assignments = ", ".join(f"{column} = ?" for column in values)
    cursor = conn.execute(
        f"UPDATE twins SET {assignments} WHERE device_id = ? AND module_id = ? AND version = ?",
        (*values.values(), device_id, module_id or "", from_version))
    if cursor.rowcount != 1:
        name = device_id if module_id is None else f"{device_id}/{module_id}"
        raise NotFoundError(f"twin {name!r} is gone or changed underneath (version {from_version})")
