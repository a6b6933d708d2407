"""Subprocess for the kill -9 tests: a message log and an EndpointManager with one endpoint
(JSON given on the command line), driven by commands on stdin:

- ``append DEVICE FIRST COUNT``: append records FIRST..FIRST+COUNT-1, then print ``acked``;
- ``flood``: append one record after another forever, printing ``acked I`` once each commits;
- ``health``: print ``health <json>``.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from gateway.endpoints.manager import EndpointManager, Tuning
from gateway.endpoints.spec import parse_endpoint
from gateway.store import Database, MessageLog
from tests.endpoints.peers import record


async def main(db_path: str, spec_json: str) -> None:
    db = Database(db_path, synchronous="full")
    await db.open()
    log = MessageLog(db)
    await log.open()
    manager = EndpointManager(log, hub_name="hub1", data_dir=Path(db_path).parent,
                              tuning=Tuning(backoff_initial=0.05, backoff_max=0.3))
    await manager.apply([parse_endpoint("out", json.loads(spec_json))],
                        lambda _n: lambda _e: True, lambda _n, _e: {})
    loop = asyncio.get_running_loop()

    async def flood() -> None:
        i = 0
        while True:
            await log.append([record(f"d{i % 4}", i)])
            print(f"acked {i}", flush=True)
            i += 1
            await asyncio.sleep(0.001)

    async def commands() -> None:
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line:
                return
            words = line.split()
            if words[0] == "append":
                device, first, count = words[1], int(words[2]), int(words[3])
                await log.append([record(device, i) for i in range(first, first + count)])
                print("acked", flush=True)
            elif words[0] == "flood":
                tasks.create_task(flood())
            elif words[0] == "health":
                print("health", json.dumps(manager.health("out")[0]), flush=True)

    print("ready", flush=True)
    async with asyncio.TaskGroup() as tasks:
        tasks.create_task(manager.run())
        tasks.create_task(commands())


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
