"""``PUT /upstream`` with an enrollment (what the Upstream screen and ``gateway upstream set
--group-key`` send): bad input is refused with one line before anything is dialled; a good one
registers at a real parent's provisioning service and becomes the link."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from pathlib import Path
from typing import Any

import pytest

from gateway.errors import GatewayTimeoutError, InvalidRequestError
from gateway.upstream import enroll
from tests.hubproc import HubProcess

PARENT, CHILD = "127.0.25.72", "127.0.25.73"
KEY = base64.b64encode(b"k" * 32).decode()


def good(**kw: Any) -> dict[str, Any]:
    return {"idScope": "0ne0001", "provisioningHost": "dps.example", "registrationId": "GW-1",
            "groupKey": KEY, **kw}


@pytest.mark.parametrize(("data", "message"), [
    ("x", "enrollment must be an object"),
    (good(idScope=""), "idScope"),
    (good(idScope="a/b"), "idScope"),
    (good(provisioningHost=""), "provisioningHost"),
    (good(provisioningPort=0), "provisioningPort"),
    (good(provisioningPort=True), "provisioningPort"),
    (good(groupKey="not base64!"), "groupKey must be base64"),
    (good(groupKey=None), "give groupKey or x509"),
    (good(x509={"cert": "a", "key": "b"}), "give groupKey or x509"),
    (good(registrationId="-bad-"), "registrationId"),
    (good(registrationId=None), "registrationId"),
    (good(extra=1), "unknown keys ['extra']"),
])
def test_bad_enrollments_are_refused_in_one_line(data: Any, message: str) -> None:
    with pytest.raises(InvalidRequestError) as err:
        enroll.parse(data)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_certificate_enrollment_needs_the_files_and_takes_its_common_name(
        tmp_path: Path) -> None:
    from gateway import pki

    with pytest.raises(InvalidRequestError, match="no such file on the gateway"):
        enroll.parse(good(groupKey=None, x509={"cert": str(tmp_path / "no.pem"),
                                               "key": str(tmp_path / "no.key")}))
    cert, key = pki.make_self_signed_certificate("Site-9", tmp_path)
    e = enroll.parse(good(groupKey=None, registrationId=None,
                          x509={"cert": str(cert), "key": str(key)}))
    assert e.registration_id == "site-9" and e.device_key is None  # lower case (ref §12.1)
    assert enroll.parse(good()).registration_id == "gw-1"


def test_an_unreachable_service_is_a_504_and_sets_nothing(tmp_path: Path) -> None:
    e = enroll.parse(good(provisioningHost="127.0.25.74", provisioningPort=9))
    with pytest.raises(GatewayTimeoutError, match="cannot reach the provisioning service"):
        asyncio.run(enroll.enroll(e, data_dir=tmp_path))
    assert not (tmp_path / "provisioning.json").exists()


def test_cli_group_enrollment_registers_and_connects(tmp_path: Path) -> None:
    parent = HubProcess(tmp_path / "parent", host_name="parent.local", address=PARENT,
                        log_level="info").start()
    child = HubProcess(tmp_path / "child", host_name="child.local", address=CHILD,
                       log_level="info").start()
    try:
        group = json.loads(parent.cli("enrollment", "create", "gws", "--iot-edge").stdout)
        key = group["attestation"]["symmetricKey"]["primaryKey"]
        scope = parent.cli("enrollment", "id-scope").stdout.strip()
        port = str(parent.port("mqtt_tls_port"))
        base = ["upstream", "set", "--id-scope", scope, "--provisioning-host", PARENT,
                "--provisioning-port", port, "--host", PARENT, "--port", port,
                "--ca-file", parent.ca_file]
        bad = child.cli(*base, "--group-key", key, check=False)  # no registration id
        assert bad.returncode != 0 and "registrationId" in bad.stderr
        wrong = child.cli(*base, "--registration-id", "site-3", "--group-key",
                          base64.b64encode(b"wrong").decode(), check=False)
        assert wrong.returncode != 0 and "refused" in wrong.stderr
        assert json.loads(child.cli("upstream", "show").stdout) is None
        shown = json.loads(child.cli(*base, "--registration-id", "Site-3",
                                     "--group-key", key).stdout)
        assert shown["device_id"] == "site-3" and shown["hub"] == "parent.local"
        assert shown["shared_access_key"] == "<hidden>"
        assert json.loads(parent.cli("device", "show", "site-3").stdout)["status"] == "enabled"
        for _ in range(300):
            if json.loads(child.cli("upstream", "status", "--json").stdout)["state"] == \
                    "connected":
                break
            time.sleep(0.2)
        else:
            raise AssertionError("the link did not connect")
    finally:
        child.stop()
        parent.stop()
