"""Server-rendered HTML of the UI's screens (pure: strings in, strings out).

Every page is one document with the navigation, a ``<main>`` per screen and the script
``/ui/static/ui.js``, which fills the live parts (the content security policy allows no inline
script or style: data goes in ``data-`` attributes).
"""

from __future__ import annotations

import re
from html import escape
from pathlib import Path
from typing import Any

SCREENS = ("overview", "devices", "sensors", "routes", "upstream", "logs", "system")
TITLES = {"overview": "Overview", "devices": "Devices", "sensors": "Sensors",
          "routes": "Routes", "upstream": "Upstream", "logs": "Logs", "system": "System",
          "device": "Device"}


def _doc(title: str, body: str, *, csrf: str = "", attrs: str = "") -> str:
    return (
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<meta name=\"csrf\" content=\"{escape(csrf)}\">"
        f"<title>{escape(title)} - gateway</title>"
        "<link rel=\"stylesheet\" href=\"/ui/static/ui.css\">"
        "<link rel=\"icon\" href=\"data:,\">"
        f"</head><body{attrs}>{body}"
        "<script src=\"/ui/static/ui.js\"></script></body></html>")


def no_admin(data_dir: Path) -> str:
    return _doc("Set the admin password", (
        "<main class=\"narrow\"><h1>No admin password is set</h1>"
        "<p>This gateway has no admin password yet, so the web page is locked. On the gateway, "
        "run:</p>"
        f"<pre>gateway admin set-password --data-dir {escape(str(data_dir))}</pre>"
        "<p>(or put <code>[admin] password_hash</code> in the setup file before first boot), "
        "then reload this page.</p></main>"))


def login(*, error: str = "") -> str:
    alert = f"<p class=\"error\" role=\"alert\" id=\"login-error\">{escape(error)}</p>" if error else ""
    return _doc("Log in", (
        "<main class=\"narrow\"><h1>Gateway</h1>"
        f"{alert}"
        "<form method=\"post\" action=\"/ui/login\" class=\"stack\">"
        "<label for=\"user\">User</label>"
        "<input id=\"user\" name=\"user\" value=\"admin\" readonly autocomplete=\"username\">"
        "<label for=\"password\">Password</label>"
        "<input id=\"password\" name=\"password\" type=\"password\" required autofocus "
        "autocomplete=\"current-password\">"
        "<button type=\"submit\" id=\"login\">Log in</button></form></main>"))


def _nav(current: str, csrf: str) -> str:
    here = " aria-current=\"page\""
    links = "".join(
        f"<a href=\"{'/' if s == 'overview' else '/ui/' + s}\""
        f"{here if s == current else ''}>{TITLES[s]}</a>"
        for s in SCREENS)
    return (
        "<header><nav aria-label=\"Screens\">" + links + "</nav>"
        "<form method=\"post\" action=\"/ui/logout\" class=\"logout\">"
        f"<input type=\"hidden\" name=\"csrf\" value=\"{escape(csrf)}\">"
        "<button type=\"submit\">Log out</button></form></header>")


def screen(name: str, ctx: dict[str, Any]) -> str:
    body = _BODIES[name](ctx)
    attrs = (f" data-screen=\"{escape(name)}\" data-gateway=\"{escape(ctx['gateway'])}\""
             f" data-host=\"{escape(ctx['host'])}\"")
    if "device" in ctx:
        attrs += f" data-device=\"{escape(ctx['device'])}\""
    for module, bridge in sorted(ctx.get("modules", {}).items()):
        attrs += f" data-module-{escape(bridge)}=\"{escape(module)}\""
    nav_name = "devices" if name == "device" else name
    return _doc(TITLES[name], _nav(nav_name, ctx["csrf"]) +
                f"<main id=\"main\"><h1>{escape(TITLES[name])}</h1>{body}"
                "<p id=\"status\" role=\"status\" aria-live=\"polite\"></p></main>",
                csrf=ctx["csrf"], attrs=attrs)


