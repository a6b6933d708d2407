"""Files stored at a leaf go up to its parent (gateway/files/forward.py): on behalf of their
device to a parent of this kind, with the device's own credentials in identity mode (our hub
with on_behalf = false standing in for Azure IoT Hub), resumed after a SIGKILL of the leaf and
of the parent without resending a block the parent stored, refused for a device outside the
gateway's scope without holding up the others, yielding to queued telemetry."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections import Counter

from gateway.hubclient import HubClient
from tests.files.federation import (
    LEAF,
    PARENT,
    blocks_stored,
    device,
    files,
    free_port,
    leaf_hub,
    link,
    notifications,
    parent_hub,
    sha256,
    upload,
    wait_forwarded,
)
from tests.hubproc import create_device
from tests.upstream.load import Device, run_device


def test_files_go_up_on_behalf_of_their_device(tmp_path) -> None:  # type: ignore[no-untyped-def]
    api_port = free_port(PARENT)
    parent = parent_hub(tmp_path, api_port=api_port)
    leaf = leaf_hub(tmp_path, forward_port=api_port,
                    files='forward_block_bytes = 1048576\nafter_forward = "delete"\n')
    parent.start()
    leaf.start()
    try:
        link(parent, leaf)
        create_device(parent, "elsewhere")  # exists at the parent, outside leaf-gw's scope
        key = device(leaf, "cam-1")
        other = device(leaf, "elsewhere")
        small, big = os.urandom(1024), os.urandom((5 << 20) + 123)
        asyncio.run(upload(leaf, "elsewhere", other, "x.bin", b"refused upstream"))
        asyncio.run(upload(leaf, "cam-1", key, "logs/small.bin", small))
        asyncio.run(upload(leaf, "cam-1", key, "logs/big.bin", big, block=2 << 20))
        at_leaf = wait_forwarded(leaf, ["cam-1/logs/small.bin", "cam-1/logs/big.bin"])
        at_parent = files(parent)
        for blob, data in (("cam-1/logs/small.bin", small), ("cam-1/logs/big.bin", big)):
            f = at_parent[blob]
            assert f["state"] == "stored" and f["via"] == "leaf-gw", f
            assert f["size"] == len(data) and f["sha256"] == sha256(data)
            shown = at_leaf[blob]
            assert shown["upstream"]["state"] == "forwarded", shown
            assert shown["upstream"]["progress"] == 1.0
        # after_forward = "delete": the bytes left the leaf, the record stays
        assert not list((leaf.data_dir / "files" / at_leaf["cam-1/logs/big.bin"]
                         ["correlationId"]).glob("*"))
        refused = leaf.cli("files", "download", "cam-1/logs/big.bin", "--out",
                           str(tmp_path / "x"), check=False)
        assert refused.returncode != 0 and "forwarded" in refused.stderr
        listing = leaf.cli("files", "list").stdout
        assert "cam-1/logs/big.bin" in listing and "forwarded" in listing
        # the parent created the origin as the gateway's child; its notification names it
        cam = json.loads(parent.cli("device", "show", "cam-1").stdout)
        gw = json.loads(parent.cli("device", "show", "leaf-gw").stdout)
        assert cam["parentScopes"] == [gw["deviceScope"]]
        notes = notifications(parent)
        assert sorted((n["deviceId"], n["blobName"], n["blobSizeInBytes"]) for n in notes) == [
            ("cam-1", "cam-1/logs/big.bin", len(big)), ("cam-1", "cam-1/logs/small.bin", 1024)]
        # each block of the big file once: 5 MB + 123 in 1 MB blocks
        stored = blocks_stored(parent)
        assert len(stored) == 1 + 6 and set(stored.values()) == {1}, stored
        # out of scope: refused by the parent (403), kept at the leaf, retried later
        x = files(leaf)["elsewhere/x.bin"]
        assert x["state"] == "stored" and x["upstream"]["state"] in ("queued", "forwarding")
        assert "403" in (x["upstream"]["lastError"] or ""), x
        assert "elsewhere/x.bin" not in at_parent
    finally:
        leaf.stop()
        parent.stop()


def test_resumed_after_sigkills_without_resending_stored_blocks(tmp_path) -> None:  # type: ignore[no-untyped-def]
    api_port = free_port(PARENT)
    parent = parent_hub(tmp_path, api_port=api_port)
    leaf = leaf_hub(tmp_path, forward_port=api_port, files=(
        "forward_block_bytes = 524288\nforward_bandwidth = 2097152\n"))
    parent.start()
    leaf.start()
    try:
        link(parent, leaf)
        key = device(leaf, "cam-2")
        data = os.urandom(8 << 20)
        asyncio.run(upload(leaf, "cam-2", key, "dump.bin", data, block=4 << 20))
        api = HubClient(leaf.data_dir)
        while True:  # 2 MB/s: about 4 s; kill -9 the leaf at 3 MB, the parent at 6 MB
            f = api.request("GET", "/files/cam-2/dump.bin")
            if f.get("upstream", {}).get("bytes", 0) >= 3 << 20:
                break
            time.sleep(0.05)
        leaf.kill()
        before = blocks_stored(parent)
        assert 0 < len(before) < 16
        leaf.start()
        api = HubClient(leaf.data_dir)
        while api.request("GET", "/files/cam-2/dump.bin")["upstream"]["bytes"] < 6 << 20:
            time.sleep(0.05)
        parent.kill()  # and the parent: what it stored of the upload survives
        parent.start()
        shown = wait_forwarded(leaf, ["cam-2/dump.bin"])["cam-2/dump.bin"]
        assert shown["state"] == "forwarded" and shown["size"] == len(data)
        f = files(parent)["cam-2/dump.bin"]
        assert f["sha256"] == sha256(data) and f["size"] == len(data)
        stored = blocks_stored(parent)
        assert len(stored) == 16 and set(stored.values()) == {1}, stored  # none sent twice
        assert "resumed" in leaf.log_text()
        # kept at the leaf (after_forward = "keep", the default): still downloadable
        leaf.cli("files", "download", "cam-2/dump.bin", "--out", str(tmp_path / "copy"))
        assert sha256((tmp_path / "copy").read_bytes()) == sha256(data)
    finally:
        leaf.stop()
        parent.stop()


def test_identity_mode_uploads_with_the_devices_own_key(tmp_path) -> None:  # type: ignore[no-untyped-def]
    api_port = free_port(PARENT)
    parent = parent_hub(tmp_path, api_port=api_port, on_behalf=False)  # stands in for Azure
    leaf = leaf_hub(tmp_path, forward_port=api_port, upstream='mode = "identity"\n',
                    files="forward_block_bytes = 1048576\n")
    parent.start()
    leaf.start()
    try:
        link(parent, leaf, edge=False)
        info = create_device(leaf, "az-cam")
        keys = info["authentication"]["symmetricKey"]
        HubClient(parent.data_dir).request("PUT", "/devices/az-cam", {  # the same identity
            "deviceId": "az-cam", "authentication": {"type": "sas", "symmetricKey": keys}})
        data = os.urandom((3 << 20) + 5)
        asyncio.run(upload(leaf, "az-cam", keys["primaryKey"], "still.jpg", data))
        wait_forwarded(leaf, ["az-cam/still.jpg"])
        f = files(parent)["az-cam/still.jpg"]
        assert f["sha256"] == sha256(data) and "via" not in f  # the device's own upload
        assert [n["deviceId"] for n in notifications(parent)] == ["az-cam"]
        stored = blocks_stored(parent)
        assert len(stored) == 4 and set(stored.values()) == {1}
    finally:
        leaf.stop()
        parent.stop()


def test_files_yield_to_queued_telemetry(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Telemetry on a metered link (20 KB/s) has a backlog: the file (its own cap 2 MB/s)
    waits while telemetry is queued (a piece per second at most), then goes at its cap."""
    api_port = free_port(PARENT)
    parent = parent_hub(tmp_path, api_port=api_port)
    leaf = leaf_hub(tmp_path, forward_port=api_port, upstream="bandwidth = 20000\n",
                    files="forward_block_bytes = 1048576\nforward_bandwidth = 2097152\n")
    parent.start()
    leaf.start()
    try:
        link(parent, leaf)
        key = device(leaf, "cam-3")
        sensor = Device("meter-1", device(leaf, "meter-1"))
        api = HubClient(leaf.data_dir)
        while api.request("GET", "/upstream/status")["state"] != "connected":
            time.sleep(0.1)

        async def telemetry() -> None:
            await run_device(sensor, leaf.host_name, LEAF,
                             lambda: leaf.port("mqtt_local_port"), asyncio.Event(), count=150,
                             body_bytes=900)

        asyncio.run(telemetry())  # ~150 KB queued: about 7 s on the metered link
        data = os.urandom(4 << 20)
        asyncio.run(upload(leaf, "cam-3", key, "clip.bin", data))
        stored_at = time.monotonic()
        samples = []
        while True:
            backlog = api.request("GET", "/upstream/status")["backlog"]
            f = api.request("GET", "/files/cam-3/clip.bin")
            samples.append((time.monotonic() - stored_at, backlog,
                            f.get("upstream", {}).get("bytes", 0)))
            if not backlog:
                break
            time.sleep(0.2)
        busy = [s for s in samples if s[1] and s[0] >= 2.0]
        assert busy, samples  # telemetry was still queued 2 s after the file was stored ...
        t, _, sent = busy[-1]
        assert sent <= (t + 2) * 64 * 1024 + (1 << 20), samples  # ... and the file waited
        wait_forwarded(leaf, ["cam-3/clip.bin"], timeout=30)
        assert files(parent)["cam-3/clip.bin"]["sha256"] == sha256(data)
        assert len(sensor.acked) == 150
        assert api.request("GET", "/upstream/status")["sent"] >= 150
    finally:
        leaf.stop()
        parent.stop()


