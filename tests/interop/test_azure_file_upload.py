"""File upload with the unmodified azure-iot-device and azure-storage-blob (issue 14, device
side): a single Put Blob, and Put Block + Put Block List for a larger file; the bytes the hub
stored equal the original; the service sees the notification and the routable event."""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path

import pytest

from tests.hubproc import HubProcess
from tests.interop.conftest import run_sdk

pytestmark = pytest.mark.interop


def _device(hub: HubProcess) -> tuple[str, str]:
    device_id = f"cam-{uuid.uuid4().hex[:6]}"
    hub.cli("device", "create", device_id)
    return device_id, hub.connection_string(device_id, gateway_host="localhost")


@pytest.mark.parametrize("size, single_put", [(1024, None), (10 << 20, 4 << 20)])
def test_upload_through_the_sdks(iot_hub: HubProcess, azure_python: Path, tmp_path: Path,
                                 size: int, single_put: int | None) -> None:
    device_id, cs = _device(iot_hub)
    # file upload notifications reach the built-in endpoint through a route of their own
    # (this hub has routes, so only device messages fall back to events)
    iot_hub.cli("route", "create", "fileNotes", "--source", "FileUploadNotifications",
                "--endpoint", "events", check=False)
    original = tmp_path / "original.bin"
    original.write_bytes(os.urandom(size))
    out = run_sdk(azure_python, "upload_file.py", {
        "connection_string": cs, "ca_file": iot_hub.ca_file, "path": str(original),
        "blob_name": "logs/today.bin", "max_single_put_size": single_put,
        "block_size": 1 << 20}, timeout=300)
    assert out["ok"], out["description"]
    assert out["blob_url"] == f"https://localhost/fileupload/{device_id}/logs/today.bin"
    shown = json.loads(iot_hub.cli("files", "show", f"{device_id}/logs/today.bin").stdout)
    assert shown["state"] == "stored" and shown["size"] == size
    copy = tmp_path / "copy.bin"
    iot_hub.cli("files", "download", f"{device_id}/logs/today.bin", "--out", str(copy))
    assert hashlib.sha256(copy.read_bytes()).hexdigest() == \
        hashlib.sha256(original.read_bytes()).hexdigest() == shown["sha256"]
    events = iot_hub.cli("monitor-events", "--device", device_id, "--from-beginning",
                         "--timeout", "2", "--json", "--all-kinds").stdout
    notes = [json.loads(line)["event"] for line in events.splitlines() if line.strip()]
    uploaded = [e for e in notes
                if e["annotations"].get("iothub-message-source") == "fileUploadNotifications"]
    assert [e["payload"]["blobSizeInBytes"] for e in uploaded] == [size]
