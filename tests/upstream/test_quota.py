"""The parent's daily message quota (IoT Hub's 403002) at a child gateway: the parent refuses
telemetry once its ``[hub] daily_message_quota`` is used up and answers CONNECT with CONNACK 3;
the child shows ``paused`` (no reconnect loop), keeps every message, and delivers the rest
exactly once when the parent accepts again (here: restarted with a bigger quota)."""

from __future__ import annotations

import asyncio
import re

from gateway.hub.quota import DailyQuota, next_midnight, units
from tests.hubproc import create_device
from tests.upstream.federation import (
    PARENT_ADDRESS,
    child_hub,
    free_port,
    link,
    parent_hub,
    send_from,
    status,
    telemetry_by_origin,
)
from tests.upstream.load import Device
from tests.waiting import eventually


def test_quota_units_and_day() -> None:
    assert (units(1), units(4096), units(4097), units(10_000)) == (1, 1, 2, 3)
    q = DailyQuota(5)
    day = 86400 * 20000 + 100.0
    assert q.charge(3, day) and not q.exhausted(day)
    assert not q.charge(3, day)  # would pass the limit: refused, nothing spent...
    assert q.exhausted(day)  # ...and everything is refused for the rest of the day
    assert not q.charge(1, day + 10)
    assert next_midnight(day) == 86400 * 20001
    assert q.charge(5, next_midnight(day)) and q.exhausted(next_midnight(day))
    assert DailyQuota(0).charge(10**9, day)


def test_daily_quota_pauses_the_child_and_loses_nothing(tmp_path) -> None:  # type: ignore[no-untyped-def]
    port = free_port(PARENT_ADDRESS)
    parent = parent_hub(tmp_path, tls_port=port, hub_config="daily_message_quota = 30\n").start()
    child = child_hub(tmp_path, "paused_probe = 1.0\n").start()
    try:
        link(parent, child, port=port)
        devices = []
        for i in range(2):
            info = create_device(child, f"q{i}")
            devices.append(Device(info["deviceId"],
                                  info["authentication"]["symmetricKey"]["primaryKey"]))
        send_from(child, devices, 50)  # 100 one-unit messages against a quota of 30

        def paused() -> bool:
            return bool(status(child)["state"] == "paused")

        asyncio.run(eventually(paused, 60, "the child paused", interval=0.3, blocking=True))
        s = status(child)
        assert "CONNACK 3" in s["lastError"] and "paused until" in s["lastError"]
        assert s["lastError"].endswith("T00:00:00Z")
        got = telemetry_by_origin(parent)
        # a batch that would pass the quota is refused whole: on a busy machine the whole
        # backlog can arrive as one batch, and nothing is stored before the pause
        stored = sum(map(len, got.values()))
        assert 0 <= stored <= 30 and all(v == list(range(1, len(v) + 1)) for v in got.values())
        assert s["sent"] == stored and s["backlog"] == 100 - stored
        assert s["dropped"]["full"] == 0
        log = parent.log_text()
        assert "403002" in log
        # paused means one attempt per probe (1 s here), not the reconnect loop (0.05 s)
        before = child.log_text().count("upstream paused until")
        asyncio.run(asyncio.sleep(3.0))
        probes = child.log_text().count("upstream paused until") - before
        assert 1 <= probes <= 5, probes

        parent.stop()  # the next day, as far as the parent's count goes: a fresh quota
        parent = parent_hub(tmp_path, tls_port=port,
                            hub_config="daily_message_quota = 1000\n").start()

        def drained() -> bool:
            got = telemetry_by_origin(parent)
            return sum(map(len, got.values())) >= 100

        asyncio.run(eventually(drained, 90, "the rest at the parent", interval=0.5,
                               blocking=True))
        got = telemetry_by_origin(parent)
        assert got == {d.device_id: list(range(1, 51)) for d in devices}  # once, in order
        asyncio.run(eventually(lambda: status(child)["state"] == "connected", 30,
                               "connected again", interval=0.3, blocking=True))
        assert re.search(r"upstream paused until \S+Z", child.log_text())
    finally:
        child.stop()
        parent.stop()
