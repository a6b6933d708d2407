"""The web page's login and its guards, in a real Chromium against a real hub."""

from __future__ import annotations

import json
import ssl
import stat
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tests.ui.conftest import base_url, set_password, start_hub
from tests.ui.ui import by_id, console_errors, login, shots, until


def _http(url: str, *, method: str = "GET", data: bytes | None = None,
          headers: dict[str, str] | None = None) -> tuple[int, str, Any]:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *a: Any, **k: Any) -> None:
            return None

    opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=ctx), NoRedirect)
    try:
        with opener.open(request, timeout=30) as r:
            return r.status, r.read().decode(), r.headers
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(), e.headers


def test_set_password_file(tmp_path: Path) -> None:
    data = tmp_path / "d"
    assert set_password(data, "short").returncode != 0  # too short: refused, nothing written
    assert not (data / "admin.json").exists()
    result = set_password(data, "a long enough password")
    assert result.returncode == 0, result.stderr
    doc = json.loads((data / "admin.json").read_text())
    assert doc["scheme"] == "scrypt" and doc["password_hash"].startswith("$scrypt$ln=15,r=8,p=1$")
    assert "long enough" not in (data / "admin.json").read_text()
    assert stat.S_IMODE((data / "admin.json").stat().st_mode) == 0o600


