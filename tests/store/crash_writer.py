"""Subprocess for test_crash_safety: appends forever, printing ``seq first count`` for every
append whose future resolved (flushed at once), until it is killed."""

from __future__ import annotations

import asyncio
import sys

from gateway.store import Database, MessageLog, Record


def make(i: int) -> Record:
    """The record number ``i``; the test rebuilds it to check the stored content."""
    return Record(
        "telemetry" if i % 5 else "lifecycle",
        f"dev{i % 13}",
        None if i % 2 else f"mod{i % 3}",
        1_700_000_000_000 + i,
        f'{{"i":{i}}}',
        (f"payload-{i}-".encode() * 40)[: 50 + i % 300],
    )


async def main(path: str, appenders: int) -> None:
    db = Database(path, synchronous="full")
    await db.open()
    log = MessageLog(db)
    await log.open()
    counter = 0
    out = sys.stdout

    async def appender() -> None:
        nonlocal counter
        while True:
            first = counter
            count = 1 + first % 3  # appends of 1, 2 and 3 records
            counter += count
            seq = await log.append([make(i) for i in range(first, first + count)])
            out.write(f"{seq} {first} {count}\n")
            out.flush()

    print("ready", flush=True)
    async with asyncio.TaskGroup() as tg:
        for _ in range(appenders):
            tg.create_task(appender())


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
