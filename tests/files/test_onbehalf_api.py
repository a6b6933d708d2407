"""The parent's side of uploads on behalf of a device (gateway/api/files.py): only an edge
device may name another device, only one in its scope, and only the gateway that started an
upload completes it. Raw HTTPS against a real hub."""

from __future__ import annotations

import asyncio
import json
import ssl
from typing import Any

import aiohttp

from gateway.files.blob import GATEWAY_HEADER
from tests.files.federation import PARENT, free_port, parent_hub
from tests.hubproc import HubProcess, create_device, device_token


async def _call(hub: HubProcess, path: str, as_: tuple[str, str], body: dict[str, Any],
                gateway: bool = True) -> tuple[int, Any]:
    ctx = ssl.create_default_context(cafile=hub.ca_file)
    headers = {"Authorization": device_token(hub, *as_)}
    if gateway:
        headers[GATEWAY_HEADER] = as_[0]
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as http, \
            http.post(f"https://{PARENT}:{hub.port('api_port')}{path}", json=body,
                      headers=headers) as r:
        return r.status, await r.json(content_type=None) if r.status != 204 else None


def _key(info: dict[str, Any]) -> str:
    return str(info["authentication"]["symmetricKey"]["primaryKey"])


def test_who_may_upload_for_whom(tmp_path) -> None:  # type: ignore[no-untyped-def]
    hub = parent_hub(tmp_path, api_port=free_port(PARENT)).start()
    try:
        gw = ("gw-a", _key(create_device(hub, "gw-a", "--edge")))
        gw_b = ("gw-b", _key(create_device(hub, "gw-b", "--edge")))
        plain = ("plain", _key(create_device(hub, "plain")))
        create_device(hub, "leaf-a", "--parent", "gw-a")
        create_device(hub, "off", "--parent", "gw-a")
        hub.cli("device", "update", "off", "--status", "disabled")

        async def run() -> None:
            blob = {"blobName": "x.bin"}
            status, body = await _call(hub, "/devices/leaf-a/files", plain, blob)
            assert status == 403 and "may not act" in body["Message"], body
            status, body = await _call(hub, "/devices/leaf-a/files", gw_b, blob)
            assert status == 403 and "not in its scope" in body["Message"], body
            status, info = await _call(hub, "/devices/leaf-a/files", gw, blob)
            assert status == 200 and info["blobName"] == "leaf-a/x.bin", info
            note = {"correlationId": info["correlationId"], "isSuccess": False,
                    "statusCode": 500, "statusDescription": "gave up"}
            # another gateway cannot complete it
            status, _ = await _call(hub, "/devices/leaf-a/files/notifications", gw_b, note)
            assert status == 403
            status, _ = await _call(hub, "/devices/leaf-a/files/notifications", gw, note)
            assert status == 204
            status, info = await _call(hub, "/devices/new-leaf/files", gw, blob)
            assert status == 200  # unknown here: created as gw-a's child
            status, body = await _call(hub, "/devices/off/files", gw, blob)
            assert status == 403 and "disabled" in body["Message"], body

        asyncio.run(run())
        leaf = json.loads(hub.cli("device", "show", "new-leaf").stdout)
        scope = json.loads(hub.cli("device", "show", "gw-a").stdout)["deviceScope"]
        assert leaf["authentication"]["type"] == "none" and leaf["parentScopes"] == [scope]
    finally:
        hub.stop()
