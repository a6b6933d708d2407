"""Packing (``[upstream] pack = true``): a backlog built offline goes up as packs of one
origin's readings of at most 4 KB; the parent (this software) unpacks every reading into its
own message (its own properties, message id and dedupe position), once each, in order, and
bills a pack as one message (``gateway_telemetry_billed_messages``)."""

from __future__ import annotations

import asyncio
import time

from prometheus_client.parser import text_string_to_metric_families

from gateway.hubclient import HubClient
from tests.hubproc import HubProcess, create_device
from tests.upstream.federation import (
    CHILD_ADDRESS,
    PARENT_ADDRESS,
    child_hub,
    free_port,
    link,
    parent_events,
    parent_hub,
    status,
)
from tests.upstream.load import Device, run_device


def _billed(hub: HubProcess) -> float:
    with HubClient(hub.data_dir)._open("GET", "/metrics") as response:
        text = response.read().decode()
    return next(s.value for f in text_string_to_metric_families(text) for s in f.samples
                if s.name.startswith("gateway_telemetry_billed_messages"))


def test_backlog_goes_up_packed_and_comes_out_unpacked(tmp_path) -> None:  # type: ignore[no-untyped-def]
    port = free_port(PARENT_ADDRESS)
    parent = parent_hub(tmp_path, tls_port=port).start()
    child = child_hub(tmp_path, "pack = true\n").start()
    try:
        link(parent, child, port=port)
        parent.stop()  # link down: a backlog builds
        devices = []
        for i in range(3):
            info = create_device(child, f"p{i}")
            devices.append(Device(info["deviceId"],
                                  info["authentication"]["symmetricKey"]["primaryKey"]))

        async def load() -> None:
            stop = asyncio.Event()
            await asyncio.gather(*(run_device(
                d, child.host_name, CHILD_ADDRESS, lambda: child.port("mqtt_local_port"), stop,
                count=200, body_bytes=150) for d in devices))

        asyncio.run(asyncio.wait_for(load(), 120))
        assert status(child)["backlog"] == 600
        info = create_device(child, "live")
        live = Device("live", info["authentication"]["symmetricKey"]["primaryKey"])
        parent = parent_hub(tmp_path, tls_port=port).start()
        # a device sending live during the drain: its messages go alone or packed behind
        # each other, never a pack ahead of one sent alone (the gap check would refuse it)
        asyncio.run(asyncio.wait_for(run_device(
            live, child.host_name, CHILD_ADDRESS, lambda: child.port("mqtt_local_port"),
            asyncio.Event(), count=100, rate=100.0, body_bytes=150), 120))
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and status(child)["backlog"]:
            time.sleep(0.3)
        s = status(child)
        assert s["backlog"] == 0 and s["sent"] == 700
        assert s["packed"]["readings"] >= 500 and s["packed"]["messages"] * 5 <= 600
        events = [e for e in parent_events(parent)
                  if e["annotations"].get("iothub-message-source") == "Telemetry"]
        got: dict[str, list[int]] = {}
        for e in events:
            got.setdefault(e["origin"], []).append(e["payload"]["n"])
        assert got == {**{d.device_id: list(range(1, 201)) for d in devices},
                       "live": list(range(1, 101))}  # once each, in order
        ids = [e["properties"]["system"]["message_id"] for e in events]
        assert len(set(ids)) == 700  # each reading its own stable id
        assert all(e["annotations"]["iothub-gateway-path"] == "child-gw" for e in events)
        billed = _billed(parent)
        assert billed >= s["packed"]["messages"] + (700 - s["packed"]["readings"])  # resends too
        assert "follows" not in parent.log_text()  # no gap was ever refused
        assert billed * 4 <= 700, billed
    finally:
        child.stop()
        parent.stop()
