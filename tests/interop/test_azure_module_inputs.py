"""Module output -> route -> module input, both ends the unmodified azure-iot-device SDK."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from tests.hubproc import HubProcess
from tests.interop.conftest import DeviceSession

pytestmark = pytest.mark.interop


def test_send_to_output_arrives_on_input(iot_hub: HubProcess, azure_python: Path) -> None:
    device_id = f"edge-{uuid.uuid4().hex[:8]}"
    iot_hub.cli("device", "create", device_id)
    iot_hub.cli("module", "create", device_id, "sender")
    iot_hub.cli("module", "create", device_id, "receiver")
    sender = DeviceSession(azure_python, iot_hub.connection_string(
        device_id, "sender", gateway_host="localhost"), iot_hub.ca_file, module=True)
    receiver = DeviceSession(azure_python, iot_hub.connection_string(
        device_id, "receiver", gateway_host="localhost"), iot_hub.ca_file, module=True)
    try:
        sender.send(cmd="send", body='{"t": 1}', output="out1")
        sender.expect("sent")
        got = receiver.expect("c2d")["c2d"]
        assert got["body"] == '{"t": 1}' and got["input"] == "in1"
        assert got["props"]["$.cdid"] == device_id and got["props"]["$.cmid"] == "sender"
    finally:
        sender.close()
        receiver.close()
