"""Every screen of the web page in Chromium: it loads with no console error, its live parts
fill in, and it is photographed at desktop and phone sizes. Devices: create one, copy its
connection string (the clipboard holds it, and a device connects with it), its QR code, edit
its twin, send it a C2D message."""

from __future__ import annotations

import json
import ssl
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from selenium.webdriver.support.ui import Select

from tests.hubproc import HubProcess
from tests.ui.conftest import ADDRESS, base_url, start_hub
from tests.ui.ui import by_id, console_errors, login, shots, until

SCREENS = {"/": "uptime", "/ui/devices": "devices", "/ui/sensors": "buses",
           "/ui/routes": "endpoints", "/ui/upstream": "up-state", "/ui/logs": "logs",
           "/ui/system": "sys-disk"}


def test_every_screen_loads_clean(tmp_path: Path, browser: Any, artifacts: Path) -> None:
    hub = start_hub(tmp_path, '[modules.modbus]\nbridge = "modbus"\n')
    try:
        url = base_url(hub)
        login(browser, url)
        until(lambda: by_id(browser, "uptime").text not in ("", "…"), what="overview")
        for path, marker in SCREENS.items():
            browser.get(url + path)
            by_id(browser, marker)
            if path == "/":
                until(lambda: by_id(browser, "rate").text not in ("", "…"), what="rate")
                until(lambda: "checking" not in by_id(browser, "alerts").text, 60, "alerts")
                # gateway doctor's clock (time sync) and disk findings have cards of their own
                assert "free of" in by_id(browser, "disk").text
                assert any(w in by_id(browser, "clock").text for w in (
                    "synchronized", "cannot tell", "cannot be right")), by_id(browser, "clock").text
            if path == "/ui/system":
                until(lambda: by_id(browser, "sys-disk").text != "…", what="system info")
            if path == "/ui/logs":
                until(lambda: browser.find_elements("css selector", "#logs tbody tr"),
                      what="log lines")
            if path == "/ui/upstream":
                until(lambda: by_id(browser, "up-state").text == "not set", what="upstream")
            unlabelled = browser.execute_script(
                "return [...document.querySelectorAll('input:not([type=hidden]), select, "
                "textarea')].filter((e) => !e.getAttribute('aria-label') && !(e.id && "
                "document.querySelector('label[for=\"' + e.id + '\"]'))).map((e) => "
                "e.outerHTML)")
            assert unlabelled == [], f"{path}: fields without a label: {unlabelled}"
            name = path.strip("/").replace("ui/", "") or "overview"
            shots(browser, artifacts, name)
            assert console_errors(browser) == [], path
            # Phone width: nothing wider than the screen but the scrollable tables.
            browser.set_window_size(390, 844)
            wide = browser.execute_script(
                "return document.documentElement.scrollWidth > window.innerWidth + 1")
            assert not wide, f"{path} scrolls sideways at 390 px"
            browser.set_window_size(1280, 800)
        # Keyboard: the navigation is reachable with Tab and works with Enter.
        browser.get(url + "/")
        from selenium.webdriver.common.keys import Keys

        body = browser.find_element("css selector", "body")
        body.send_keys(Keys.TAB)
        body.send_keys(Keys.TAB)
        active = browser.switch_to.active_element
        assert active.text == "Devices"
        active.send_keys(Keys.ENTER)
        until(lambda: browser.current_url.endswith("/ui/devices"), what="keyboard navigation")
    finally:
        hub.stop()


def _connects(hub: HubProcess, connection_string: str) -> bool:
    """A device connects with the connection string (SAS from its key)."""
    from gateway.hub.connstr import parse_connection_string
    from gateway.hub.sas import generate_sas_token

    cs = parse_connection_string(connection_string)
    assert cs.device_id is not None and cs.shared_access_key is not None
    token = generate_sas_token(f"{cs.host_name}/devices/{cs.device_id}", cs.shared_access_key,
                               int(time.time()) + 600)
    result: dict[str, int] = {}
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=cs.device_id,
                         protocol=mqtt.MQTTv311)
    client.username_pw_set(f"{cs.host_name}/{cs.device_id}/?api-version=2021-04-12", token)
    ctx = ssl.create_default_context(cafile=hub.ca_file)
    ctx.check_hostname = False
    client.tls_set_context(ctx)
    client.on_connect = lambda c, u, f, rc, p=None: result.setdefault("rc", int(rc.value))
    client.connect(ADDRESS, hub.info["mqtt_tls_port"])
    client.loop_start()
    try:
        until(lambda: "rc" in result, what="CONNACK")
    finally:
        client.loop_stop()
        client.disconnect()
    return result["rc"] == 0


