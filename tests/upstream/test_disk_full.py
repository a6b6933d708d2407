"""Disk full at the child during an outage (a small tmpfs holds its data directory): the
configured policy holds (``reject-new``: publishers get no PUBACK and keep their messages;
``drop-oldest``: the oldest go, counted, and new ones keep being accepted), old data is not
corrupted, and the hub keeps serving its local devices."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sqlite3
import subprocess
import time

import pytest

from tests.hubproc import HubProcess, create_device
from tests.upstream.federation import CHILD_ADDRESS, PARENT_ADDRESS, free_port, status
from tests.upstream.load import Device, run_device

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")


@pytest.fixture
def small_disk(tmp_path):  # type: ignore[no-untyped-def]
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m,mode=0700", "tmpfs", str(mount)],
                   check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["reject-new", "drop-oldest"])
def test_disk_full_during_outage(small_disk, policy: str) -> None:  # type: ignore[no-untyped-def]
    child = HubProcess(small_disk / "data", host_name="child.local", address=CHILD_ADDRESS,
                       log_level="info", extra_config=(
                           f'[upstream]\nwhen_full = "{policy}"\ndisk_high_water = 0.5\n'
                           "reconnect_min = 0.2\nreconnect_max = 1.0\n"))
    child.config_file = small_disk.parent / "child.toml"  # the config lives off the small disk
    child.config_file.write_text((small_disk / "data.toml").read_text())
    child.log_path = small_disk.parent / "child.log"
    child.start()
    try:
        key = base64.b64encode(os.urandom(32)).decode()
        child.cli("upstream", "set", "--connection-string",  # a parent that is not there
                  f"HostName=parent.local;DeviceId=gw;SharedAccessKey={key}",
                  "--host", PARENT_ADDRESS, "--port", str(free_port(PARENT_ADDRESS)))
        devices = []
        for i in range(4):
            info = create_device(child, f"d{i}")
            devices.append(Device(info["deviceId"], info["authentication"]["symmetricKey"]["primaryKey"]))

        async def load() -> None:
            stop = asyncio.Event()
            tasks = [asyncio.ensure_future(run_device(
                d, child.host_name, CHILD_ADDRESS, lambda: child.port("mqtt_local_port"), stop,
                count=20_000, window=20, body_bytes=2000, rate=150.0)) for d in devices]
            deadline = time.monotonic() + 70
            while time.monotonic() < deadline:
                await asyncio.sleep(1)
                text = child.log_text()
                if policy == "reject-new" and "refusing telemetry" in text:
                    break
                if policy == "drop-oldest" and "oldest messages deleted" in text \
                        and text.count("oldest messages deleted") >= 2:
                    break
            stop.set()
            await asyncio.gather(*tasks)

        asyncio.run(load())
        acked = {d.device_id: set(d.acked) for d in devices}
        total = sum(map(len, acked.values()))
        s = status(child)
        # the hub still serves its local devices: identities, twins, new connections
        create_device(child, "late")
        assert "late" in child.cli("device", "list").stdout
        json.loads(child.cli("twin", "show", "d0").stdout)
        out = child.cli("monitor-events", "--from-beginning", "--timeout", "3", "--json").stdout
        stored: dict[str, set[int]] = {}
        for line in out.splitlines():
            if line.strip():
                e = json.loads(line)["event"]
                if e["annotations"].get("iothub-message-source") == "Telemetry":
                    stored.setdefault(e["origin"], set()).add(e["payload"]["n"])
        if policy == "reject-new":
            assert "refusing telemetry" in child.log_text()
            for device_id, numbers in acked.items():  # nothing acknowledged was lost
                assert numbers <= stored.get(device_id, set()), device_id
        else:
            assert s["dropped"]["full"] + s["dropped"].get("store-cap", 0) > 0, s
            for device_id, numbers in acked.items():  # the newest are there, the oldest went
                assert max(numbers) in stored[device_id]
                assert min(numbers) not in stored[device_id]
            assert sum(map(len, stored.values())) < total  # what went was counted, not hidden
    finally:
        child.stop()
    with sqlite3.connect(small_disk / "data" / "hub.db") as db:  # old data not corrupted
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
