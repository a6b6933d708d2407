"""The registry's SQLite file: schema, documents, one connection on one thread.

WAL mode with ``synchronous=FULL``; each write is one transaction. The file holds keys, so it
and its ``-wal`` and ``-shm`` files are mode 0600 (:mod:`gateway.store.files`).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from dataclasses import asdict, fields
from pathlib import Path
from typing import TypeVar

from gateway.errors import StoreError
from gateway.hub.cacerts import CaCertificate
from gateway.hub.identities import Device, Module
from gateway.hub.policies import Policy
from gateway.store.files import private_sqlite_files

_Doc = TypeVar("_Doc", Device, Module, CaCertificate)

_CONNECTION_FIELDS = ("connection_state", "connection_state_updated", "last_activity")
_SCHEMA = (
    ("CREATE TABLE IF NOT EXISTS devices (device_id TEXT PRIMARY KEY, doc TEXT NOT NULL)"
     " WITHOUT ROWID"),
    ("CREATE TABLE IF NOT EXISTS modules (device_id TEXT NOT NULL, module_id TEXT NOT NULL,"
     " doc TEXT NOT NULL, PRIMARY KEY (device_id, module_id)) WITHOUT ROWID"),
    ("CREATE TABLE IF NOT EXISTS policies (name TEXT PRIMARY KEY, doc TEXT NOT NULL)"
     " WITHOUT ROWID"),
    ("CREATE TABLE IF NOT EXISTS certificates (name TEXT PRIMARY KEY, doc TEXT NOT NULL)"
     " WITHOUT ROWID"),
)
_SCHEMA_VERSION = 2  # 2: CA certificates (every step is CREATE ... IF NOT EXISTS)
PUT_DEVICE = "INSERT OR REPLACE INTO devices (device_id, doc) VALUES (?, ?)"
PUT_MODULE = "INSERT OR REPLACE INTO modules (device_id, module_id, doc) VALUES (?, ?, ?)"
PUT_CERTIFICATE = "INSERT OR REPLACE INTO certificates (name, doc) VALUES (?, ?)"

Statement = tuple[str, tuple[str, ...]]
_TABLES = ("devices", "modules", "policies", "certificates")


def dump(value: Device | Module | Policy | CaCertificate) -> str:
    record = asdict(value)
    for name in _CONNECTION_FIELDS:
        record.pop(name, None)
    if isinstance(value, Policy):
        record["rights"] = sorted(value.rights)
    return json.dumps(record, separators=(",", ":"), sort_keys=True)


def load(cls: type[_Doc], doc: str) -> _Doc:
    record = json.loads(doc)
    names = {f.name for f in fields(cls)}
    record = {k: v for k, v in record.items() if k in names}
    if "parent_scopes" in record:
        record["parent_scopes"] = tuple(record["parent_scopes"])
    return cls(**record)


class RegistryDatabase:
    """The sqlite3 connection. Every method runs on the registry's single worker thread."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._conn: sqlite3.Connection | None = None

    def open(self) -> dict[str, list[str]]:
        """Create/migrate the schema; return each table's documents, by table name."""
        self._path.parent.mkdir(parents=True, exist_ok=True)
        private_sqlite_files(self._path)
        conn = sqlite3.connect(self._path, isolation_level=None)
        self._conn = conn
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA cache_size=-256")  # 256 KiB: read once at start, then written
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > _SCHEMA_VERSION:
            raise StoreError(f"{self._path}: schema version {version} is newer than this code")
        if version < _SCHEMA_VERSION:
            self.write([(sql, ()) for sql in _SCHEMA]
                       + [(f"PRAGMA user_version = {_SCHEMA_VERSION}", ())])
        def docs(table: str) -> list[str]:
            return [doc for (doc,) in conn.execute(f"SELECT doc FROM {table}")]

        return {table: docs(table) for table in _TABLES}

    def write(self, statements: Sequence[Statement]) -> None:
        """Run ``statements`` in one transaction."""
        assert self._conn is not None
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            for sql, params in statements:
                conn.execute(sql, params)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


