"""The live-first lane (gateway/upstream/backlog.py, segments), end to end between a child and a
parent hub on loopback: a backlog built while the link is down, live messages sent once it is up.

* the live messages reach the parent while the backlog is still draining (a bandwidth cap keeps
  the drain at several seconds);
* every message the child stored is at the parent exactly once, and in order within each lane:
  a lane is the run of the child's log between two boundaries the child records (its log says
  ``live lane above N``), and within it each origin's messages keep the child's order;
* the same across a SIGKILL of the child mid-drain and one of the parent.

If the live lane shared the backlog's dedupe key at the parent, the live messages would raise
its high-water mark and the parent would drop the older backlog as duplicates: the
exactly-once checks fail then (tried by sending every lane under the route's own name).
"""

from __future__ import annotations

import asyncio
import bisect
import json
import re
import time
from collections import Counter

from tests.hubproc import HubProcess
from tests.upstream.federation import (
    CHILD_ADDRESS,
    PARENT_ADDRESS,
    azure_stand_in,
    child_hub,
    free_port,
    link,
    link_identity_mode,
    make_devices,
    parent_events,
    parent_hub,
    send_from,
    status,
)
from tests.upstream.load import Device, run_device
from tests.waiting import eventually

BANDWIDTH = 40_000  # bytes/s: a message is about 400 bytes, so ~100 msg/s over the link


def _telemetry(hub: HubProcess) -> list[tuple[str, int, int]]:
    """(origin, number, the child's seq) of the telemetry in ``hub``'s built-in endpoint, in
    its order (the child's seq is in the stable message id ``{epoch}-{seq}``)."""
    out = []
    for e in parent_events(hub, 3.0):
        if e["annotations"].get("iothub-message-source") != "Telemetry":
            continue
        mid = e["properties"]["system"].get("message_id", "")
        out.append((e["origin"], e["payload"]["n"], int(mid.rsplit("-", 1)[1]) if mid else 0))
    return out


def _boundaries(child: HubProcess) -> list[int]:
    return sorted({int(m) for m in re.findall(r"live lane above (\d+)", child.log_text())})


def _check_once_and_in_order_per_lane(parent: HubProcess, child: HubProcess) -> None:
    at_child = _telemetry(child)
    at_parent = _telemetry(parent)
    # nothing lost, nothing added: the parent holds what the child stored, as often
    assert Counter((o, n) for o, n, _ in at_parent) == Counter((o, n) for o, n, _ in at_child)
    seqs = Counter((o, s) for o, _, s in at_parent)
    assert max(seqs.values()) == 1, f"duplicates at the parent: {seqs.most_common(3)}"
    bounds = _boundaries(child)
    assert bounds, "no live lane was cut"
    lanes: dict[tuple[str, int], list[int]] = {}
    for origin, _, seq in at_parent:
        lanes.setdefault((origin, bisect.bisect_left(bounds, seq)), []).append(seq)
    for (origin, lane), got in lanes.items():
        assert got == sorted(got), f"{origin}: lane {lane} out of order"


def test_live_messages_overtake_the_backlog_each_lane_once_and_in_order(tmp_path) -> None:  # type: ignore[no-untyped-def]
    parent = parent_hub(tmp_path, tls_port=free_port(PARENT_ADDRESS)).start()  # same port again
    child = child_hub(tmp_path, f"live_first = true\nbandwidth = {BANDWIDTH}\n").start()
    try:
        link(parent, child)
        devices = make_devices(child, 3)
        send_from(child, devices, 5)  # the link works
        asyncio.run(eventually(lambda: status(child)["sent"] >= 15, 30, "first messages up",
                               interval=0.3, blocking=True))
        parent.stop()
        send_from(child, devices, 305)  # the backlog: 300 per device, ~9 s over the link
        assert status(child)["backlog"] >= 900
        parent.start()
        asyncio.run(eventually(lambda: status(child)["state"] == "connected", 30,
                               "the link up", interval=0.1, blocking=True))
        send_from(child, devices, 310)  # live: 5 more per device, after the link came up
        s = status(child)
        assert s["routes"]["$upstream"]["lanes"] == 2, s
        asyncio.run(eventually(lambda: status(child)["backlog"] == 0, 90, "the drain",
                               interval=0.5, blocking=True))
        _check_once_and_in_order_per_lane(parent, child)
        at_parent = _telemetry(parent)
        first_live = min(i for i, (_, n, _) in enumerate(at_parent) if n > 305)
        last_backlog = max(i for i, (_, n, _) in enumerate(at_parent) if n <= 305)
        # the live lane went ahead: its first message is at the parent long before the end
        # of the backlog (which took seconds), not behind it
        assert first_live < last_backlog - 300, (first_live, last_backlog)
        # the finished segment is forgotten: one lane again, the floor past the boundary
        asyncio.run(eventually(lambda: status(child)["routes"]["$upstream"]["lanes"] == 1, 10,
                               "the old segment forgotten", interval=0.3, blocking=True))
    finally:
        child.stop()
        parent.stop()


