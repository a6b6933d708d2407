"""The Upstream screen by enrollment: the technician gives the provisioning service (ID scope,
address), the registration id and the group key, or a certificate; the gateway registers
itself at its parent's provisioning service (a real parent hub serving DPS on its MQTT port),
the link connects, and the screen shows its state and what it sends, live."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

from gateway import pki
from tests.hubproc import HubProcess, create_device
from tests.ui.conftest import base_url, start_hub
from tests.ui.test_upstream import CHILD_CONFIG, PARENT, number, publisher
from tests.ui.ui import by_id, console_errors, login, shots, until


def fill(driver: Any, values: dict[str, str]) -> None:
    for id_, text in values.items():
        field = by_id(driver, id_)
        field.clear()
        if text:
            field.send_keys(text)


def status(driver: Any) -> str:
    return str(by_id(driver, "status").text)


def test_group_key_then_certificate_enrollment(tmp_path: Path, browser: Any,
                                               artifacts: Path) -> None:
    import threading

    from selenium.webdriver.support.ui import Select

    parent = HubProcess(tmp_path / "parent", host_name="parent.local", address=PARENT,
                        log_level="info").start()
    child = start_hub(tmp_path, CHILD_CONFIG)
    stop = threading.Event()
    try:
        group = json.loads(parent.cli("enrollment", "create", "site-gateways",
                                      "--iot-edge").stdout)
        group_key = group["attestation"]["symmetricKey"]["primaryKey"]
        scope = parent.cli("enrollment", "id-scope").stdout.strip()
        port = str(parent.port("mqtt_tls_port"))
        url = base_url(child)
        login(browser, url)
        until(lambda: by_id(browser, "uptime").text not in ("", "…"), what="overview")
        browser.get(url + "/ui/upstream")
        until(lambda: by_id(browser, "up-state").text == "not set", what="not set")
        Select(by_id(browser, "up-how")).select_by_value("dps-key")
        assert by_id(browser, "up-scope").is_displayed()
        assert not by_id(browser, "up-connstr").is_displayed()
        assert by_id(browser, "up-regid").get_attribute("value") == "testhub.local"
        fill(browser, {"up-scope": scope, "up-dps-host": PARENT, "up-dps-port": port,
                       "up-regid": "site-7", "up-host": PARENT, "up-port": port,
                       "up-ca": parent.ca_file,
                       "up-group-key": base64.b64encode(b"not the group key").decode()})
        assert console_errors(browser) == []
        by_id(browser, "up-save").click()
        # A wrong group key: the service refuses, the page says so, nothing is set.
        until(lambda: "refused" in status(browser), 90, "refused")
        assert by_id(browser, "status").get_attribute("class") == "error"
        assert json.loads(child.cli("upstream", "show").stdout) is None
        [refused] = console_errors(browser)  # the 400 of that PUT, and nothing else
        assert "/ui/api/upstream" in refused["message"] and "400" in refused["message"]
        fill(browser, {"up-group-key": group_key})
        by_id(browser, "up-save").click()
        until(lambda: "registered" in status(browser), 90, "registered")
        assert "site-7 at parent.local" in status(browser)
        until(lambda: by_id(browser, "up-state").text == "connected", 60, "connected")
        assert "site-7" in by_id(browser, "up-target").text
        assert by_id(browser, "up-group-key").get_attribute("value") == ""
        gw = json.loads(parent.cli("device", "show", "site-7").stdout)
        assert gw["capabilities"]["iotEdge"] is True
        state = json.loads((child.data_dir / "provisioning.json").read_text())
        assert state["registered"]["deviceId"] == "site-7" and "groupKey" not in str(state)
        # Live: messages from a sensor here are forwarded, the Sent card counts them.
        dev = create_device(child, "sensor-1")
        publisher(child, "sensor-1", dev["authentication"]["symmetricKey"]["primaryKey"], stop)
        until(lambda: number(by_id(browser, "up-sent").text) >= 10, 60, "sent counting")
        assert number(by_id(browser, "up-backlog").text) >= 0
        stop.set()
        shots(browser, artifacts, "upstream-enrolled")

        # The same gateway, re-enrolled with a certificate of the parent's CA (CN = its
        # registration id, left empty on the page: the certificate names it).
        parent.cli("enrollment", "create", "site-cams", "--x509-ca", "--iot-edge")
        d = parent.data_dir
        certs = pki.HubCertificates(ca_cert=d / "ca.pem", ca_key=d / "ca.key",
                                    server_cert=d / "server.pem", server_key=d / "server.key")
        cert, key = pki.issue_client_certificate(certs, "site-8", tmp_path / "certs")
        browser.get(url + "/ui/upstream")
        Select(by_id(browser, "up-how")).select_by_value("dps-x509")
        assert not by_id(browser, "up-group-key").is_displayed()
        fill(browser, {"up-scope": scope, "up-dps-host": PARENT, "up-dps-port": port,
                       "up-regid": "", "up-cert": str(cert), "up-key": str(key),
                       "up-host": PARENT, "up-port": port, "up-ca": parent.ca_file})
        by_id(browser, "up-save").click()
        until(lambda: "registered" in status(browser), 90, "registered by certificate")
        assert "site-8 at parent.local" in status(browser)
        until(lambda: "site-8" in by_id(browser, "up-target").text, 30, "new target")
        until(lambda: by_id(browser, "up-state").text == "connected", 60, "connected by cert")
        shown = json.loads(child.cli("upstream", "show").stdout)
        assert shown["auth"] == "x509" and shown["device_id"] == "site-8"
        cam = json.loads(parent.cli("device", "show", "site-8").stdout)
        assert cam["authentication"]["type"] == "certificateAuthority"
        # Removing the link: confirmed, then nothing is set.
        by_id(browser, "up-clear").click()
        browser.switch_to.alert.accept()
        until(lambda: by_id(browser, "up-target").text == "not set", 30, "removed")
        until(lambda: by_id(browser, "up-state").text == "not set", 30, "state not set")
        assert json.loads(child.cli("upstream", "show").stdout) is None
        assert console_errors(browser) == []
        assert "PUT /upstream" in child.log_text() and "DELETE /upstream" in child.log_text()
    finally:
        stop.set()
        child.stop()
        parent.stop()
