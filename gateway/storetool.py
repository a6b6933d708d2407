"""``gateway store inspect|export``: the store, read-only, for a technician.

Built on sqlite-utils over a read-only SQLite connection (``mode=ro``), so it is safe while the
hub runs (WAL readers never block the writer) and can never change what it looks at. ``inspect``
gives the tables and their sizes, the built-in log with the backlog behind every cursor (every
endpoint, module input and reader), and the C2D queues; ``export`` writes one device's stored
messages as JSON lines or CSV, in the monitor-events shape.
"""

from __future__ import annotations

import csv
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import sqlite_utils

from gateway.api.events import entry_json
from gateway.errors import GatewayError, NotFoundError
from gateway.store.log import Entry

DATABASES = ("hub.db", "registry.db")


def open_readonly(path: Path) -> sqlite_utils.Database:
    if not path.exists():
        raise NotFoundError(f"{path} does not exist (has the hub ever started here?)")
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.Error as exc:
        raise GatewayError(f"cannot read {path}: {exc}") from None
    return sqlite_utils.Database(conn)


def _dbstat(db: sqlite_utils.Database) -> dict[str, int]:
    """Bytes per table and index, when SQLite was built with the dbstat table (Debian's is)."""
    try:
        rows = db.execute("SELECT name, sum(pgsize) FROM dbstat GROUP BY name").fetchall()
    except sqlite3.Error:
        return {}
    return {str(name): int(size) for name, size in rows}


def inspect(data_dir: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"dataDir": str(data_dir), "databases": {}}
    for name in DATABASES:
        path = data_dir / name
        if not path.exists():
            continue
        db = open_readonly(path)
        sizes = _dbstat(db)
        files = {p.name: p.stat().st_size for p in (path, path.with_name(name + "-wal"))
                 if p.exists()}
        tables = []
        for table in db.tables:
            tables.append({"name": table.name, "rows": table.count,
                           "bytes": sizes.get(table.name)})
        out["databases"][name] = {"files": files, "tables": tables}
        if name == "hub.db":
            out.update(_hub_figures(db))
        db.conn.close()
    return out


def _hub_figures(db: sqlite_utils.Database) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    if "log_messages" in db.table_names():
        count, nbytes, first, last, oldest, newest = db.execute(
            "SELECT count(*), coalesce(sum(length(body) + length(props)), 0), min(seq), "
            "max(seq), min(enqueued_ms), max(enqueued_ms) FROM log_messages").fetchone()
        kinds = dict(db.execute(
            "SELECT kind, count(*) FROM log_messages GROUP BY kind ORDER BY kind").fetchall())
        figures["log"] = {"messages": count, "bytes": nbytes, "firstSeq": first,
                          "lastSeq": last, "oldestEnqueuedMs": oldest,
                          "newestEnqueuedMs": newest, "byKind": kinds}
        backlog = []
        if "log_cursors" in db.table_names():
            for cursor, seq, pinned in db.execute(
                    "SELECT name, seq, pinned FROM log_cursors ORDER BY name").fetchall():
                behind, behind_bytes = db.execute(
                    "SELECT count(*), coalesce(sum(length(body) + length(props)), 0) "
                    "FROM log_messages WHERE seq > ?", [seq]).fetchone()
                backlog.append({"cursor": cursor, "seq": seq, "pinned": bool(pinned),
                                "behind": behind, "behindBytes": behind_bytes})
        figures["backlog"] = backlog
    if "c2d_messages" in db.table_names():
        figures["c2d"] = [{"deviceId": d, "queued": n} for d, n in db.execute(
            "SELECT device_id, count(*) FROM c2d_messages GROUP BY device_id "
            "ORDER BY device_id").fetchall()]
    return figures


def device_entries(data_dir: Path, device_id: str, module_id: str | None = None,
                   kind: str | None = "telemetry") -> Iterator[Entry]:
    db = open_readonly(data_dir / "hub.db")
    where, params = ["device_id = ?"], [device_id]
    if module_id is not None:
        where.append("module_id = ?")
        params.append(module_id)
    if kind is not None:
        where.append("kind = ?")
        params.append(kind)
    try:
        for row in db.execute(
                "SELECT seq, kind, device_id, module_id, enqueued_ms, props, body "
                f"FROM log_messages WHERE {' AND '.join(where)} ORDER BY seq", params):
            yield Entry(*row)
    finally:
        db.conn.close()


CSV_FIELDS = ("seq", "enqueuedTime", "deviceId", "moduleId", "messageId", "contentType",
              "properties", "body")


def export(data_dir: Path, device_id: str, out: IO[str], *, fmt: str = "jsonl",
           module_id: str | None = None, host_name: str = "") -> int:
    """Write ``device_id``'s stored telemetry to ``out``; returns how many messages."""
    if fmt not in ("jsonl", "csv"):
        raise GatewayError(f"unknown format {fmt!r} (jsonl or csv)")
    writer = csv.DictWriter(out, CSV_FIELDS) if fmt == "csv" else None
    if writer is not None:
        writer.writeheader()
    n = 0
    for entry in device_entries(data_dir, device_id, module_id):
        view = entry_json(entry, host_name)
        if writer is None:
            out.write(json.dumps(view, separators=(",", ":")) + "\n")
        else:
            event = view.get("event", {})
            system = event.get("properties", {}).get("system", {})
            annotations = event.get("annotations", {})
            payload = event.get("payload")
            writer.writerow({
                "seq": entry.seq, "enqueuedTime": annotations.get("iothub-enqueuedtime"),
                "deviceId": entry.device_id, "moduleId": entry.module_id or "",
                "messageId": system.get("message_id", ""),
                "contentType": system.get("content_type", ""),
                "properties": json.dumps(event.get("properties", {}).get("application", {})),
                "body": payload if isinstance(payload, str) else json.dumps(payload),
            })
        n += 1
    return n
