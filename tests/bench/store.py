"""Benchmark of the durable store's hot path: MessageLog.append with group commit.

For synchronous FULL and NORMAL and for appends of 1, 10, 100 and 1000 records (200-byte bodies,
a typical ~120-byte property JSON), it runs concurrent appenders that each await their append
before the next (as a QoS 1 publisher with one message in flight would), and prints records/s,
append calls/s, commits/s, records per commit and the process CPU per record. A single
sequential appender shows the raw commit (fsync) rate.

    python3 tests/bench/store.py [--seconds 2] [--appenders 100] [--dir DIR] [--uvloop]

The database goes in a temporary directory on DIR (default: the system temp dir); use a real
disk, not tmpfs, or FULL measures nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Literal

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from gateway.store import Database, MessageLog, Record

BODY = bytes(range(200))
PROPS = (
    '{"$.cdid":"sensor-0001","$.mid":"modbus","$.ct":"application/json","$.ce":"utf-8",'
    '"$.cmid":"","alert":"false","unit":"C"}'
)


async def measure(
    root: Path,
    sync: Literal["full", "normal"],
    batch: int,
    appenders: int,
    seconds: float,
) -> tuple[float, float, float, float, float]:
    path = root / f"bench-{sync}-{batch}-{appenders}.sqlite"
    db = Database(path, synchronous=sync)
    await db.open()
    log = MessageLog(db, max_bytes=1 << 40)
    await log.open()
    records = [
        Record("telemetry", f"sensor-{i:04d}", "modbus", 1_700_000_000_000, PROPS, BODY)
        for i in range(batch)
    ]
    stop = False
    calls = 0

    async def appender() -> None:
        nonlocal calls
        while not stop:
            await log.append(records)
            calls += 1

    start_commits, start_appended = log.stats().commits, log.stats().appended
    cpu0, t0 = time.process_time(), time.perf_counter()
    async with asyncio.TaskGroup() as tg:
        for _ in range(appenders):
            tg.create_task(appender())
        await asyncio.sleep(seconds)
        stop = True
    elapsed = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    stats = log.stats()
    await db.close()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    appended = stats.appended - start_appended
    commits = stats.commits - start_commits
    return (
        appended / elapsed,
        calls / elapsed,
        commits / elapsed,
        appended / max(commits, 1),
        cpu / max(appended, 1) * 1e6,
    )


async def main(args: argparse.Namespace) -> None:
    root = Path(tempfile.mkdtemp(prefix="store-bench-", dir=args.dir))
    try:
        print(f"sqlite store bench: {root} ({args.seconds:g} s per row)")
        print(
            f"{'sync':<7}{'batch':>6}{'appenders':>10}{'records/s':>12}{'appends/s':>11}"
            f"{'commits/s':>11}{'rec/commit':>11}{'cpu us/rec':>11}"
        )
        for sync in ("full", "normal"):
            plan = [(1, 1)] + [(b, args.appenders) for b in (1, 10, 100, 1000)]
            for batch, appenders in plan:
                rps, aps, cps, per, cpu = await measure(root, sync, batch, appenders, args.seconds)
                print(
                    f"{sync:<7}{batch:>6}{appenders:>10}{rps:>12,.0f}{aps:>11,.0f}"
                    f"{cps:>11,.0f}{per:>11,.1f}{cpu:>11.2f}",
                    flush=True,
                )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--appenders", type=int, default=100)
    parser.add_argument("--dir", default=None, help="where to put the database")
    parser.add_argument("--uvloop", action="store_true")
    args = parser.parse_args()
    if args.uvloop:
        import uvloop

        uvloop.run(main(args))
    else:
        asyncio.run(main(args))
