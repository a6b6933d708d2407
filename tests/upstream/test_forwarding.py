"""Store-and-forward end to end: a child hub forwards its devices' and modules' telemetry to a
parent hub over one on-behalf-of connection; the parent stamps the origins; the link is set,
shown, cleared live; a backlog built while the parent is down drains when it comes back."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections import Counter

from tests.hubproc import create_device
from tests.upstream.federation import (
    child_hub,
    link,
    make_devices,
    parent_events,
    parent_hub,
    send_from,
    status,
    telemetry_by_origin,
    timed_drain,
)
from tests.upstream.load import Device
from tests.waiting import eventually


def test_forward_devices_and_modules_with_origin(tmp_path) -> None:  # type: ignore[no-untyped-def]
    parent, child = parent_hub(tmp_path).start(), child_hub(tmp_path).start()
    try:
        shown = link(parent, child)
        assert shown["device_id"] == "child-gw" and shown["shared_access_key"] == "<hidden>"
        devices = make_devices(child, 3)
        create_device(child, "child.local")
        module = json.loads(child.cli("module", "create", "child.local", "sensor").stdout)
        devices.append(Device("child.local", module["authentication"]["symmetricKey"]["primaryKey"],
                              module_id="sensor"))
        send_from(child, devices, 200)
        expected = {d.client_id.replace("child.local", "child-gw"): list(range(1, 201))
                    for d in devices}

        def arrived() -> bool:
            got = telemetry_by_origin(parent)
            return all(len(got.get(k, [])) >= 200 for k in expected)

        asyncio.run(eventually(arrived, 60, "all messages at the parent", interval=0.5,
                               blocking=True))
        got = telemetry_by_origin(parent)
        assert got == expected  # each exactly once, in per-device order
        events = [e for e in parent_events(parent)
                  if e["annotations"].get("iothub-message-source") == "Telemetry"]
        sample = next(e for e in events if e["origin"] == "dev0")
        assert sample["annotations"]["iothub-connection-device-id"] == "dev0"
        assert sample["annotations"]["iothub-gateway-path"] == "child-gw"
        assert sample["properties"]["system"]["message_id"]  # a stable id is always set
        # ... {epoch}-{seq} derived at the parent from the stamp in front; no stamp key left
        assert re.fullmatch(r"[0-9a-f]+-\d+", sample["properties"]["system"]["message_id"])
        assert not [k for k in sample["properties"].get("application", {}) if ".gw" in k]
        leaf = json.loads(parent.cli("device", "show", "dev0").stdout)
        gw = json.loads(parent.cli("device", "show", "child-gw").stdout)
        assert leaf["parentScopes"] == [gw["deviceScope"]]  # registered as the gateway's child
        s = status(child)
        assert s["state"] == "connected" and s["sent"] == 800 and s["backlog"] == 0
        assert set(s) >= {"state", "backlog", "backlogBytes", "oldestAgeSeconds", "sent",
                          "dropped", "lastError", "since", "routes"}
        assert s["routes"]["$upstream"]["sent"] == 800
        # the same figures in the gateway's reported properties at the parent
        def reported() -> dict | None:  # type: ignore[type-arg]
            twin = json.loads(parent.cli("twin", "show", "child-gw").stdout)
            up = twin["properties"]["reported"].get("upstream")
            return up if up and up["sent"] == 800 else None

        up = asyncio.run(eventually(reported, 20, "status in the parent's twin", interval=0.5,
                                    blocking=True))
        assert up["state"] == "connected" and up["routes"]["upstream"]["sent"] == 800
        child.cli("upstream", "clear")
        assert json.loads(child.cli("upstream", "show").stdout) is None
        assert status(child)["state"] == "disconnected"
    finally:
        child.stop()
        parent.stop()


def test_the_gateways_own_telemetry_goes_up_stamped_and_deduplicated(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The child's own device identity (no module) sends too: at the parent its messages are
    the gateway's own, yet they came from the store, so their stamp is stripped and checked
    like a child's (it used to stay in the application properties, undeduplicated)."""
    parent, child = parent_hub(tmp_path).start(), child_hub(tmp_path).start()
    try:
        link(parent, child)
        info = create_device(child, "child.local")
        own = Device("child.local", info["authentication"]["symmetricKey"]["primaryKey"])
        send_from(child, [own], 100)

        def arrived() -> bool:
            return len(telemetry_by_origin(parent).get("child-gw", [])) >= 100

        asyncio.run(eventually(arrived, 60, "the gateway's own messages at the parent",
                               interval=0.5, blocking=True))
        assert telemetry_by_origin(parent) == {"child-gw": list(range(1, 101))}
        events = [e for e in parent_events(parent)
                  if e["annotations"].get("iothub-message-source") == "Telemetry"]
        assert all(e["annotations"]["iothub-gateway-path"] == "child-gw" for e in events)
        assert all(re.fullmatch(r"[0-9a-f]+-\d+", e["properties"]["system"]["message_id"])
                   for e in events)
        assert not [k for e in events for k in e["properties"].get("application", {})
                    if ".gw" in k]
    finally:
        child.stop()
        parent.stop()


def test_backlog_built_offline_drains_and_survives_child_restart(tmp_path) -> None:  # type: ignore[no-untyped-def]
    parent, child = parent_hub(tmp_path).start(), child_hub(tmp_path).start()
    try:
        link(parent, child)
        port = parent.port("mqtt_tls_port")
        parent.stop()  # link down
        devices = make_devices(child, 4)
        send_from(child, devices, 300)
        s = status(child)
        assert s["backlog"] == 1200 and s["state"] in ("connecting", "disconnected")
        assert s["lastError"]
        child.kill()  # the backlog is on disk; cursors too
        child.start()
        # the parent comes back on the same port (the child keeps dialling it)
        parent.config_file.write_text(parent.config_file.read_text().replace(
            "tls_port = 0", f"tls_port = {port}"))
        parent.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and status(child)["backlog"]:
            time.sleep(0.3)
        assert status(child)["backlog"] == 0
        got = telemetry_by_origin(parent)
        assert {k: Counter(v) for k, v in got.items()} == {
            d.device_id: Counter(range(1, 301)) for d in devices}
        assert all(v == sorted(v) for v in got.values())
        # the settings survived the restart
        assert json.loads(child.cli("upstream", "show").stdout)["device_id"] == "child-gw"
    finally:
        child.stop()
        parent.stop()


def test_bandwidth_cap_paces_the_drain(tmp_path) -> None:  # type: ignore[no-untyped-def]
    parent = parent_hub(tmp_path).start()
    child = child_hub(tmp_path, "bandwidth = 50000\n").start()
    try:
        link(parent, child)
        devices = make_devices(child, 3)
        backlog_bytes, took = timed_drain(parent, child, devices, 100, body_bytes=1000)
        assert backlog_bytes > 300_000
        # 50 KB/s after a one-second burst: at least (bytes - 50 KB) / 50 KB/s
        assert took >= (backlog_bytes - 50_000) / 50_000 * 0.9, took
        got = telemetry_by_origin(parent)
        assert {k: sorted(v) for k, v in got.items()} == {
            d.device_id: list(range(1, 101)) for d in devices}
    finally:
        child.stop()
        parent.stop()