def _field(id_: str, label: str, *, value: str = "", kind: str = "text", extra: str = "") -> str:
    return (f"<label for=\"{id_}\">{escape(label)}</label>"
            f"<input id=\"{id_}\" type=\"{kind}\" value=\"{escape(value)}\"{extra}>")


def _overview(ctx: dict[str, Any]) -> str:
    cards = [("health", "Health"), ("uptime", "Uptime"), ("connections", "Connections"),
             ("rate", "Messages/s"), ("store", "Store use"), ("upstream-state", "Upstream link"),
             ("backlog", "Upstream backlog"), ("oldest", "Oldest unsent message"),
             ("drain", "Time to drain"), ("clock", "Clock"), ("disk", "Disk")]
    dl = "".join(f"<div class=\"card\"><dt>{t}</dt><dd id=\"{i}\">…</dd></div>" for i, t in cards)
    return (f"<dl class=\"cards\">{dl}</dl>"
            "<h2>Messages per second</h2>"
            "<svg id=\"chart\" viewBox=\"0 0 300 80\" role=\"img\" aria-label=\"messages per "
            "second, last 5 minutes\" preserveAspectRatio=\"none\"><polyline id=\"chart-line\" "
            "points=\"\"/></svg>"
            "<h2>Alerts</h2><ul id=\"alerts\"><li>checking…</li></ul>"
            "<div class=\"row\"><button type=\"button\" id=\"alerts-refresh\">Check again"
            "</button><a href=\"/ui/bundle\" id=\"overview-bundle\" download>Download a support "
            "bundle</a></div>")


def _devices(ctx: dict[str, Any]) -> str:
    return (
        "<section><h2>Add a device</h2><form id=\"new-device\" class=\"row\">"
        + _field("new-device-id", "Device id", extra=" required pattern=\"[A-Za-z0-9\\-.:_%*#$!+=@]{1,128}\"")
        + "<button type=\"submit\">Create</button></form>"
        "<div id=\"created\" hidden><p>Connection string of <strong id=\"created-id\"></strong>:</p>"
        "<label for=\"connstr\">Connection string</label>"
        "<textarea id=\"connstr\" readonly rows=\"3\"></textarea>"
        "<button type=\"button\" id=\"copy-connstr\">Copy</button>"
        "<div id=\"qr\" aria-label=\"QR code of the connection string\" role=\"img\"></div></div>"
        "</section><section><h2>Devices</h2><div class=\"scroll\"><table id=\"devices\">"
        "<thead><tr><th scope=\"col\">Device</th><th scope=\"col\">State</th>"
        "<th scope=\"col\">Last message</th><th scope=\"col\">Status</th></tr></thead>"
        "<tbody></tbody></table></div></section>")


def _device(ctx: dict[str, Any]) -> str:
    return (
        "<p><a href=\"/ui/devices\">All devices</a> · <span id=\"device-state\"></span></p>"
        "<section><h2>Twin</h2><label for=\"twin-desired\">Desired properties (JSON)</label>"
        "<textarea id=\"twin-desired\" rows=\"8\" spellcheck=\"false\"></textarea>"
        "<button type=\"button\" id=\"twin-save\">Save desired</button>"
        "<h3>Reported</h3><pre id=\"twin-reported\"></pre></section>"
        "<section><h2>Direct method</h2><form id=\"method\" class=\"stack\">"
        + _field("method-name", "Method name", extra=" required")
        + "<label for=\"method-payload\">Payload (JSON)</label>"
        "<textarea id=\"method-payload\" rows=\"3\">{}</textarea>"
        "<button type=\"submit\">Invoke</button></form><pre id=\"method-result\"></pre></section>"
        "<section><h2>Cloud-to-device message</h2><form id=\"c2d\" class=\"stack\">"
        "<label for=\"c2d-body\">Message</label><textarea id=\"c2d-body\" rows=\"2\"></textarea>"
        "<button type=\"submit\">Send</button></form><p id=\"c2d-result\"></p></section>"
        "<section><h2>Remove</h2><button type=\"button\" id=\"device-delete\">Delete this "
        "device</button></section>")


