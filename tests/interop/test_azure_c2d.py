"""Cloud-to-device messages received by the unmodified azure-iot-device SDK, sent with the CLI."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from tests.hubproc import HubProcess
from tests.interop.conftest import DeviceSession

pytestmark = pytest.mark.interop


def test_c2d_online_and_after_being_offline(iot_hub: HubProcess, azure_python: Path) -> None:
    device_id = f"c2d-{uuid.uuid4().hex[:8]}"
    iot_hub.cli("device", "create", device_id)
    cs = iot_hub.connection_string(device_id, gateway_host="localhost")
    session = DeviceSession(azure_python, cs, iot_hub.ca_file)
    try:
        # the SDK subscribes to C2D when the handler is set; give it a first message
        iot_hub.cli("c2d", "send", device_id, "--body", "hello 1", "--prop", "kind=greeting",
                    "--message-id", "id-1", "--correlation-id", "corr-1",
                    "--content-type", "text/plain")
        got = session.expect("c2d")["c2d"]
        assert got["body"] == "hello 1" and got["message_id"] == "id-1"
        assert got["correlation_id"] == "corr-1" and got["content_type"] == "text/plain"
        assert got["props"] == {"kind": "greeting"}
        session.send(cmd="disconnect")
        session.expect("disconnected")
        iot_hub.cli("c2d", "send", device_id, "--body", "while you were away", "--message-id", "id-2")
        session.send(cmd="connect")
        session.expect("connected")
        got = session.expect("c2d")["c2d"]
        assert got["body"] == "while you were away" and got["message_id"] == "id-2"
    finally:
        session.close()
