"""Files through a leaf gateway to its parent (issue 14, forwarding): the unmodified
azure-iot-device and azure-storage-blob upload 1 KB, 10 MB and 100 MB files to a leaf; the leaf
forwards them to its parent on the devices' behalf while tests/faultproxy.py cuts the link
(RST and FIN) during the 100 MB file. The parent holds every file with the original's
checksum, under the device, and stored every block exactly once (its own log of blocks).

The SDK dials 8883 and 443 of its GatewayHostName: the leaf binds them on this test's own
loopback address (127.0.26.2), not on 127.0.0.1, so it runs beside the shared interop hub."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest

from gateway.files.blob import block_id
from gateway.hubclient import HubClient
from tests.faultproxy import FaultProxy
from tests.files.federation import (
    LEAF,
    PARENT,
    PROXY,
    blocks_stored,
    device,
    files,
    free_port,
    leaf_hub,
    link,
    notifications,
    parent_hub,
    wait_forwarded,
)
from tests.hubproc import HubProcess, create_device
from tests.interop.conftest import run_sdk

pytestmark = pytest.mark.interop

SIZES = {"small.bin": 1024, "medium.bin": 10 << 20, "large.bin": 100 << 20}
BLOCK = 4 << 20


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _random_file(path: Path, size: int) -> None:
    with open(path, "wb") as fh:
        fh.writelines(os.urandom(min(1 << 20, size)) for _ in range(0, size, 1 << 20))


@pytest.mark.slow
def test_sdk_files_through_a_leaf_to_its_parent_with_cuts(azure_python: Path,
                                                          tmp_path: Path) -> None:
    api_port, https_proxy = free_port(PARENT), free_port(PROXY)
    parent = parent_hub(tmp_path, api_port=api_port, blob_host=f"parent.local:{https_proxy}")
    # 20 MB/s: the 100 MB file takes about 5 s on the link, long enough to cut it three times
    leaf = leaf_hub(tmp_path, forward_port=https_proxy, tls_port=8883, api_port=443,
                    files=f'blob_host = "{LEAF}"\nforward_bandwidth = 20971520\n')
    parent.start()
    try:
        asyncio.run(_run(parent, leaf, azure_python, tmp_path, api_port, https_proxy))
    finally:
        leaf.stop()
        parent.stop()


async def _run(parent: HubProcess, leaf: HubProcess, python: Path, tmp: Path, api_port: int,
               https_port: int) -> None:
    mqtt = await FaultProxy((PROXY, 0), (PARENT, parent.port("mqtt_tls_port"))).start()
    https = await FaultProxy((PROXY, https_port), (PARENT, api_port)).start()
    try:
        await asyncio.to_thread(leaf.start)
        await asyncio.to_thread(link, parent, leaf, host=PROXY, mqtt_port=mqtt.port)
        await asyncio.to_thread(create_device, leaf, "cam-7")
        cs = await asyncio.to_thread(leaf.connection_string, "cam-7", gateway_host=LEAF)
        originals = {}
        for name, size in SIZES.items():
            path = tmp / name
            await asyncio.to_thread(_random_file, path, size)
            originals[f"cam-7/{name}"] = _sha(path)
            if name == "large.bin":
                cutter = asyncio.get_running_loop().create_task(_cut_during(leaf, https, mqtt))
            t0 = time.monotonic()
            out = await asyncio.to_thread(run_sdk, python, "upload_file.py", {
                "connection_string": cs, "ca_file": leaf.ca_file, "path": str(path),
                "blob_name": name, "max_single_put_size": BLOCK if size > BLOCK else None,
                "block_size": BLOCK}, 300)
            assert out["ok"], out["description"]
            print(f"{name}: into the leaf in {time.monotonic() - t0:.1f} s")
        cuts = await asyncio.wait_for(cutter, 120)
        shown = await asyncio.to_thread(wait_forwarded, leaf, list(originals), 120)
    finally:
        await https.stop()
        await mqtt.stop()
    assert cuts == 3, cuts
    at_parent = files(parent)
    for blob, digest in originals.items():
        assert shown[blob]["sha256"] == digest  # stored whole at the leaf ...
        f = at_parent[blob]  # ... and at the parent, under the device, by the gateway
        assert (f["state"], f["sha256"], f["via"]) == ("stored", digest, "leaf-gw"), f
    # the large file in 25 blocks of 4 MB, the medium in 3, the small in 1: each stored once
    stored = blocks_stored(parent)
    assert set(stored.values()) == {1}, [k for k, n in stored.items() if n > 1]
    per_upload = Counter(cid for cid, _ in stored)
    assert sorted(per_upload.values()) == [1, 3, 25], per_upload
    assert "resumed" in leaf.log_text()
    notes = notifications(parent)
    assert sorted((n["deviceId"], n["blobName"]) for n in notes) == sorted(
        ("cam-7", b) for b in originals)


async def _cut_during(leaf: HubProcess, https: FaultProxy, mqtt: FaultProxy) -> int:
    """Cut the link (both connections) when the large file is 20, 45 and 70 % up."""
    api = HubClient(leaf.data_dir)
    cuts = 0
    for mark, how in ((0.2, "rst"), (0.45, "fin"), (0.7, "rst")):
        while True:
            f = await asyncio.to_thread(api.request, "GET", "/files")
            large = [x for x in f if x["blobName"] == "cam-7/large.bin"]
            progress = large[0].get("upstream", {}).get("progress", 0) if large else 0
            if large and large[0]["state"] == "forwarded":
                return cuts
            if progress >= mark:
                https.cut(how)
                mqtt.cut(how)
                cuts += 1
                break
            await asyncio.sleep(0.05)
    return cuts


def test_get_block_list_as_azure_storage_blob_reads_it(azure_python: Path,
                                                       tmp_path: Path) -> None:
    """What the forwarder asks a parent after a cut, as Azure's own client asks it."""
    hub = parent_hub(tmp_path, api_port=free_port(PARENT)).start()
    try:
        key = device(hub, "cam-8")
        url = asyncio.run(_stage(hub, key))
        code = (
            "import json, sys\nfrom azure.storage.blob import BlobClient\n"
            "b = BlobClient.from_blob_url(sys.argv[1], connection_verify=sys.argv[2])\n"
            "c, u = b.get_block_list('all')\n"
            "print(json.dumps([[[x.id, x.size] for x in c], [[x.id, x.size] for x in u]]))\n")
        out = subprocess.run([str(azure_python), "-c", code, url, hub.ca_file],
                             capture_output=True, text=True, timeout=120, check=True)
        committed, uncommitted = json.loads(out.stdout)
        assert committed == [] and uncommitted == [["00000000", 1000], ["00000001", 1001]]
    finally:
        hub.stop()


async def _stage(hub: HubProcess, key: str) -> str:
    """A SAS URI and two staged blocks, not committed."""
    import ssl

    import aiohttp

    from tests.hubproc import device_token

    ctx = ssl.create_default_context(cafile=hub.ca_file)
    base = f"https://{hub.info['api_host']}:{hub.port('api_port')}"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as http:
        async with http.post(f"{base}/devices/cam-8/files", json={"blobName": "part.bin"},
                             headers={"Authorization": device_token(hub, "cam-8", key)}) as r:
            info = await r.json()
        url = f"{base}/{info['containerName']}/{info['blobName']}{info['sasToken']}"
        for i in range(2):
            async with http.put(f"{url}&comp=block&blockid={block_id(i)}",
                                data=b"a" * (1000 + i)) as r:
                assert r.status == 201
    return url