def _sensors(ctx: dict[str, Any]) -> str:
    return (
        "<section id=\"modbus\"><h2>Modbus</h2>"
        "<div class=\"scroll\"><table id=\"buses\"><thead><tr><th scope=\"col\">Bus</th>"
        "<th scope=\"col\">Link</th><th scope=\"col\">State</th><th scope=\"col\">Remove"
        "</th></tr></thead><tbody></tbody>"
        "</table></div><button type=\"button\" id=\"new-bus\">New bus</button>"
        "<form id=\"bus-form\" class=\"stack\" hidden><h3>New bus</h3>"
        + _field("bus-name", "Bus name", value="bus1", extra=" required")
        + "<label for=\"bus-kind\">Connection</label><select id=\"bus-kind\">"
        "<option value=\"tcp\">Modbus TCP (network address)</option>"
        "<option value=\"serial\">Serial port (RS-485 / RTU)</option></select>"
        "<div id=\"bus-tcp\" class=\"stack\">"
        + _field("bus-host", "Address: host or IP, with :port if not 502 (e.g. 10.0.0.5:5020)",
                 extra=" autocomplete=\"off\" spellcheck=\"false\"")
        + "</div><div id=\"bus-serial\" class=\"stack\" hidden>"
        "<label for=\"bus-device\">Serial port</label><select id=\"bus-device\"></select>"
        + _field("bus-path", "or a device path (e.g. /dev/ttyAMA0)",
                 extra=" autocomplete=\"off\" spellcheck=\"false\"")
        + _field("bus-baud", "Baud rate", value="9600", kind="number")
        + "<label for=\"bus-parity\">Parity</label><select id=\"bus-parity\">"
        "<option value=\"N\">none</option><option value=\"E\">even</option>"
        "<option value=\"O\">odd</option></select></div>"
        "<button type=\"submit\">Add bus</button></form>"
        "<div id=\"scan-box\" hidden><h3>Find units on <span id=\"scan-bus\"></span></h3>"
        "<form id=\"scan-form\" class=\"row\">"
        + _field("scan-units", "Unit ids", value="1-10")
        + "<label for=\"scan-table\">Table</label><select id=\"scan-table\">"
        "<option value=\"holding\">holding</option><option value=\"input\">input</option></select>"
        "<fieldset id=\"scan-serial\" hidden><legend>Serial settings to try (a unit of "
        "unknown settings: each one is scanned)</legend><div class=\"row\">"
        + "".join(f"<label for=\"scan-baud-{b}\"><input type=\"checkbox\" id=\"scan-baud-{b}\" "
                  f"class=\"scan-baud\" value=\"{b}\"> {b}</label>" for b in BAUDS)
        + "</div><div class=\"row\">"
        + "".join(f"<label for=\"scan-parity-{p}\"><input type=\"checkbox\" "
                  f"id=\"scan-parity-{p}\" class=\"scan-parity\" value=\"{p}\"> {name}</label>"
                  for p, name in PARITIES)
        + "</div></fieldset>"
        "<button type=\"submit\" id=\"scan-start\">Scan</button></form>"
        "<progress id=\"scan-progress\" max=\"100\" value=\"0\" hidden></progress>"
        "<p id=\"scan-text\" aria-live=\"polite\"></p><ul id=\"units\" class=\"choices\"></ul></div>"
        "<div id=\"unit-box\" hidden><h3>Unit <span id=\"unit-id\"></span></h3>"
        "<form id=\"probe-form\" class=\"row\">"
        + _field("probe-address", "Address", value="0", kind="number")
        + _field("probe-count", "Registers", value="4", kind="number")
        + "<label for=\"probe-table\">Table</label><select id=\"probe-table\">"
        "<option value=\"input\">input</option><option value=\"holding\">holding</option></select>"
        "<button type=\"submit\">Probe</button></form>"
        "<div class=\"scroll\"><table id=\"probe\"></table></div>"
        "<h3>Register map</h3><label for=\"profile\">Profile from the library</label>"
        "<select id=\"profile\"><option value=\"\">(build a map below)</option></select>"
        "<p id=\"profile-registers\"></p>"
        "<div id=\"map-box\"><div class=\"scroll\"><table id=\"map\"><thead><tr>"
        "<th scope=\"col\">Name</th><th scope=\"col\">Table</th><th scope=\"col\">Address</th>"
        "<th scope=\"col\">Type</th><th scope=\"col\">Scale</th><th scope=\"col\">Unit</th>"
        "<th scope=\"col\">Test read</th></tr></thead><tbody></tbody></table></div>"
        "<button type=\"button\" id=\"add-row\">Add a register</button></div>"
        "<form id=\"save-form\" class=\"row\">"
        + _field("device-name", "Sensor name", value="meter1", extra=" required")
        + _field("device-interval", "Interval (s)", value="5", kind="number")
        + "<button type=\"submit\">Save</button></form></div></section>"
        "<section id=\"live-box\" hidden><h2>Live values</h2><div class=\"scroll\">"
        "<table id=\"live\"><thead><tr><th scope=\"col\">Sensor</th><th scope=\"col\">Reading"
        "</th><th scope=\"col\">Value</th><th scope=\"col\">Time</th></tr></thead><tbody>"
        "</tbody></table></div></section>"
        "<section id=\"serial\"><h2>Serial</h2><form id=\"serial-form\" class=\"stack\">"
        "<label for=\"serial-port\">Port</label><select id=\"serial-port\"></select>"
        + _field("serial-path", "or a device path", extra=" autocomplete=\"off\"")
        + _field("serial-baud", "Baud rate", value="9600", kind="number")
        + "<label for=\"serial-format\">Format</label><select id=\"serial-format\">"
        "<option value=\"nmea\">NMEA 0183 (GPS)</option><option value=\"jsonl\">JSON lines"
        "</option><option value=\"regex\">text matched by a pattern</option>"
        "<option value=\"delimited\">delimited columns</option></select>"
        + _field("serial-pattern", "Pattern (regex with named groups, e.g. W:(?P<weight>[-0-9.]+))")
        + _field("serial-columns", "Columns (names separated by commas; delimited format)")
        + _field("serial-separator", "Separator (delimited format)", value=";")
        + _field("serial-sensor", "Sensor name", value="serial1", extra=" required")
        + "<button type=\"submit\">Save port</button></form></section>"
        "<section id=\"ble\"><h2>BLE</h2><p>Advertising sensors near the gateway (live):</p>"
        "<div class=\"scroll\"><table id=\"ble-list\"><thead><tr><th scope=\"col\">Address</th>"
        "<th scope=\"col\">Name</th><th scope=\"col\">Signal</th><th scope=\"col\">Values</th>"
        "<th scope=\"col\">Add</th></tr></thead><tbody></tbody></table></div>"
        "<form id=\"ble-form\" class=\"stack\" hidden><h3>Add <span id=\"ble-address\"></span></h3>"
        + _field("ble-name", "Sensor name", extra=" required")
        + _field("ble-bindkey", "Bindkey (encrypted BTHome only, 32 hex digits)",
                 extra=" autocomplete=\"off\" pattern=\"[0-9A-Fa-f]{32}\"")
        + "<button type=\"submit\">Add sensor</button></form></section>")


