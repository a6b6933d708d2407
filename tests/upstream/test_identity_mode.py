"""Identity mode (towards Azure IoT Hub): one MQTT connection per origin with that identity's
own credentials, opened lazily, staggered, closed when idle. Our hub started without the
on-behalf-of feature stands in for Azure: it knows each device with the same keys."""

from __future__ import annotations

import asyncio
import re
import time
from datetime import datetime

from gateway.hubclient import HubClient
from tests.hubproc import create_device
from tests.upstream.federation import (
    CHILD_ADDRESS,
    PARENT_ADDRESS,
    azure_stand_in,
    child_hub,
    link_identity_mode,
    make_devices,
    parent_events,
    status,
    telemetry_by_origin,
    timed_drain,
)
from tests.upstream.load import Device, run_device

DEVICES = 12
RATE = 4.0  # new connections per second


def test_identity_mode_against_a_hub_without_on_behalf(tmp_path) -> None:  # type: ignore[no-untyped-def]
    parent = azure_stand_in(tmp_path)
    child = child_hub(tmp_path, f'mode = "identity"\nconnect_rate = {RATE}\nidle_close = 2.0\n')
    parent.start()
    child.start()
    try:
        create_device(parent, "child-gw")  # names the parent; identity mode connects per device
        cs = parent.connection_string("child-gw")
        child.cli("upstream", "set", "--connection-string", cs, "--ca-file", parent.ca_file,
                  "--host", PARENT_ADDRESS, "--port", str(parent.port("mqtt_tls_port")))
        api = HubClient(parent.data_dir)
        devices = []
        for i in range(DEVICES):
            info = create_device(child, f"az{i:02d}")
            keys = info["authentication"]["symmetricKey"]
            api.request("PUT", f"/devices/az{i:02d}", {  # the same identity "in Azure"
                "deviceId": f"az{i:02d}", "authentication": {"type": "sas", "symmetricKey": keys}})
            devices.append(Device(info["deviceId"], keys["primaryKey"]))

        async def load() -> None:
            stop = asyncio.Event()
            await asyncio.gather(*(run_device(d, child.host_name, CHILD_ADDRESS,
                                              lambda: child.port("mqtt_local_port"), stop,
                                              count=100) for d in devices))

        asyncio.run(load())
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and status(child)["backlog"]:
            time.sleep(0.3)
        s = status(child)
        assert s["backlog"] == 0 and s["sent"] >= DEVICES * 100, s
        events = [e for e in parent_events(parent)
                  if e["annotations"].get("iothub-message-source") == "Telemetry"]
        got: dict[str, set[int]] = {}
        for e in events:
            assert e["annotations"]["iothub-connection-device-id"] == e["origin"]  # its own
            assert "iothub-gateway-path" not in e["annotations"]
            assert e["properties"]["system"]["message_id"]  # stable id for consumers to dedupe
            got.setdefault(e["origin"], set()).add(e["payload"]["n"])
        assert got == {d.device_id: set(range(1, 101)) for d in devices}  # at least once
        # one connection per identity, staggered by the connect rate
        log = parent.log_text()
        stamps = [datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f") for m in re.finditer(
            r"^(\S+ \S+) INFO gateway.broker.broker: connected client_id='az\d\d'", log, re.M)]
        assert len(stamps) >= DEVICES
        spread = (max(stamps) - min(stamps)).total_seconds()
        assert spread >= (DEVICES - RATE) / RATE * 0.8, spread
        # closed when idle
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            closed = len(re.findall(r"disconnected client_id='az\d\d'", parent.log_text()))
            if closed >= DEVICES:
                break
            time.sleep(0.5)
        assert closed >= DEVICES
    finally:
        child.stop()
        parent.stop()


def test_identity_mode_keeps_a_routes_bandwidth_cap_over_all_its_connections(
        tmp_path) -> None:  # type: ignore[no-untyped-def]
    parent = azure_stand_in(tmp_path)
    child = child_hub(tmp_path, 'mode = "identity"\nbandwidth = 50000\n')
    parent.start()
    child.start()
    try:
        devices = make_devices(child, 3)
        link_identity_mode(parent, child, devices)
        backlog_bytes, took = timed_drain(parent, child, devices, 100, body_bytes=1000)
        assert backlog_bytes > 300_000
        # 50 KB/s for the three connections together, after a one-second burst
        assert took >= (backlog_bytes - 50_000) / 50_000 * 0.9, took
        got = telemetry_by_origin(parent)
        assert {k: sorted(set(v)) for k, v in got.items()} == {
            d.device_id: list(range(1, 101)) for d in devices}  # at least once
    finally:
        child.stop()
        parent.stop()