def test_a_sas_expiring_on_the_way_is_renewed_keeping_the_blocks(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The parent's SAS lives 2 s, the file takes about 5 s on the link: each time it expires
    the leaf asks for a new one and the parent carries the staged blocks over (Storage keeps
    uncommitted blocks per blob), so no block goes twice."""
    api_port = free_port(PARENT)
    parent = parent_hub(tmp_path, api_port=api_port, files="sas_ttl_seconds = 2\n")
    leaf = leaf_hub(tmp_path, forward_port=api_port, files=(
        "forward_block_bytes = 262144\nforward_bandwidth = 1048576\n"))
    parent.start()
    leaf.start()
    try:
        link(parent, leaf)
        key = device(leaf, "cam-4")
        data = os.urandom((5 << 20) + 77)
        asyncio.run(upload(leaf, "cam-4", key, "slow.bin", data))
        wait_forwarded(leaf, ["cam-4/slow.bin"], timeout=60)
        f = files(parent)["cam-4/slow.bin"]
        assert f["state"] == "stored" and f["sha256"] == sha256(data)
        by_block = Counter(block for _, block in blocks_stored(parent).elements())
        assert len(by_block) == 21 and set(by_block.values()) == {1}, by_block
        assert leaf.log_text().count("SAS expired on the way") >= 1
        assert "carried over" in parent.log_text()
    finally:
        leaf.stop()
        parent.stop()