BAUDS = (1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200)
PARITIES = (("E", "parity even"), ("N", "parity none"), ("O", "parity odd"))


def _routes(ctx: dict[str, Any]) -> str:
    return (
        "<section><h2>Routes</h2><div class=\"scroll\"><table id=\"routes\"><thead><tr>"
        "<th scope=\"col\">Name</th><th scope=\"col\">Source</th><th scope=\"col\">Condition</th>"
        "<th scope=\"col\">Endpoints</th><th scope=\"col\">Enabled</th></tr></thead><tbody>"
        "</tbody></table></div></section>"
        "<section><h2>New route</h2><form id=\"route-form\" class=\"stack\">"
        + _field("route-name", "Name", extra=" required")
        + "<label for=\"route-source\">Source</label><select id=\"route-source\">"
        "<option>DeviceMessages</option><option>TwinChangeEvents</option>"
        "<option>DeviceConnectionStateEvents</option><option>DeviceLifecycleEvents</option>"
        "</select>"
        + _field("route-condition", "Condition", value="true")
        + "<label for=\"route-endpoint\">Endpoint</label><select id=\"route-endpoint\"></select>"
        "<label for=\"route-sample\">Sample message body (JSON)</label>"
        "<textarea id=\"route-sample\" rows=\"3\">{\"temperature\": 30}</textarea>"
        "<div class=\"row\"><button type=\"button\" id=\"route-test\">Test the condition</button>"
        "<button type=\"submit\">Create route</button></div>"
        "<p id=\"route-test-result\" aria-live=\"polite\"></p></form></section>"
        "<section><h2>Endpoints</h2><div class=\"scroll\"><table id=\"endpoints\"><thead><tr>"
        "<th scope=\"col\">Name</th><th scope=\"col\">Type</th><th scope=\"col\">Health</th>"
        "</tr></thead><tbody></tbody></table></div></section>")


