"""Link faults between a child hub and its parent (tests/faultproxy.py in between): 100 cuts
(RST and FIN), stalls and throttling under a load of 20 devices at the child, plus a SIGKILL of
the child and one of the parent during the run. Afterwards the parent's built-in endpoint holds
exactly the child's telemetry: every message the child acknowledged, each exactly once (no
duplicates at all: every stable message id once), with its origin, in per-device order.

With ``live_first`` every link-up with a backlog starts a new lane (gateway/upstream/backlog.py):
100 cuts put the lanes' slots through many reuses; then the order holds per device within each
lane (between two boundaries the child logs)."""

from __future__ import annotations

import asyncio
import bisect
import json
import re
import time
from collections import Counter

import pytest

from tests.faultproxy import FaultProxy
from tests.hubproc import HubProcess, create_device
from tests.upstream.federation import (
    CHILD_ADDRESS,
    PARENT_ADDRESS,
    PROXY_ADDRESS,
    child_hub,
    free_port,
    link,
    parent_events,
    parent_hub,
    status,
)
from tests.upstream.load import Device, run_device

DEVICES = 20
PER_DEVICE = 1200
RATE = 25.0  # messages/s per device: about 50 s of load
CUTS = 100


def _stored(events: list[dict]) -> list[tuple[str, int, str]]:  # type: ignore[type-arg]
    return [(e["origin"], e["payload"]["n"], e["properties"]["system"].get("message_id", ""))
            for e in events if e["annotations"].get("iothub-message-source") == "Telemetry"]


@pytest.mark.slow
@pytest.mark.timeout(900)  # ~110 s on a quiet machine; its own waits bound it under load
@pytest.mark.parametrize("live_first", [False, True], ids=["one-lane", "live-first"])
def test_cuts_stalls_and_kills_lose_and_duplicate_nothing(tmp_path, live_first) -> None:  # type: ignore[no-untyped-def]
    parent_port = free_port(PARENT_ADDRESS)
    parent = parent_hub(tmp_path, f'addresses = ["{PROXY_ADDRESS}"]\n', tls_port=parent_port)
    # the parent's [hub] table gets the proxy's address as a SAN (extra_config lands after [api])
    parent.config_file.write_text(parent.config_file.read_text().replace(
        f'addresses = ["{PROXY_ADDRESS}"]\n', "").replace(
        '[hub]\n', f'[hub]\naddresses = ["{PROXY_ADDRESS}"]\n'))
    child = child_hub(tmp_path, "live_first = true\n" if live_first else "")
    parent.start()
    child.start()
    try:
        asyncio.run(_run(parent, child, live_first))
    finally:
        child.stop()
        parent.stop()


async def _run(parent: HubProcess, child: HubProcess, live_first: bool) -> None:
    proxy = await FaultProxy((PROXY_ADDRESS, 0), (PARENT_ADDRESS, parent.port("mqtt_tls_port"))).start()
    try:
        await asyncio.to_thread(link, parent, child, host=PROXY_ADDRESS, port=proxy.port)
        devices = []
        for i in range(DEVICES):
            info = await asyncio.to_thread(create_device, child, f"load{i:02d}")
            devices.append(Device(info["deviceId"],
                                  info["authentication"]["symmetricKey"]["primaryKey"]))
        stop = asyncio.Event()
        load = asyncio.gather(*(
            run_device(d, child.host_name, CHILD_ADDRESS, lambda: child.port("mqtt_local_port"),
                       stop, count=PER_DEVICE, rate=RATE) for d in devices))
        faults = asyncio.get_running_loop().create_task(proxy.run_schedule(CUTS, seed=10))
        await asyncio.sleep(12)
        await asyncio.to_thread(child.kill)  # SIGKILL the child under load
        await asyncio.to_thread(child.start)
        await asyncio.sleep(12)
        await asyncio.to_thread(parent.kill)  # and the parent
        await asyncio.sleep(1)
        await asyncio.to_thread(parent.start)
        await asyncio.wait_for(faults, 180)
        await asyncio.wait_for(load, 180)
        stop.set()
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            s = await asyncio.to_thread(status, child)
            if s["backlog"] == 0 and s["state"] == "connected":
                break
            await asyncio.sleep(0.5)
        assert s["backlog"] == 0, s
    finally:
        await proxy.stop()
    st = proxy.stats
    assert st.cuts_rst + st.cuts_fin == CUTS and st.cuts_rst > 20 and st.cuts_fin > 20
    assert st.stalls and st.throttles and st.connections > 50

    at_child = _stored(await asyncio.to_thread(parent_events, child, 3.0))
    at_parent = _stored(await asyncio.to_thread(parent_events, parent, 3.0))
    # every message the child acknowledged is stored at the child (its own durability) ...
    child_numbers = Counter((o, n) for o, n, _ in at_child)
    for d in devices:
        missing = set(d.acked) - {n for (o, n) in child_numbers if o == d.device_id}
        assert not missing, f"{d.device_id}: {len(missing)} acked messages missing at the child"
    # ... and at the parent exactly as often as at the child: nothing lost, nothing added
    parent_numbers = Counter((o, n) for o, n, _ in at_parent)
    assert parent_numbers == child_numbers
    ids = Counter(mid for _, _, mid in at_parent)
    assert len(ids) == len(at_parent), f"duplicates at the parent: {ids.most_common(3)}"
    # per-device order: the child's log order (the seq in the stable id) is kept at the parent
    # (within each lane: the boundaries the child recorded, if any)
    bounds = sorted({int(b) for b in re.findall(r"live lane above (\d+)", child.log_text())})
    assert bool(bounds) == live_first
    by_origin: dict[tuple[str, int], list[int]] = {}
    for origin, _, mid in at_parent:
        seq = int(mid.rsplit("-", 1)[1])
        by_origin.setdefault((origin, bisect.bisect_left(bounds, seq)), []).append(seq)
    assert {o for o, _ in by_origin} == {d.device_id for d in devices}
    for (origin, lane), seqs in by_origin.items():
        assert seqs == sorted(seqs), f"{origin}: out of order in lane {lane}"
    total_acked = sum(len(d.acked) for d in devices)
    assert total_acked >= DEVICES * PER_DEVICE
    print(f"\nfaults: {st.cuts_rst} RST + {st.cuts_fin} FIN cuts, {st.stalls} stalls, "
          f"{st.throttles} throttles, {st.connections} connections; {len(at_parent)} messages "
          f"at the parent, {len(bounds)} lane boundaries")
    assert json.loads(json.dumps(s))  # status stays JSON
