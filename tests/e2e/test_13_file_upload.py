"""File upload's refusals and durability over plain HTTPS (issue 14): the SAS URI request and
notification as the device SDK sends them, the blob endpoint as azure-storage-blob calls it
(Put Blob, Put Block, Put Block List), and each limit: an expired or forged SAS, the 11th
concurrent upload, the per-device quota, a full disk, SIGKILL in the middle of an upload.
The unmodified SDKs' side is tests/interop/test_azure_file_upload.py."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.hubproc import HubProcess, create_device, device_token
from tests.tmpfs import tmpfs


class Device:
    def __init__(self, hub: HubProcess, device_id: str, key: str) -> None:
        self.hub, self.device_id, self.key = hub, device_id, key
        self.ctx = ssl.create_default_context(cafile=hub.ca_file)
        self.base = f"https://localhost:{hub.port('api_port')}"

    def call(self, method: str, path: str, body: Any = None, *, token: bool = True,
             data: bytes | None = None, headers: dict[str, str] | None = None
             ) -> tuple[int, bytes, dict[str, str]]:
        if body is not None:
            data = json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method)
        if token:
            req.add_header("Authorization", device_token(self.hub, self.device_id, self.key))
        if body is not None:
            req.add_header("Content-Type", "application/json")
        for k, v in (headers or {}).items():
            req.add_header(k, v)
        try:
            with urllib.request.urlopen(req, context=self.ctx, timeout=60) as r:
                return r.status, r.read(), dict(r.headers)
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read(), dict(exc.headers)

    def start(self, name: str) -> dict[str, Any]:
        status, body, _ = self.call("POST", f"/devices/{self.device_id}/files?api-version=2019-10-01",
                                    {"blobName": name})
        assert status == 200, body
        return json.loads(body)  # type: ignore[no-any-return]

    def put(self, info: dict[str, Any], data: bytes, query: str = "",
            sas: str | None = None) -> tuple[int, bytes, dict[str, str]]:
        path = f"/{info['containerName']}/{urllib.parse.quote(info['blobName'])}"
        return self.call("PUT", path + (sas or info["sasToken"]) + query, data=data, token=False,
                         headers={"x-ms-blob-type": "BlockBlob"})

    def notify(self, info: dict[str, Any], ok: bool = True) -> int:
        return self.call("POST", f"/devices/{self.device_id}/files/notifications",
                         {"correlationId": info["correlationId"], "isSuccess": ok,
                          "statusCode": 200 if ok else 500, "statusDescription": "x"})[0]


def _hub(tmp_path: Path, extra: str = "") -> HubProcess:
    return HubProcess(tmp_path / "data", extra_config=extra).start()


@pytest.fixture
def cam(hub: HubProcess) -> Device:
    key = create_device(hub, "cam-1")["authentication"]["symmetricKey"]["primaryKey"]
    return Device(hub, "cam-1", key)


def _code(headers: dict[str, str]) -> str:
    return headers.get("x-ms-error-code", "")


def test_put_blob_then_blocks_and_the_service_side(hub: HubProcess, cam: Device,
                                                   tmp_path: Path) -> None:
    info = cam.start("still.jpg")
    assert info["blobName"] == "cam-1/still.jpg" and info["sasToken"].startswith("?sv=")
    assert info["hostName"] == f"{hub.host_name}:{hub.port('api_port')}"
    status, _, headers = cam.put(info, b"jpeg bytes")
    assert status == 201 and headers["Content-MD5"] == base64.b64encode(
        hashlib.md5(b"jpeg bytes").digest()).decode()
    assert cam.notify(info) == 204

    big = cam.start("dump.bin")
    parts = [os.urandom(100_000) for _ in range(3)]
    ids = [base64.b64encode(f"block-{i:04d}".encode()).decode() for i in range(3)]
    for block_id, part in zip(ids, parts, strict=True):
        q = "&comp=block&blockid=" + urllib.parse.quote(block_id)
        assert cam.put(big, part, q)[0] == 201
    listing = "<?xml version='1.0'?><BlockList>" + "".join(
        f"<Latest>{i}</Latest>" for i in ids) + "</BlockList>"
    assert cam.put(big, listing.encode(), "&comp=blocklist")[0] == 201
    assert cam.notify(big) == 204

    files = {f["blobName"]: f for f in json.loads(hub.cli("files", "list", "--json").stdout)}
    assert files["cam-1/still.jpg"]["state"] == "stored"
    assert files["cam-1/dump.bin"]["size"] == 300_000
    out = tmp_path / "dump.bin"
    hub.cli("files", "download", "cam-1/dump.bin", "--out", str(out))
    assert out.read_bytes() == b"".join(parts)
    assert "stored" in hub.cli("files", "list").stdout

    from gateway.hubclient import HubClient
    client = HubClient(hub.data_dir)
    raw = client.raw("GET", "/messages/serviceBound/filenotifications")
    assert raw is not None
    note, lock = raw
    assert note["blobName"] == "cam-1/still.jpg" and note["blobSizeInBytes"] == 10
    client.request("DELETE", f"/messages/serviceBound/filenotifications/{lock}")
    raw = client.raw("GET", "/messages/serviceBound/filenotifications")
    assert raw is not None and raw[0]["blobName"] == "cam-1/dump.bin"

    hub.cli("files", "delete", "cam-1/still.jpg")
    assert hub.cli("files", "show", "cam-1/still.jpg", check=False).returncode == 1


def test_forged_expired_and_reused_sas(hub: HubProcess, cam: Device) -> None:
    info = cam.start("a.txt")
    other = cam.start("b.txt")
    status, body, headers = cam.put(info, b"x", sas=other["sasToken"])  # b's token on a
    assert status == 403 and _code(headers) == "AuthenticationFailed"
    assert b"<Code>AuthenticationFailed</Code>" in body
    forged = info["sasToken"].replace("sp=cw", "sp=rcw")
    assert _code(cam.put(info, b"x", sas=forged)[2]) == "AuthenticationFailed"
    assert cam.put(info, b"x", sas="?sv=1&sr=b")[0] == 403
    assert cam.call("POST", "/devices/cam-1/files", {"blobName": "c"}, token=False)[0] == 401
    assert cam.call("POST", "/devices/cam-1/files", {"blobName": "../../etc/x"})[0] == 400
    assert cam.put(info, b"done")[0] == 201 and cam.notify(info) == 204
    status, _, headers = cam.put(info, b"again")  # a finished upload takes no more bytes
    assert status == 409 and _code(headers) == "BlobImmutable"


def test_expired_sas(tmp_path: Path) -> None:
    hub = _hub(tmp_path, "[files]\nsas_ttl_seconds = 1\n")
    try:
        key = create_device(hub, "cam-2")["authentication"]["symmetricKey"]["primaryKey"]
        cam = Device(hub, "cam-2", key)
        info = cam.start("late.bin")
        time.sleep(2.2)
        status, body, headers = cam.put(info, b"too late")
        assert status == 403 and b"has passed" in body
    finally:
        hub.stop()


def test_limits_concurrency_quota_size(tmp_path: Path) -> None:
    hub = _hub(tmp_path, "[files]\ndevice_quota_bytes = 300000\nmax_file_bytes = 200000\n")
    try:
        key = create_device(hub, "cam-3")["authentication"]["symmetricKey"]["primaryKey"]
        cam = Device(hub, "cam-3", key)
        uploads = [cam.start(f"f{i}") for i in range(10)]
        status, body, _ = cam.call("POST", "/devices/cam-3/files", {"blobName": "f10"})
        assert status == 409 and b"at most 10 at once" in body  # the 11th concurrent upload
        status, _, headers = cam.put(uploads[0], os.urandom(200_001))
        assert status == 413 and _code(headers) == "RequestBodyTooLarge"
        assert cam.put(uploads[1], os.urandom(150_000))[0] == 201
        assert cam.put(uploads[2], os.urandom(140_000))[0] == 201
        status, _, headers = cam.put(uploads[3], os.urandom(50_000))
        assert status == 409 and _code(headers) == "QuotaExceeded"
        for info in uploads[1:3]:
            assert cam.notify(info) == 204
        assert cam.notify(uploads[4], ok=False) == 204
        states = {f["name"]: f["state"] for f in json.loads(hub.cli("files", "list",
                                                                    "--json").stdout)}
        assert states["f1"] == states["f2"] == "stored" and states["f4"] == "failed"
    finally:
        hub.stop()


@pytest.fixture
def tiny_data_dir(tmp_path: Path) -> Iterator[Path]:
    with tmpfs(tmp_path / "tiny", "6m") as mount:
        yield mount


def test_full_disk_refuses_and_keeps_what_was_stored(tiny_data_dir: Path) -> None:
    hub = HubProcess(tiny_data_dir / "data",
                     extra_config="[files]\nmax_file_bytes = 20000000\n").start()
    try:
        key = create_device(hub, "cam-4")["authentication"]["symmetricKey"]["primaryKey"]
        cam = Device(hub, "cam-4", key)
        first = cam.start("small.bin")
        small = os.urandom(100_000)
        assert cam.put(first, small)[0] == 201 and cam.notify(first) == 204
        big = cam.start("big.bin")
        status, body, headers = cam.put(big, os.urandom(8 << 20))
        assert status == 500 and b"disk is full" in body
        out = tiny_data_dir / "copy.bin"
        hub.cli("files", "download", "cam-4/small.bin", "--out", str(out))
        assert out.read_bytes() == small
        assert hub.cli("device", "show", "cam-4").returncode == 0  # the hub still serves
    finally:
        hub.stop()


def test_staged_blocks_survive_kill_9_and_the_upload_resumes(tmp_path: Path) -> None:
    hub = _hub(tmp_path)
    try:
        key = create_device(hub, "cam-5")["authentication"]["symmetricKey"]["primaryKey"]
        cam = Device(hub, "cam-5", key)
        info = cam.start("log.txt")
        parts = [os.urandom(50_000) for _ in range(4)]
        ids = [base64.b64encode(f"b{i}".encode()).decode() for i in range(4)]
        for block_id, part in list(zip(ids, parts, strict=True))[:2]:
            assert cam.put(info, part, "&comp=block&blockid=" + block_id)[0] == 201
        hub.kill()
        hub.start()
        cam = Device(hub, "cam-5", key)
        for block_id, part in list(zip(ids, parts, strict=True))[2:]:
            assert cam.put(info, part, "&comp=block&blockid=" + block_id)[0] == 201
        listing = "<BlockList>" + "".join(f"<Latest>{i}</Latest>" for i in ids) + "</BlockList>"
        assert cam.put(info, listing.encode(), "&comp=blocklist")[0] == 201
        assert cam.notify(info) == 204
        out = tmp_path / "log.txt"
        hub.cli("files", "download", "cam-5/log.txt", "--out", str(out))
        assert out.read_bytes() == b"".join(parts)
    finally:
        hub.stop()
