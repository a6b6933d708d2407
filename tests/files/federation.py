"""A parent and a leaf hub on helper-own loopback addresses, and a device uploading to the
leaf over plain HTTPS (the blob REST calls azure-storage-blob makes: Put Block, Put Block List)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import re
import ssl
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp

from gateway.hubclient import HubClient
from tests.hubproc import HubProcess, create_device, device_token
from tests.upstream.federation import free_port

PARENT = "127.0.26.1"
LEAF = "127.0.26.2"
PROXY = "127.0.26.3"

UPSTREAM = ("[upstream]\nreconnect_min = 0.05\nreconnect_max = 0.5\nkeepalive = 5\n"
            "ack_timeout = 5.0\nstatus_interval = 1.0\n")


def parent_hub(tmp: Path, *, api_port: int, blob_host: str = "", on_behalf: bool = True,
               files: str = "", extra: str = "") -> HubProcess:
    hub_config = f'addresses = ["{PROXY}"]\n' + ("" if on_behalf else "on_behalf = false\n")
    if blob_host:
        files += f'blob_host = "{blob_host}"\n'
    files = f"[files]\n{files}" if files else ""
    return HubProcess(tmp / "parent", host_name="parent.local", address=PARENT,
                      api_port=api_port, log_level="info", hub_config=hub_config,
                      extra_config=files + extra)


def leaf_hub(tmp: Path, *, forward_port: int, files: str = "", upstream: str = "",
             **kw: Any) -> HubProcess:
    return HubProcess(tmp / "leaf", host_name="leaf.local", address=LEAF, log_level="info",
                      extra_config=UPSTREAM + upstream
                      + f"[files]\nforward_port = {forward_port}\n" + files, **kw)


def link(parent: HubProcess, leaf: HubProcess, *, host: str = PARENT,
         mqtt_port: int | None = None, gateway: str = "leaf-gw", edge: bool = True) -> str:
    create_device(parent, gateway, *(["--edge"] if edge else []))
    cs = parent.connection_string(gateway)
    leaf.cli("upstream", "set", "--connection-string", cs, "--ca-file", parent.ca_file,
             "--host", host, "--port", str(mqtt_port or parent.port("mqtt_tls_port")))
    return gateway


def device(hub: HubProcess, device_id: str) -> str:
    info = create_device(hub, device_id)
    return str(info["authentication"]["symmetricKey"]["primaryKey"])


async def upload(hub: HubProcess, device_id: str, key: str, name: str, data: bytes, *,
                 block: int = 1 << 20) -> dict[str, Any]:
    """What the SDKs do (ref §11): SAS URI, Put Block x n + Put Block List, notification."""
    ctx = ssl.create_default_context(cafile=hub.ca_file)
    base = f"https://{hub.info['api_host']}:{hub.port('api_port')}"
    auth = {"Authorization": device_token(hub, device_id, key)}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as http:
        async with http.post(f"{base}/devices/{device_id}/files", json={"blobName": name},
                             headers=auth) as resp:
            assert resp.status == 200, await resp.text()
            info = await resp.json()
        url = f"{base}/{info['containerName']}/{info['blobName']}{info['sasToken']}"
        ids = []
        for i in range(0, max(1, len(data)), block):
            bid = base64.b64encode(f"{i // block:06d}".encode()).decode()
            ids.append(bid)
            async with http.put(f"{url}&comp=block&blockid={bid}", data=io.BytesIO(data[i:i + block])) as r:
                assert r.status == 201, await r.text()
        xml = "<BlockList>" + "".join(f"<Latest>{b}</Latest>" for b in ids) + "</BlockList>"
        async with http.put(f"{url}&comp=blocklist", data=xml.encode()) as r:
            assert r.status == 201, await r.text()
        async with http.post(f"{base}/devices/{device_id}/files/notifications", headers=auth,
                             json={"correlationId": info["correlationId"], "isSuccess": True,
                                   "statusCode": 200, "statusDescription": "ok"}) as r:
            assert r.status == 204, await r.text()
    return dict(info)


def files(hub: HubProcess) -> dict[str, dict[str, Any]]:
    return {f["blobName"]: f for f in HubClient(hub.data_dir).request("GET", "/files")}


def wait_forwarded(leaf: HubProcess, blobs: list[str], timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        shown = files(leaf)
        if all(shown.get(b, {}).get("state") == "forwarded" for b in blobs):
            return shown
        if time.monotonic() > deadline:
            raise AssertionError(f"not forwarded in {timeout} s: "
                                 f"{json.dumps({b: shown.get(b) for b in blobs})[:3000]}")
        time.sleep(0.2)


def notifications(hub: HubProcess) -> list[dict[str, Any]]:
    api = HubClient(hub.data_dir)
    out = []
    while (got := api.raw("GET", "/messages/serviceBound/filenotifications")) is not None:
        body, lock = got
        out.append(body)
        api.request("DELETE", f"/messages/serviceBound/filenotifications/{lock}")
    return out


def blocks_stored(hub: HubProcess) -> Counter[tuple[str, str]]:
    """(correlation id, block id) -> how many times the hub stored it (its log lines)."""
    return Counter(re.findall(r"file block stored correlation_id=(\S+) block=(\S+) ",
                              hub.log_text()))


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


__all__ = ["asyncio", "free_port"]
