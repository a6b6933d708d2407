"""A simulated day offline with a TTL shorter than the outage, across a reboot, with a wall
clock that is years wrong (a board without an RTC): the TTL expires exactly the messages whose
*running* age passed it (counted as dropped.ttl), the rest arrive at the parent. The forwarder
runs in-process with a fake monotonic clock and boot id; the parent is a real hub."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from gateway.config import UpstreamConfig
from gateway.store import Database, MessageLog, Record
from gateway.upstream.forwarder import Forwarder
from gateway.upstream.policy import RoutePolicy
from gateway.upstream.settings import from_connection_string
from tests import waiting
from tests.hubproc import HubProcess, create_device
from tests.upstream.federation import PARENT_ADDRESS, free_port, parent_events, parent_hub
from tests.waiting import eventually

HOUR = 3600.0
PROPS = json.dumps({"system": {}, "application": {}})


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _records(batch: str, n: int) -> list[Record]:
    # enqueued_ms = 0: the wall clock says 1970 -- a wall-clock TTL would expire everything
    return [Record("telemetry", "leaf", None, 0, PROPS, json.dumps({"b": batch, "i": i}).encode())
            for i in range(n)]


async def _scenario(tmp: Path, parent: HubProcess, cs: str, dead_port: int) -> dict:  # type: ignore[type-arg]
    db = Database(tmp / "child.db")
    await db.open()
    log = MessageLog(db)
    await log.open()
    cfg = UpstreamConfig(reconnect_min=0.05, reconnect_max=0.2, gateway_inflight=64,
                         ack_timeout=3.0)
    policy = RoutePolicy(ttl=18 * HOUR)

    def forwarder(clock: FakeClock, boot: str, port: int) -> Forwarder:
        settings = from_connection_string(cs, ca_file=parent.ca_file, host=PARENT_ADDRESS,
                                          port=port)
        return Forwarder(log, db, settings, cfg, local_gateway="child.local",
                         select=lambda e: "$upstream" if e.kind == "telemetry" else None,
                         policy_of=lambda route: policy, clock=clock, boot=boot)

    async def running(fw: Forwarder, body: object) -> None:
        task = asyncio.get_running_loop().create_task(fw.run())
        await fw.ready.wait()
        try:
            await body  # type: ignore[misc]
        finally:
            await asyncio.sleep(0.6)  # a flush: cursors and checkpoints written
            await waiting.stop(task)

    clock = FakeClock(1000.0)
    boot1 = forwarder(clock, "boot-1", dead_port)  # the link is down for the whole day

    async def day_one() -> None:
        await log.append(_records("old", 50))
        await asyncio.sleep(0.6)
        clock.now += 10 * HOUR
        await log.append(_records("mid", 40))
        await asyncio.sleep(0.6)
        clock.now += 2 * HOUR  # the box runs 2 h more, then reboots
        await asyncio.sleep(0.6)

    await running(boot1, day_one())
    clock2 = FakeClock(100.0)  # after the reboot the monotonic clock starts again
    boot2 = forwarder(clock2, "boot-2", dead_port)
    seen: dict = {}  # type: ignore[type-arg]

    async def day_two() -> None:
        await log.append(_records("new", 30))
        await asyncio.sleep(0.6)
        clock2.now += 7 * HOUR  # old: 12 h + 7 h > 18 h; mid: 2 h + 7 h; new: 7 h
        await eventually(lambda: boot2.status()["dropped"]["ttl"] == 50, 10, "old expired")
        seen.update(boot2.status())

    await running(boot2, day_two())
    boot3 = forwarder(clock2, "boot-2", parent.port("mqtt_tls_port"))  # the link is back

    async def drain() -> None:
        await eventually(lambda: boot3.status()["sent"] == 70, 60, "the rest sent", interval=0.1)
        seen["after"] = boot3.status()

    await running(boot3, drain())
    await db.close()
    return seen


def test_simulated_day_offline_ttl_by_running_age(tmp_path) -> None:  # type: ignore[no-untyped-def]
    parent = parent_hub(tmp_path).start()
    try:
        create_device(parent, "child-gw", "--edge")
        cs = parent.connection_string("child-gw")
        status = asyncio.run(_scenario(tmp_path, parent, cs, free_port(PARENT_ADDRESS)))
        assert status["dropped"]["ttl"] == 50
        assert status["backlog"] == 70
        # mid: 2 h left of boot 1, plus boot 2 so far (it started at monotonic 100, then 7 h)
        assert abs(status["oldestAgeSeconds"] - (9 * HOUR + 100)) < 5
        assert status["after"]["dropped"]["ttl"] == 50  # the count survives restarts
        got = [e["payload"] for e in parent_events(parent)
               if e["annotations"].get("iothub-message-source") == "Telemetry"]
        assert [(p["b"], p["i"]) for p in got] == (
            [("mid", i) for i in range(40)] + [("new", i) for i in range(30)])
        assert all(e["origin"] == "leaf" for e in parent_events(parent)
                   if e["annotations"].get("iothub-message-source") == "Telemetry")
    finally:
        parent.stop()
