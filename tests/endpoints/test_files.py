"""The file endpoint: JSON lines and Avro, Azure Storage names, rolling, fsync-then-ack and
recovery of a torn tail."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import fastavro
import pytest

from gateway.endpoints.manager import EndpointManager, Tuning
from gateway.endpoints.spec import parse_endpoint
from gateway.store import Entry, MessageLog
from tests.endpoints.peers import open_log, record
from tests.endpoints.test_mqtt_endpoint import running
from tests.waiting import eventually

FAST = Tuning(backoff_initial=0.05, backoff_max=0.3, dead_after=3.0)
NAME = re.compile(r"hub1/\d{4}/\d\d/\d\d/\d\d/\d\d\.(\d{12})\.(jsonl|avro)")


def data_files(root: Path) -> list[Path]:
    """The endpoint's files in the order written (by the first seq in the name)."""
    found = [p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")]
    for p in found:
        assert NAME.fullmatch(str(p.relative_to(root))), p
    return sorted(found, key=lambda p: int(p.name.split(".")[1]))


def read_jsonl(root: Path) -> list[dict[str, Any]]:
    out = []
    for path in data_files(root):
        text = path.read_text(encoding="utf-8")
        assert text.endswith("\n")
        out += [json.loads(line) for line in text.splitlines()]
    return out


def all_entries(name: str):  # type: ignore[no-untyped-def]
    return lambda e: True


def enrich(name: str, entry: Entry) -> dict[str, str]:
    return {"line": "A"}


@pytest.fixture
async def log(tmp_path: Path) -> AsyncIterator[MessageLog]:
    db, log = await open_log(tmp_path / "hub.db")
    yield log
    await db.close()


async def test_jsonl_rolls_by_size_and_holds_every_message(tmp_path: Path,
                                                           log: MessageLog) -> None:
    out = tmp_path / "out"
    manager = EndpointManager(log, hub_name="hub1", data_dir=tmp_path, tuning=FAST)
    spec = parse_endpoint("arch", {"type": "file", "path": str(out), "rollBytes": 3000})
    await manager.apply([spec], lambda n: all_entries(n), enrich)
    async with running(manager):
        for i in range(0, 60, 6):
            await log.append([record(f"d{j % 2}", j) for j in range(i, i + 6)])
        await eventually(lambda: manager.health("arch")[0]["backlog"] == 0, 10, "drained")
        assert manager.health("arch")[0]["delivered"] == 60
    files = data_files(out)
    assert len(files) >= 5
    for path in files[:-1]:  # each rolled once it reached the size
        assert path.stat().st_size >= 3000
        assert path.stat().st_size < 3000 + 600
    lines = read_jsonl(out)
    assert [line["body"]["i"] for line in lines] == list(range(60))
    assert lines[0]["properties"] == {"i": "0", "line": "A"}
    assert lines[0]["systemProperties"]["iothub-connection-device-id"] == "d0"
    firsts = [int(p.name.split(".")[1]) for p in files]
    starts = [json.loads(p.read_text().splitlines()[0])["systemProperties"]
              ["x-opt-sequence-number"] for p in files]
    assert firsts == starts  # the name carries the first message's seq
    assert oct(files[0].stat().st_mode & 0o777) == "0o640"


async def test_rolls_by_time_while_idle(tmp_path: Path, log: MessageLog) -> None:
    out = tmp_path / "out"
    manager = EndpointManager(log, hub_name="hub1", data_dir=tmp_path, tuning=FAST)
    spec = parse_endpoint("t", {"type": "file", "path": str(out), "rollSeconds": 1})
    await manager.apply([spec], lambda n: all_entries(n), enrich)
    async with running(manager):
        await log.append([record("d", 0), record("d", 1)])
        await eventually(lambda: manager.health("t")[0]["delivered"] == 2, 10, "first file")
        await asyncio.sleep(1.3)
        await log.append([record("d", 2)])
        await eventually(lambda: manager.health("t")[0]["delivered"] == 3, 10, "second file")
    assert [len(p.read_text().splitlines()) for p in data_files(out)] == [2, 1]


async def test_avro_as_azure_storage_writes_it(tmp_path: Path, log: MessageLog) -> None:
    out = tmp_path / "out"
    manager = EndpointManager(log, hub_name="hub1", data_dir=tmp_path, tuning=FAST)
    spec = parse_endpoint("av", {"type": "file", "path": str(out), "format": "avro",
                                 "rollBytes": 2000})
    await manager.apply([spec], lambda n: lambda e: e.device_id == "keep", enrich)
    async with running(manager):
        for i in range(40):
            await log.append([record("keep", i, module="m1" if i % 2 else None),
                              record("skip", i)])
        await eventually(lambda: manager.health("av")[0]["backlog"] == 0, 10, "drained")
    records: list[dict[str, Any]] = []
    files = data_files(out)
    assert len(files) >= 2 and all(p.suffix == ".avro" for p in files)
    for path in files:
        with open(path, "rb") as fo:
            reader = fastavro.reader(fo)
            assert [f["name"] for f in reader.writer_schema["fields"]] == [  # type: ignore
                "EnqueuedTimeUtc", "Properties", "SystemProperties", "Body"]
            records += list(reader)  # type: ignore[arg-type]
    assert [json.loads(r["Body"])["i"] for r in records] == list(range(40))
    first, second = records[0], records[1]
    assert first["Properties"] == {"i": "0", "line": "A"}
    assert first["SystemProperties"]["connectionDeviceId"] == "keep"
    assert first["SystemProperties"]["contentType"] == "application/json"
    assert second["SystemProperties"]["connectionModuleId"] == "m1"
    assert first["EnqueuedTimeUtc"].startswith("2025-12-01T10:00:00.")


async def test_restart_cuts_a_torn_tail_and_repeats_nothing(tmp_path: Path) -> None:
    """A crash after a batch was fsynced but before the cursor moved, with a half-written
    line after it: the restart keeps the whole lines, cuts the torn one, and moves the
    cursor past what the file holds, so nothing appears twice or goes missing."""
    out = tmp_path / "out"
    spec = parse_endpoint("arch", {"type": "file", "path": str(out)})
    db, log = await open_log(tmp_path / "hub.db")
    manager = EndpointManager(log, hub_name="hub1", data_dir=tmp_path, tuning=FAST)
    await manager.apply([spec], lambda n: all_entries(n), enrich)
    async with running(manager):
        await log.append([record("d", i) for i in range(20)])
        await eventually(lambda: manager.health("arch")[0]["backlog"] == 0, 10, "drained")
    await log.set_cursor("endpoint/arch", 12, pin=True)  # the cursor write that never was
    (current,) = data_files(out)
    with open(current, "ab") as fo:
        fo.write(b'{"body":{"device":"d","i":20},"prop')
    await log.append([record("d", i) for i in range(20, 25)])
    manager = EndpointManager(log, hub_name="hub1", data_dir=tmp_path, tuning=FAST)
    await manager.apply([spec], lambda n: all_entries(n), enrich)
    async with running(manager):
        await eventually(lambda: manager.health("arch")[0]["backlog"] == 0, 10, "drained")
        assert manager.health("arch")[0]["delivered"] == 5
    await db.close()
    assert [line["body"]["i"] for line in read_jsonl(out)] == list(range(25))
    assert len(data_files(out)) == 2  # a restart starts a new file


async def test_a_file_created_just_before_a_crash_is_reused(tmp_path: Path,
                                                            log: MessageLog) -> None:
    """kill -9 between creating a new file and naming it in the state file leaves an empty
    file under the name the restart wants: it is taken over, not an endless EEXIST."""
    import time

    from gateway.endpoints.files import FileSink

    out = tmp_path / "out"
    spec = parse_endpoint("arch", {"type": "file", "path": str(out)})
    manager = EndpointManager(log, hub_name="hub1", data_dir=tmp_path, tuning=FAST)
    await manager.apply([spec], lambda n: all_entries(n), enrich)
    async with running(manager):
        await log.append([record("d", i) for i in range(3)])
        await eventually(lambda: manager.health("arch")[0]["backlog"] == 0, 10, "drained")
    sink = FileSink(spec, hub_name="hub1")  # type: ignore[arg-type]
    for when in (time.time(), time.time() + 60):
        empty = out / sink.name_for(4, when)
        empty.parent.mkdir(parents=True, exist_ok=True)
        empty.touch()
    await log.append([record("d", i) for i in range(3, 6)])
    manager = EndpointManager(log, hub_name="hub1", data_dir=tmp_path, tuning=FAST)
    await manager.apply([spec], lambda n: all_entries(n), enrich)
    async with running(manager):
        await eventually(lambda: manager.health("arch")[0]["backlog"] == 0, 10, "drained")
        assert manager.health("arch")[0]["retries"] == 0
    lines = []
    for path in out.rglob("*.jsonl"):
        lines += [json.loads(x)["body"]["i"] for x in path.read_text().splitlines()]
    assert sorted(lines) == list(range(6))


async def test_a_new_database_never_overwrites_or_trusts_old_files(tmp_path: Path) -> None:
    out = tmp_path / "out"
    spec = parse_endpoint("arch", {"type": "file", "path": str(out)})
    for db_name, count in (("one.db", 10), ("two.db", 5)):
        db, log = await open_log(tmp_path / db_name)
        manager = EndpointManager(log, hub_name="hub1", data_dir=tmp_path, tuning=FAST)
        await manager.apply([spec], lambda n: all_entries(n), enrich)
        async with running(manager):
            await log.append([record(db_name, i) for i in range(count)])
            await eventually(lambda: manager.health("arch")[0]["backlog"] == 0, 10, "drained")
            assert manager.health("arch")[0]["delivered"] == count
        await db.close()
    seen = []
    for path in out.rglob("*.jsonl"):
        seen += [(line["body"]["device"], line["body"]["i"])
                 for line in map(json.loads, path.read_text().splitlines())]
    assert sorted(seen) == sorted([("one.db", i) for i in range(10)]
                                  + [("two.db", i) for i in range(5)])
