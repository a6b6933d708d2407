"""X.509 as IoT Hub does it, with the unmodified Azure SDKs (issue 8, IoT Hub ref §8).

* A self-signed device registered by thumbprint only -- azure-iot-hub's
  ``create_device_with_x509``, no certificate uploaded -- connects with azure-iot-device, over
  MQTT (8883) and MQTT over WebSocket (443).
* Your own CA: root -> intermediate -> leaf; the root uploaded and verified with proof of
  possession (``gateway ca-cert``), the device registered with
  ``create_device_with_certificate_authority``, and the SDK sending leaf + intermediate.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest

from gateway.pki import make_self_signed_certificate, thumbprints
from tests.certchain import issue, three_levels
from tests.hubproc import HubProcess
from tests.interop.conftest import run_sdk, service

pytestmark = pytest.mark.interop


def monitor(hub: HubProcess, device_id: str) -> list[dict[str, Any]]:
    out = hub.cli("monitor-events", "--device", device_id, "--from-beginning", "--timeout", "2",
                  "--json").stdout
    return [json.loads(line)["event"] for line in out.splitlines() if line.strip()]


def send(python: Path, hub: HubProcess, device_id: str, cert: Path, key: Path, count: int,
         **extra: Any) -> dict[str, Any]:
    return run_sdk(python, "send_telemetry.py",
                   {"x509_cert": str(cert), "x509_key": str(key), "hostname": "localhost",
                    "device_id": device_id, "gateway_hostname": "localhost",
                    "ca_file": hub.ca_file, "count": count, **extra})


def test_self_signed_device_registered_by_thumbprint_only(iot_hub: HubProcess,
                                                          azure_python: Path,
                                                          tmp_path: Path) -> None:
    device_id = f"ss-{uuid.uuid4().hex[:8]}"
    cert, key = make_self_signed_certificate(device_id, tmp_path)
    sha1, _ = thumbprints(_der(cert))
    [created] = service(azure_python, iot_hub,
                        {"op": "create_device_x509", "device": device_id, "primary": sha1})
    assert created == {"deviceId": device_id, "type": "selfSigned", "primary": sha1}
    assert send(azure_python, iot_hub, device_id, cert, key, 3) == {"sent": 3}
    assert send(azure_python, iot_hub, device_id, cert, key, 2, websockets=True,
                prefix="ws") == {"sent": 2}
    events = monitor(iot_hub, device_id)
    assert [e["properties"]["system"]["message_id"] for e in events] == [
        "m-0", "m-1", "m-2", "ws-0", "ws-1"]
    auth = json.loads(events[0]["annotations"]["iothub-connection-auth-method"])
    assert auth["type"] == "x509Certificate"
    # another self-signed certificate with the same CN is refused, with the reason logged
    other, other_key = make_self_signed_certificate(device_id, tmp_path / "other")
    with pytest.raises(AssertionError, match="CredentialError|Unauthorized|ConnectionFailed"):
        send(azure_python, iot_hub, device_id, other, other_key, 1)
    assert f"client_id='{device_id}'" in iot_hub.log_text()
    assert "reason=thumbprint mismatch" in iot_hub.log_text()


def test_own_ca_three_level_chain(iot_hub: HubProcess, azure_python: Path,
                                  tmp_path: Path) -> None:
    device_id = f"ca-{uuid.uuid4().hex[:8]}"
    chain = three_levels(device_id)
    name = f"plant{uuid.uuid4().hex[:6]}"
    root = tmp_path / "root.pem"
    root.write_text(chain.root.pem)
    iot_hub.cli("ca-cert", "create", name, "--path", str(root))
    code = iot_hub.cli("ca-cert", "verification-code", name).stdout.strip()
    proof = tmp_path / "proof.pem"
    proof.write_text(issue(code, chain.root, ca=False).pem)
    iot_hub.cli("ca-cert", "verify", name, "--path", str(proof))
    [created] = service(azure_python, iot_hub, {"op": "create_device_ca", "device": device_id})
    assert created == {"deviceId": device_id, "type": "certificateAuthority"}
    cert, key = chain.write_device_files(tmp_path / "device")  # leaf + intermediate
    assert send(azure_python, iot_hub, device_id, cert, key, 3) == {"sent": 3}
    assert send(azure_python, iot_hub, device_id, cert, key, 1, websockets=True,
                prefix="ws") == {"sent": 1}
    events = monitor(iot_hub, device_id)
    assert [e["payload"]["seq"] for e in events] == [0, 1, 2, 0]
    # without the intermediate the chain is incomplete: refused, with the reason logged
    leaf_only = tmp_path / "leaf.pem"
    leaf_only.write_text(chain.leaf.pem)
    with pytest.raises(AssertionError, match="CredentialError|Unauthorized|ConnectionFailed"):
        send(azure_python, iot_hub, device_id, leaf_only, key, 1)
    assert "through the 0 intermediate(s) the device sent" in iot_hub.log_text()
    iot_hub.cli("ca-cert", "delete", name)


def _der(path: Path) -> bytes:
    import ssl

    return ssl.PEM_cert_to_DER_cert(path.read_text())
