"""What a new user trips over with the ``gateway`` command: the hub systemd runs in
/var/lib/gateway found without ``--data-dir``; SAS tokens for mosquitto_pub and curl
(``gateway token``); one-line errors for a missing certificate file and an invalid device id."""

from __future__ import annotations

import json
import shutil
import ssl
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from gateway import cli, config
from gateway.hubclient import HubClient
from tests.hubproc import HubProcess, create_device
from tests.waiting import eventually


def token_fields(token: str) -> dict[str, str]:
    assert token.startswith("SharedAccessSignature ")
    return dict(urllib.parse.parse_qsl(token.split(" ", 1)[1]))


def https(hub: HubProcess, method: str, path: str, token: str,
          body: Any = None) -> tuple[int, Any]:
    """A plain HTTPS request, as curl makes it."""
    url = f"https://localhost:{hub.port('api_port')}{path}?api-version=2021-04-12"
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"Authorization": token,
                                              "Content-Type": "application/json"})
    context = ssl.create_default_context(cafile=hub.ca_file)
    try:
        with urllib.request.urlopen(request, context=context, timeout=30) as response:
            raw = response.read()
            return response.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


# -- the data directory ------------------------------------------------------------------------

def test_commands_without_data_dir_find_the_system_hub(
        hub: HubProcess, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """``/var/lib/gateway`` (here: the running hub's directory in its place) is the default
    when it exists and is ours, before the per-user directory."""
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(config, "SYSTEM_DATA_DIR", hub.data_dir)
    assert config.default_data_dir() == hub.data_dir
    assert cli.main(["device", "create", "found-1"]) == 0
    assert json.loads(capsys.readouterr().out)["deviceId"] == "found-1"
    monkeypatch.setattr(config, "SYSTEM_DATA_DIR", tmp_path / "absent")
    assert config.default_data_dir() == tmp_path / "xdg" / "gateway"
    monkeypatch.setenv("STATE_DIRECTORY", f"{tmp_path}/state:{tmp_path}/other")
    assert config.default_data_dir() == tmp_path / "state"


# -- gateway token -----------------------------------------------------------------------------

def test_token_device_is_a_password_mosquitto_pub_connects_with(hub: HubProcess) -> None:
    if shutil.which("mosquitto_pub") is None:
        pytest.fail("mosquitto_pub is required (dev.sh installs mosquitto-clients)")
    create_device(hub, "boiler-1")
    token = hub.cli("token", "device", "boiler-1", "--ttl", "600").stdout.strip()
    fields = token_fields(token)
    assert fields["sr"] == f"{hub.host_name}/devices/boiler-1" and "skn" not in fields
    assert abs(int(fields["se"]) - (time.time() + 600)) < 60
    subprocess.run(
        ["mosquitto_pub", "-h", "localhost", "-p", str(hub.port("mqtt_tls_port")),
         "--cafile", hub.ca_file, "-V", "mqttv311", "-i", "boiler-1",
         "-u", f"{hub.host_name}/boiler-1/?api-version=2021-04-12", "-P", token, "-q", "1",
         "-t", "devices/boiler-1/messages/events/alert=high", "-m", '{"temperature": 21.5}'],
        check=True, timeout=30, capture_output=True)
    api = HubClient(hub.data_dir)

    def stored() -> list[Any]:
        return api.request("GET", "/messages/events", query={  # type: ignore[no-any-return]
            "start": "earliest", "deviceId": "boiler-1", "kinds": "telemetry"})

    [item] = eventually_sync(stored)
    assert item["event"]["properties"]["application"] == {"alert": "high"}
    # the same token opens the device HTTP API (curl's way)
    status, _ = https(hub, "POST", "/devices/boiler-1/messages/events", token, {"t": 1})
    assert status == 204


def eventually_sync(check: Any) -> Any:
    import asyncio

    return asyncio.run(eventually(check, 20, "the message", interval=0.1))


def test_token_for_a_module_and_a_policy(hub: HubProcess) -> None:
    create_device(hub, "edge-box")
    hub.cli("module", "create", "edge-box", "modbus")
    token = hub.cli("token", "device", "edge-box", "--module", "modbus").stdout.strip()
    assert token_fields(token)["sr"] == f"{hub.host_name}/devices/edge-box/modules/modbus"
    status, _ = https(hub, "POST", "/devices/edge-box/modules/modbus/messages/events", token,
                      {"t": 1})
    assert status == 204
    read = hub.cli("token", "policy", "registryRead", "--ttl", "120").stdout.strip()
    fields = token_fields(read)
    assert fields["skn"] == "registryRead" and fields["sr"] == hub.host_name
    status, devices = https(hub, "GET", "/devices", read)
    assert status == 200 and [d["deviceId"] for d in devices] == ["edge-box"]
    service = hub.cli("token", "policy", "service").stdout.strip()
    assert https(hub, "GET", "/devices", service)[0] == 403  # service has no RegistryRead
    status, _ = https(hub, "POST", "/devices/edge-box/messages/deviceBound", service,
                      {"body": "open valve 3"})
    assert status == 201


def test_token_errors_are_one_line(hub: HubProcess, tmp_path: Path) -> None:
    create_device(hub, "cam-2", "--x509-ca", "--out", str(tmp_path))
    for args, text in ((("token", "device", "cam-2"), "has no shared access keys"),
                       (("token", "device", "ghost"), "not found"),
                       (("token", "policy", "nope"), "not found")):
        result = hub.cli(*args, check=False)
        assert result.returncode == 1 and text in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    result = hub.cli("token", "device", "cam-2", "--ttl", "0", check=False)
    assert result.returncode == 2 and "--ttl" in result.stderr


# -- one-line errors ---------------------------------------------------------------------------

def test_a_missing_certificate_file_is_one_line_not_a_traceback(hub: HubProcess,
                                                                tmp_path: Path) -> None:
    missing = hub.cli("device", "create", "meter-7", "--x509-cert", str(tmp_path / "no.pem"),
                      check=False)
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    assert missing.stderr.strip() == (f"gateway: error: --x509-cert {tmp_path / 'no.pem'}: "
                                      "cannot read it: No such file or directory")
    (tmp_path / "key.pem").write_text("-----BEGIN PRIVATE KEY-----\n")
    wrong = hub.cli("module", "create", "x", "m", "--x509-cert", str(tmp_path / "key.pem"),
                    check=False)
    assert wrong.returncode == 1 and "not a PEM certificate" in wrong.stderr
    assert len(wrong.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(("args", "text"), [
    (("device", "create", "a/b"), "invalid device id 'a/b': '/' not allowed"),
    (("device", "show", "a b"), "invalid device id 'a b': ' ' not allowed"),
    (("twin", "update", "x/modules", "--desired", "{}"), "invalid device id 'x/modules'"),
    (("module", "create", "edge", "m/1"), "invalid module id 'm/1': '/' not allowed"),
    (("token", "device", "d", "--module", "a&b"), "invalid module id 'a&b': '&' not allowed"),
])
def test_an_invalid_device_id_is_named_with_the_reason(hub: HubProcess, args: tuple[str, ...],
                                                       text: str) -> None:
    result = hub.cli(*args, check=False)
    assert result.returncode == 1 and text in result.stderr, result.stderr
    assert "1-128 ASCII letters" in result.stderr and "404" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_the_service_api_says_invalid_device_id_for_an_unroutable_path(hub: HubProcess) -> None:
    token = hub.cli("token", "policy", "iothubowner").stdout.strip()
    status, body = https(hub, "PUT", "/devices/a/b", token, {"deviceId": "a/b"})
    assert status == 404 and body["Message"].startswith("ErrorCode:InvalidRoute;")
    assert "invalid device id" in body["ExceptionMessage"]
    assert "cannot contain '/'" in body["ExceptionMessage"]
    status, body = https(hub, "PUT", "/devices/x/commands", token, {})  # DELETE only
    assert status == 405 and "invalid device id" in body["ExceptionMessage"]
    assert "this path takes DELETE" in body["ExceptionMessage"]