def test_create_device_copy_connection_string(tmp_path: Path, browser: Any,
                                              artifacts: Path) -> None:
    hub = start_hub(tmp_path)
    try:
        url = base_url(hub)
        login(browser, url)
        until(lambda: by_id(browser, "uptime").text not in ("", "…"), what="overview")
        browser.execute_cdp_cmd("Browser.grantPermissions", {
            "origin": url, "permissions": ["clipboardReadWrite", "clipboardSanitizedWrite"]})
        browser.get(url + "/ui/devices")
        by_id(browser, "new-device-id").send_keys("pump-7")
        by_id(browser, "new-device-id").submit()
        qr = until(lambda: browser.find_elements("css selector", "#qr svg"), what="QR code")
        assert qr[0].is_displayed()
        cs = by_id(browser, "connstr").get_attribute("value")
        assert cs.startswith("HostName=testhub.local;DeviceId=pump-7;SharedAccessKey=")
        by_id(browser, "copy-connstr").click()
        until(lambda: "copied" in by_id(browser, "status").text, what="copied")
        pasted = browser.execute_async_script(
            "const done = arguments[0]; navigator.clipboard.readText().then(done, "
            "(e) => done('error: ' + e));")
        assert pasted == cs
        shots(browser, artifacts, "device-created")
        assert _connects(hub, pasted)
        # the device list shows it, connected state updated live
        row = until(lambda: browser.find_elements("css selector", 'tr[data-device="pump-7"]'),
                    what="device row")
        assert "pump-7" in row[0].text
        # Its twin: edit the desired properties; send a C2D message.
        browser.get(url + "/ui/devices/pump-7")
        desired = until(lambda: by_id(browser, "twin-desired") if by_id(
            browser, "twin-desired").get_attribute("value") else None, what="twin")
        desired.clear()
        desired.send_keys('{"interval": 30}')
        by_id(browser, "twin-save").click()
        until(lambda: "saved" in by_id(browser, "status").text, what="twin saved")
        twin = hub.cli("twin", "show", "pump-7")
        assert json.loads(twin.stdout)["properties"]["desired"]["interval"] == 30
        by_id(browser, "c2d-body").send_keys("open valve")
        by_id(browser, "c2d").submit()
        until(lambda: "queued" in by_id(browser, "c2d-result").text, what="C2D queued")
        by_id(browser, "method-name").send_keys("reboot")
        by_id(browser, "method").submit()
        result = until(lambda: by_id(browser, "method-result").text not in ("", "invoking…")
                       and by_id(browser, "method-result").text, 60, "method answer")
        assert "404" in result  # nobody is connected to answer: the hub's own error shows
        shots(browser, artifacts, "device")
        browser.get_log("browser")  # the method's 404 above was expected
        assert "ui action user=admin" in hub.log_text()
        assert "POST /devices/pump-7/messages/deviceBound" in hub.log_text()
        # A device made by mistake goes again (confirmed), and the list no longer has it.
        by_id(browser, "device-delete").click()
        browser.switch_to.alert.accept()
        until(lambda: browser.current_url.endswith("/ui/devices"), 30, "back to the list")
        assert hub.cli("device", "show", "pump-7", check=False).returncode != 0
        assert console_errors(browser) == []
    finally:
        hub.stop()


def test_logs_live_tail_filtered(tmp_path: Path, browser: Any, artifacts: Path) -> None:
    hub = start_hub(tmp_path)
    try:
        url = base_url(hub)
        login(browser, url)
        until(lambda: by_id(browser, "uptime").text not in ("", "…"), what="overview")
        dev = json.loads(hub.cli("device", "create", "tank-3").stdout)
        browser.get(url + "/ui/logs")
        by_id(browser, "log-device").send_keys("tank-3")
        by_id(browser, "log-filter").submit()
        time.sleep(1)
        assert not browser.find_elements("css selector", "#logs tbody tr")
        key = dev["authentication"]["symmetricKey"]["primaryKey"]
        assert _connects(hub, f"HostName=testhub.local;DeviceId=tank-3;SharedAccessKey={key}")
        lines = until(lambda: [r.text for r in browser.find_elements(
            "css selector", "#logs tbody tr")], what="the device's log lines, live")
        assert all("tank-3" in line for line in lines) and any("connected" in x for x in lines)
        # WARNING and up: a failed login from elsewhere shows up live, INFO lines do not.
        by_id(browser, "log-device").clear()
        Select(by_id(browser, "log-level")).select_by_visible_text("WARNING")
        by_id(browser, "log-filter").submit()
        from tests.ui.test_login import _http

        _http(url + "/ui/login", method="POST", data=b"password=nope",
              headers={"Content-Type": "application/x-www-form-urlencoded"})
        lines = until(lambda: [r.text for r in browser.find_elements(
            "css selector", "#logs tbody tr")], what="the warning, live")
        assert any("ui login failed" in x for x in lines)
        assert all(" INFO " not in f" {x} " for x in lines)
        shots(browser, artifacts, "logs-filtered")
        assert console_errors(browser) == []
    finally:
        hub.stop()