def _upstream(ctx: dict[str, Any]) -> str:
    rows = [("up-state", "State"), ("up-target", "Parent"), ("up-backlog", "Backlog"),
            ("up-oldest", "Oldest unsent message"), ("up-sent", "Sent"),
            ("up-drain", "Time to drain"), ("up-error", "Last error")]
    dl = "".join(f"<div class=\"card\"><dt>{t}</dt><dd id=\"{i}\">…</dd></div>" for i, t in rows)
    return (
        f"<dl class=\"cards\">{dl}</dl>"
        "<section><h2>Set the parent</h2><form id=\"upstream-form\" class=\"stack\">"
        "<label for=\"up-how\">How this gateway joins its parent</label>"
        "<select id=\"up-how\"><option value=\"connstr\">Connection string</option>"
        "<option value=\"dps-key\">Enrollment at a provisioning service (DPS): group key"
        "</option><option value=\"dps-x509\">Enrollment at a provisioning service (DPS): "
        "certificate</option><option value=\"x509\">X.509 certificate (device already "
        "created at the parent)</option></select>"
        "<div id=\"up-g-connstr\" class=\"stack\">"
        "<label for=\"up-connstr\">Connection string (HostName=...;DeviceId=...;"
        "SharedAccessKey=...)</label><textarea id=\"up-connstr\" rows=\"3\" "
        "autocomplete=\"off\" spellcheck=\"false\"></textarea></div>"
        "<div id=\"up-g-dps\" class=\"stack\" hidden>"
        + _field("up-scope", "ID scope", extra=" autocomplete=\"off\" spellcheck=\"false\"")
        + _field("up-dps-host", "Provisioning service address (e.g. "
                 "global.azure-devices-provisioning.net)", extra=" autocomplete=\"off\"")
        + _field("up-dps-port", "Provisioning service port (optional, 8883)", kind="number")
        + _field("up-regid", "Registration id (a certificate's common name if empty)",
                 value=_registration_id(ctx), extra=" autocomplete=\"off\"")
        + "</div><div id=\"up-g-groupkey\" class=\"stack\" hidden>"
        + _field("up-group-key", "Enrollment group key (base64)", kind="password",
                 extra=" autocomplete=\"off\"")
        + "</div><div id=\"up-g-hub\" class=\"stack\" hidden>"
        + _field("up-hub", "Parent's host name (HostName)", extra=" autocomplete=\"off\"")
        + _field("up-device", "Our device id at the parent", extra=" autocomplete=\"off\"")
        + "</div><div id=\"up-g-cert\" class=\"stack\" hidden>"
        + _field("up-cert", "Certificate file on the gateway (PEM)", extra=" autocomplete=\"off\"")
        + _field("up-key", "Its private key file on the gateway (PEM)",
                 extra=" autocomplete=\"off\"")
        + "</div>"
        + _field("up-host", "Address to dial (optional)")
        + _field("up-port", "Port (optional, 8883)", kind="number")
        + _field("up-ca", "CA file on the gateway (optional)")
        + "<div class=\"row\"><button type=\"submit\" id=\"up-save\">Save</button>"
        "<button type=\"button\" id=\"up-clear\">Remove the upstream link</button></div>"
        "</form></section>"
        "<section><h2>Test the link</h2><button type=\"button\" id=\"up-test\">Test step by step"
        "</button><ol id=\"up-steps\"></ol></section>")


