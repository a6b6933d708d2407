"""The unmodified azure-iot-device SDK against our hub (issue 2's interop checks).

Each SDK run happens in the Azure venv (paho-mqtt < 2); messages are read back through the
built-in endpoint with ``gateway monitor-events``, exactly as a user would.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.hubproc import HubProcess
from tests.interop.conftest import run_sdk

pytestmark = pytest.mark.interop


def monitor(hub: HubProcess, device_id: str, *extra: str) -> list[dict[str, Any]]:
    out = hub.cli("monitor-events", "--device", device_id, "--from-beginning", "--timeout", "2",
                  "--json", *extra).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def new_device(hub: HubProcess, *flags: str) -> str:
    device_id = f"dev-{uuid.uuid4().hex[:8]}"
    hub.cli("device", "create", device_id, *flags)
    return device_id


def test_sas_device_sends_1000_messages_in_order_with_properties(
    iot_hub: HubProcess, azure_python: Path
) -> None:
    device_id = new_device(iot_hub)
    cs = iot_hub.connection_string(device_id, gateway_host="localhost")
    assert cs.startswith("HostName=localhost;DeviceId=")
    assert cs.endswith(";GatewayHostName=localhost")
    result = run_sdk(azure_python, "send_telemetry.py",
                     {"connection_string": cs, "ca_file": iot_hub.ca_file, "count": 1000})
    assert result == {"sent": 1000}
    events = monitor(iot_hub, device_id)
    assert len(events) == 1000
    for i, item in enumerate(events):
        event = item["event"]
        assert event["origin"] == device_id
        assert event["payload"] == {"seq": i, "temperature": 20 + i % 10, "note": "ü & = / %"}
        system, notes = event["properties"]["system"], event["annotations"]
        assert system["message_id"] == f"m-{i}"
        assert system["correlation_id"] == f"corr-{i}"
        assert system["content_type"] == "application/json"
        assert system["content_encoding"] == "utf-8"
        assert notes["iothub-connection-device-id"] == device_id
        assert json.loads(notes["iothub-connection-auth-method"])["type"] == "sas"
        assert isinstance(notes["iothub-enqueuedtime"], int)
        app = event["properties"]["application"]
        assert app == {"seq": str(i), "alert level": "high & low=1/2"}


def test_module_client_sends_as_module(iot_hub: HubProcess, azure_python: Path) -> None:
    device_id = new_device(iot_hub)
    iot_hub.cli("module", "create", device_id, "filter")
    cs = iot_hub.connection_string(device_id, "filter", gateway_host="localhost")
    assert ";ModuleId=filter;" in cs
    run_sdk(azure_python, "send_telemetry.py",
            {"connection_string": cs, "ca_file": iot_hub.ca_file, "count": 5, "module": True,
             "output": "alerts"})
    events = monitor(iot_hub, device_id)
    assert len(events) == 5
    for event in events:
        notes = event["event"]["annotations"]
        assert notes["iothub-connection-module-id"] == "filter"
        assert notes["output-name"] == "alerts"
        assert event["event"]["module"] == "filter"


def test_x509_ca_signed_device(iot_hub: HubProcess, azure_python: Path, tmp_path: Path) -> None:
    device_id = new_device(iot_hub, "--x509-ca", "--out", str(tmp_path))  # issues cert and key
    cert, key = tmp_path / f"{device_id}.cert.pem", tmp_path / f"{device_id}.key.pem"
    run_sdk(azure_python, "send_telemetry.py",
            {"x509_cert": str(cert), "x509_key": str(key), "hostname": "localhost",
             "device_id": device_id, "gateway_hostname": "localhost",
             "ca_file": iot_hub.ca_file, "count": 3})
    events = monitor(iot_hub, device_id)
    assert [e["event"]["payload"]["seq"] for e in events] == [0, 1, 2]
    auth = json.loads(events[0]["event"]["annotations"]["iothub-connection-auth-method"])
    assert auth["type"] == "x509Certificate"


def test_x509_self_signed_device_by_certificate(iot_hub: HubProcess, azure_python: Path,
                                                tmp_path: Path) -> None:
    from gateway.pki import make_self_signed_certificate

    device_id = f"dev-{uuid.uuid4().hex[:8]}"
    cert, key = make_self_signed_certificate(device_id, tmp_path)
    iot_hub.cli("device", "create", device_id, "--x509-cert", str(cert))
    run_sdk(azure_python, "send_telemetry.py",
            {"x509_cert": str(cert), "x509_key": str(key), "hostname": "localhost",
             "device_id": device_id, "gateway_hostname": "localhost",
             "ca_file": iot_hub.ca_file, "count": 2})
    assert len(monitor(iot_hub, device_id)) == 2


def test_sdk_refused_for_wrong_key(iot_hub: HubProcess, azure_python: Path) -> None:
    device_id = new_device(iot_hub)
    cs = iot_hub.connection_string(device_id, gateway_host="localhost")
    bad = cs.replace("SharedAccessKey=", "SharedAccessKey=AAAA")
    with pytest.raises(AssertionError, match="CredentialError|Unauthorized|ConnectionFailed"):
        run_sdk(azure_python, "send_telemetry.py",
                {"connection_string": bad, "ca_file": iot_hub.ca_file, "count": 1}, timeout=60)
    assert "bad signature" in iot_hub.log_text() or "malformed" in iot_hub.log_text()