def test_lanes_hold_across_sigkill_of_the_child_mid_drain_and_of_the_parent(tmp_path) -> None:  # type: ignore[no-untyped-def]
    parent = parent_hub(tmp_path, tls_port=free_port(PARENT_ADDRESS)).start()  # same port again
    child = child_hub(tmp_path, f"bandwidth = {BANDWIDTH}\n").start()
    try:
        # the option on a route of its own (and the built-in endpoint keeps a copy to compare)
        out = json.loads(child.cli("route", "create", "up", "--endpoint", "$upstream",
                                   "--live-first").stdout)
        assert out["liveFirst"] is True
        assert json.loads(child.cli("route", "show", "up").stdout)["liveFirst"] is True
        child.cli("route", "create", "all", "--endpoint", "events")
        link(parent, child)
        devices = make_devices(child, 4)
        parent.stop()
        send_from(child, devices, 300)  # 1,200 behind the link: ~12 s of drain
        parent.start()
        asyncio.run(_live_with_kills(parent, child, devices))
        asyncio.run(eventually(lambda: status(child)["backlog"] == 0
                               and status(child)["state"] == "connected", 120, "the drain",
                               interval=0.5, blocking=True))
        assert len(_boundaries(child)) >= 2  # cut at the first link-up and after the restart
        _check_once_and_in_order_per_lane(parent, child)
    finally:
        child.stop()
        parent.stop()


async def _live_with_kills(parent: HubProcess, child: HubProcess, devices: list[Device]) -> None:
    stop = asyncio.Event()
    live = asyncio.gather(*(
        run_device(d, child.host_name, CHILD_ADDRESS, lambda: child.port("mqtt_local_port"),
                   stop, count=300 + 60, rate=4.0) for d in devices))
    await eventually(lambda: status(child)["sent"] > 100, 30, "the drain started",
                     interval=0.2, blocking=True)
    await asyncio.sleep(2)
    await asyncio.to_thread(child.kill)  # SIGKILL of the child mid-drain
    await asyncio.to_thread(child.start)
    await asyncio.sleep(3)
    await asyncio.to_thread(parent.kill)  # and of the parent
    await asyncio.sleep(1)
    await asyncio.to_thread(parent.start)
    started = time.monotonic()
    await asyncio.wait_for(live, 120)
    assert time.monotonic() - started < 120


def test_identity_mode_the_live_lane_goes_first_too(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Towards Azure (one connection per origin; our hub without on-behalf-of stands in): the
    first connection of a link-up cuts the lane; at least once, in order within each lane."""
    parent = azure_stand_in(tmp_path, tls_port=free_port(PARENT_ADDRESS))
    # one message in flight per connection slows the drain enough to see the lanes
    child = child_hub(tmp_path, 'mode = "identity"\nlive_first = true\nmax_inflight = 1\n')
    parent.start()
    child.start()
    try:
        devices = make_devices(child, 3)
        link_identity_mode(parent, child, devices)
        parent.stop()
        send_from(child, devices, 1000)
        parent.start()
        asyncio.run(eventually(lambda: status(child)["state"] == "connected", 30,
                               "the link up", interval=0.1, blocking=True))
        send_from(child, devices, 1005)
        asyncio.run(eventually(lambda: status(child)["backlog"] == 0, 90, "the drain",
                               interval=0.5, blocking=True))
        at_parent = _telemetry(parent)
        assert {(o, n) for o, n, _ in at_parent} == {
            (d.device_id, n) for d in devices for n in range(1, 1006)}  # at least once
        first_live = min(i for i, (_, n, _) in enumerate(at_parent) if n > 1000)
        last_backlog = max(i for i, (_, n, _) in enumerate(at_parent) if n <= 1000)
        assert first_live < last_backlog - 300, (first_live, last_backlog)
        bounds = _boundaries(child)
        lanes: dict[tuple[str, int], list[int]] = {}
        for origin, _, seq in at_parent:
            lanes.setdefault((origin, bisect.bisect_left(bounds, seq)), []).append(seq)
        for (origin, lane), got in lanes.items():
            assert got == sorted(got), f"{origin}: lane {lane} out of order"
    finally:
        child.stop()
        parent.stop()