def _registration_id(ctx: dict[str, Any]) -> str:
    """The gateway's own name, when it is a valid registration id (lower case, ref §12.1)."""
    name = str(ctx.get("gateway", "")).lower()
    return name if re.fullmatch(r"[a-z0-9]([a-z0-9:._-]{0,126}[a-z0-9])?", name) else ""


def _logs(ctx: dict[str, Any]) -> str:
    return (
        "<form id=\"log-filter\" class=\"row\"><label for=\"log-level\">Level</label>"
        "<select id=\"log-level\"><option>DEBUG</option><option selected>INFO</option>"
        "<option>WARNING</option><option>ERROR</option></select>"
        + _field("log-device", "Device") + _field("log-module", "Module")
        + "<button type=\"submit\">Apply</button></form>"
        "<div class=\"scroll\"><table id=\"logs\"><thead><tr><th scope=\"col\">Time</th>"
        "<th scope=\"col\">Level</th><th scope=\"col\">Message</th></tr></thead><tbody>"
        "</tbody></table></div>")


def _system(ctx: dict[str, Any]) -> str:
    rows = [("sys-version", "Version"), ("sys-host", "Host name"), ("sys-hub", "Hub name"),
            ("sys-addresses", "Addresses"), ("sys-time", "Time"), ("sys-uptime", "Uptime"),
            ("sys-disk", "Disk")]
    dl = "".join(f"<div class=\"card\"><dt>{t}</dt><dd id=\"{i}\">…</dd></div>" for i, t in rows)
    return (f"<dl class=\"cards\">{dl}</dl>"
            "<p><a href=\"/ui/bundle\" id=\"bundle\" download>Download a support bundle</a></p>"
            "<button type=\"button\" id=\"restart\">Restart the hub</button>"
            "<section><h2>Admin password</h2><form id=\"password-form\" class=\"stack\">"
            + _field("pw-current", "Current password", kind="password",
                     extra=" autocomplete=\"current-password\" required")
            + _field("pw-new", "New password (at least 8 characters)", kind="password",
                     extra=" autocomplete=\"new-password\" required minlength=\"8\"")
            + _field("pw-again", "New password again", kind="password",
                     extra=" autocomplete=\"new-password\" required minlength=\"8\"")
            + "<button type=\"submit\" id=\"pw-save\">Change the password</button>"
            "<p>Changing it logs out every other session.</p></form></section>"
            "<section><h2>Open sessions</h2><div class=\"scroll\"><table id=\"sessions\">"
            "<thead><tr><th scope=\"col\">Session</th><th scope=\"col\">From</th>"
            "<th scope=\"col\">Logged in</th><th scope=\"col\">Last seen</th></tr></thead>"
            "<tbody></tbody></table></div><button type=\"button\" id=\"end-others\">"
            "Log out everywhere else</button></section>")


_BODIES = {"overview": _overview, "devices": _devices, "device": _device, "sensors": _sensors,
           "routes": _routes, "upstream": _upstream, "logs": _logs, "system": _system}
