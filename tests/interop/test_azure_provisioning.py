"""The unmodified azure-iot-device ProvisioningDeviceClient against the hub's provisioning
service (issue 12 item 4): symmetric-key group enrollment with a derived key, and X.509 group
enrollment through the hub CA; each device then connects to its assigned hub with what it got.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from gateway import pki
from tests.hubproc import HubProcess
from tests.interop.conftest import run_sdk

pytestmark = pytest.mark.interop


def _events(hub: HubProcess, device_id: str) -> list[dict[str, object]]:
    out = hub.cli("monitor-events", "--device", device_id, "--from-beginning", "--timeout", "2",
                  "--json").stdout
    return [json.loads(line)["event"] for line in out.splitlines() if line.strip()]


def test_symmetric_key_group_enrollment(iot_hub: HubProcess, azure_python: Path) -> None:
    group = f"plant-{uuid.uuid4().hex[:6]}"
    twin = json.dumps({"tags": {"site": "plant-7"}, "properties": {"desired": {"interval": 30}}})
    iot_hub.cli("enrollment", "create", group, "--initial-twin", twin)
    scope = iot_hub.cli("enrollment", "id-scope").stdout.strip()
    registration = f"sensor-{uuid.uuid4().hex[:6]}"
    key = iot_hub.cli("enrollment", "derive-key", group, registration).stdout.strip()
    args = {"provisioning_host": "localhost", "id_scope": scope, "registration_id": registration,
            "symmetric_key": key, "ca_file": iot_hub.ca_file, "payload": {"model": "th-1"}}
    out = run_sdk(azure_python, "provision.py", args)
    assert out == {"status": "assigned", "assigned_hub": "localhost", "device_id": registration,
                   "substatus": "initialAssignment", "sent": 1}
    assert [e["payload"] for e in _events(iot_hub, registration)] == [{"provisioned": True}]
    device = json.loads(iot_hub.cli("device", "show", registration).stdout)
    assert device["authentication"]["symmetricKey"]["primaryKey"] == key
    shown = json.loads(iot_hub.cli("twin", "show", registration).stdout)
    assert shown["tags"] == {"site": "plant-7"}
    assert shown["properties"]["desired"]["interval"] == 30
    [state] = json.loads(iot_hub.cli("enrollment", "registrations", group).stdout)
    assert state["registrationId"] == registration and state["payload"] == {"model": "th-1"}

    again = run_sdk(azure_python, "provision.py", args)  # registering again is idempotent
    assert again["status"] == "assigned"
    assert again["substatus"] == "reprovisionedToInitialAssignment"


def test_x509_group_enrollment_through_the_hub_ca(iot_hub: HubProcess, azure_python: Path,
                                                  tmp_path: Path) -> None:
    iot_hub.cli("enrollment", "create", f"cams-{uuid.uuid4().hex[:6]}", "--x509-ca")
    scope = iot_hub.cli("enrollment", "id-scope").stdout.strip()
    registration = f"cam-{uuid.uuid4().hex[:6]}"
    certs = pki.HubCertificates(ca_cert=iot_hub.data_dir / "ca.pem",
                                ca_key=iot_hub.data_dir / "ca.key",
                                server_cert=iot_hub.data_dir / "server.pem",
                                server_key=iot_hub.data_dir / "server.key")
    cert, key = pki.issue_client_certificate(certs, registration, tmp_path)
    out = run_sdk(azure_python, "provision.py", {
        "provisioning_host": "localhost", "id_scope": scope, "registration_id": registration,
        "x509_cert": str(cert), "x509_key": str(key), "ca_file": iot_hub.ca_file})
    assert out["status"] == "assigned" and out["device_id"] == registration
    assert out["sent"] == 1
    device = json.loads(iot_hub.cli("device", "show", registration).stdout)
    assert device["authentication"]["type"] == "certificateAuthority"