def test_no_password_locks_the_page(tmp_path: Path) -> None:
    hub = start_hub(tmp_path, password=None)
    try:
        url = base_url(hub)
        status, text, _ = _http(url + "/")
        assert status == 503 and "gateway admin set-password" in text
        status, _, _ = _http(url + "/ui/login", method="POST", data=b"password=admin",
                             headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert status == 503
        status, _, _ = _http(url + "/ui/api/devices")
        assert status == 401
    finally:
        hub.stop()


def test_login_wrong_password_session_and_csrf(tmp_path: Path, browser: Any,
                                               artifacts: Path) -> None:
    hub = start_hub(tmp_path)
    try:
        url = base_url(hub)
        browser.get(url + "/")  # not logged in: to the login page
        until(lambda: "/ui/login" in browser.current_url, what="redirect to login")
        shots(browser, artifacts, "login")
        login(browser, url, "not the password")
        error = until(lambda: by_id(browser, "login-error"), what="refusal")
        assert "Wrong password" in error.text
        browser.get_log("browser")  # that 401 was expected: the console starts clean here
        login(browser, url)
        until(lambda: by_id(browser, "uptime").text not in ("", "…"), what="overview live")
        cookie = browser.get_cookie("gw_session")
        assert cookie["httpOnly"] and cookie["secure"] and cookie["sameSite"] == "Strict"
        assert len(cookie["value"]) >= 40
        # The session reads; a state-changing request without the CSRF token is refused.
        jar = f"gw_session={cookie['value']}"
        status, text, _ = _http(url + "/ui/api/devices", headers={"Cookie": jar})
        assert status == 200 and json.loads(text) == []
        status, _, _ = _http(url + "/ui/api/devices/evil", method="PUT", data=b"{}",
                             headers={"Cookie": jar, "Content-Type": "application/json"})
        assert status == 403
        csrf = browser.find_element("css selector", 'meta[name="csrf"]').get_attribute("content")
        status, _, _ = _http(url + "/ui/api/devices/evil", method="PUT", data=b"{}", headers={
            "Cookie": jar, "Content-Type": "application/json", "X-CSRF-Token": csrf,
            "Origin": "https://attacker.example"})
        assert status == 403  # the right token from another origin: refused too
        status, _, _ = _http(url + "/ui/api/devices/ok1", method="PUT", data=b"{}", headers={
            "Cookie": jar, "Content-Type": "application/json", "X-CSRF-Token": csrf})
        assert status == 200
        assert "ui action user=admin" in hub.log_text() and "PUT /devices/ok1" in hub.log_text()
        status, _, headers = _http(url + "/ui/login")
        assert "frame-ancestors 'none'" in headers["Content-Security-Policy"]
        assert console_errors(browser) == []
        # Logging out ends the session on the server.
        by_id(browser, "main")
        browser.find_element("css selector", ".logout button").click()
        until(lambda: "/ui/login" in browser.current_url, what="logged out")
        status, _, _ = _http(url + "/ui/api/devices", headers={"Cookie": jar})
        assert status == 401
    finally:
        hub.stop()


def test_login_rate_limited(tmp_path: Path) -> None:
    hub = start_hub(tmp_path)
    try:
        url = base_url(hub) + "/ui/login"
        form = {"Content-Type": "application/x-www-form-urlencoded"}
        codes = [_http(url, method="POST", data=b"password=wrong", headers=form)[0]
                 for _ in range(6)]
        assert codes[:5] == [401] * 5 and codes[5] == 429
        status, text, _ = _http(url, method="POST", data=b"password=correct+horse+battery",
                                headers=form)
        assert status == 429 and "Too many failed logins" in text  # even the right one waits
        assert "ui login refused" in hub.log_text()
    finally:
        hub.stop()


def _login(url: str, password: str) -> str:
    """A second session, as another browser would open it: its cookie."""
    status, _, headers = _http(url + "/ui/login", method="POST",
                               data=f"password={password.replace(' ', '+')}".encode(),
                               headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 303, status
    return str(headers["Set-Cookie"]).split(";")[0]


def test_password_change_logs_out_everywhere(tmp_path: Path, browser: Any,
                                             artifacts: Path) -> None:
    from tests.ui.conftest import PASSWORD

    hub = start_hub(tmp_path)
    try:
        url = base_url(hub)
        other = _login(url, PASSWORD)  # e.g. a laptop left logged in
        login(browser, url)
        until(lambda: by_id(browser, "uptime").text not in ("", "…"), what="overview live")
        browser.get(url + "/ui/system")
        rows = until(lambda: browser.find_elements("css selector", "#sessions tbody tr"), 30,
                     "session list")
        assert len(rows) == 2 and sum("(this one)" in r.text for r in rows) == 1
        assert all("127.0.0.1" in r.text or "127.0.25." in r.text for r in rows)  # from
        shots(browser, artifacts, "system-sessions")
        # A wrong current password changes nothing.
        by_id(browser, "pw-current").send_keys("not it at all")
        by_id(browser, "pw-new").send_keys("a new long password")
        by_id(browser, "pw-again").send_keys("a new long password")
        by_id(browser, "pw-save").click()
        until(lambda: "current password is wrong" in by_id(browser, "status").text, 30,
              "refused")
        browser.get_log("browser")  # that 403 was expected
        assert _http(url + "/ui/api/devices", headers={"Cookie": other})[0] == 200
        for id_, text in (("pw-current", PASSWORD), ("pw-new", "a new long password"),
                          ("pw-again", "a new long password")):
            by_id(browser, id_).clear()
            by_id(browser, id_).send_keys(text)
        by_id(browser, "pw-save").click()
        until(lambda: "password changed; 1 other session(s) logged out"
              in by_id(browser, "status").text, 60, "changed")
        assert _http(url + "/ui/api/devices", headers={"Cookie": other})[0] == 401
        assert len(browser.find_elements("css selector", "#sessions tbody tr")) == 1
        browser.get(url + "/ui/system")  # this session goes on
        until(lambda: by_id(browser, "sys-version").text not in ("", "…"), what="still in")
        assert "password change (ended 1 other sessions)" in hub.log_text()
        assert console_errors(browser) == []
        # The old password no longer logs in; the new one does. "Log out everywhere else".
        status, _, _ = _http(url + "/ui/login", method="POST",
                             data=f"password={PASSWORD.replace(' ', '+')}".encode(),
                             headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert status == 401
        third = _login(url, "a new long password")
        browser.get(url + "/ui/system")
        until(lambda: len(browser.find_elements("css selector", "#sessions tbody tr")) == 2,
              30, "two sessions")
        by_id(browser, "end-others").click()
        until(lambda: "1 other session(s) logged out" in by_id(browser, "status").text, 30,
              "ended")
        assert _http(url + "/ui/api/devices", headers={"Cookie": third})[0] == 401
        # Set on the gateway's console: every session ends, this browser's too.
        assert set_password(hub.data_dir, "yet another password").returncode == 0
        browser.get(url + "/ui/system")
        until(lambda: "/ui/login" in browser.current_url, 30, "logged out by set-password")
    finally:
        hub.stop()