def test_route_condition_editor_and_create(tmp_path: Path, browser: Any, artifacts: Path) -> None:
    hub = start_hub(tmp_path)
    try:
        url = base_url(hub)
        login(browser, url)
        until(lambda: by_id(browser, "uptime").text not in ("", "…"), what="overview")
        browser.get(url + "/ui/routes")
        until(lambda: browser.find_elements("css selector", "#endpoints tbody tr"),
              what="endpoints")
        by_id(browser, "route-name").send_keys("hot")
        cond = by_id(browser, "route-condition")
        cond.clear()
        cond.send_keys("$body.temperature > 50")
        by_id(browser, "route-test").click()
        result = until(lambda: by_id(browser, "route-test-result").text, what="test result")
        assert result.startswith("does not match") and "temperature" in result, result
        sample = by_id(browser, "route-sample")
        sample.clear()
        sample.send_keys('{"temperature": 71}')
        by_id(browser, "route-test").click()
        until(lambda: by_id(browser, "route-test-result").text.startswith("matches"),
              what="match")
        shots(browser, artifacts, "routes-test")
        by_id(browser, "route-form").submit()
        until(lambda: "created" in by_id(browser, "status").text, what="created")
        rows = until(lambda: [r.text for r in browser.find_elements("css selector",
                                                                    "#routes tbody tr")], what="row")
        assert "hot" in rows[0] and "$body.temperature > 50" in rows[0]
        assert json.loads(hub.cli("route", "show", "hot").stdout)["condition"] == \
            "$body.temperature > 50"
        assert console_errors(browser) == []
    finally:
        hub.stop()


def test_system_support_bundle_and_restart(tmp_path: Path, browser: Any) -> None:
    import io
    import socket
    import tarfile

    with socket.socket() as s:
        s.bind((ADDRESS, 0))
        port = s.getsockname()[1]
    hub = start_hub(tmp_path, '[modules.serial]\nbridge = "serial"\n', api_port=port)
    try:
        url = base_url(hub)
        login(browser, url)
        until(lambda: by_id(browser, "uptime").text not in ("", "…"), what="overview")
        browser.get(url + "/ui/system")
        until(lambda: by_id(browser, "sys-disk").text != "…", what="system info")
        assert by_id(browser, "sys-version").text and "free of" in by_id(browser, "sys-disk").text
        from tests.ui.test_login import _http

        jar = "gw_session=" + browser.get_cookie("gw_session")["value"]
        status, _, _ = _http(url + "/ui/bundle")
        assert status == 401  # not without the session
        import ssl
        import urllib.request

        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        with urllib.request.urlopen(urllib.request.Request(
                url + "/ui/bundle", headers={"Cookie": jar}), context=ctx, timeout=60) as r:
            assert "attachment" in r.headers["Content-Disposition"]
            raw = r.read()
        names = tarfile.open(fileobj=io.BytesIO(raw)).getnames()
        assert names and not any("admin.json" in n or n.endswith(".key") for n in names), names
        pid = hub.pid
        by_id(browser, "restart").click()
        browser.switch_to.alert.accept()
        until(lambda: "restarting" in by_id(browser, "status").text, what="restarting")
        until(lambda: hub.log_text().count("hub ready") == 2, 60, "the hub back")
        assert hub.log_text().count("hub stopped") == 1 and hub.pid == pid
        assert "ui action user=admin address=" in hub.log_text() and "action=restart" in \
            hub.log_text()
        browser.get(url + "/")  # sessions lived in the old run: log in again
        until(lambda: "/ui/login" in browser.current_url, what="login again")
        login(browser, url)
        until(lambda: by_id(browser, "uptime").text not in ("", "…"), what="overview again")
        assert console_errors(browser) == []
    finally:
        hub.stop()
