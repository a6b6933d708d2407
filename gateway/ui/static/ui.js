// The gateway's technician page: forms and live views (no framework, no build step).
// Every hub action goes to /ui/api/<service API path> with the session's CSRF token;
// live values arrive over server-sent events (/ui/stream/...).
"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  const body = document.body;
  const csrf = (document.querySelector('meta[name="csrf"]') || {}).content || "";
  const screen = body.dataset.screen;
  const gw = body.dataset.gateway;

  function say(text, bad) {
    const s = $("status");
    if (!s) return;
    s.textContent = text;
    s.className = bad ? "error" : "";
  }

  async function call(method, path, data, raw) {
    const opts = { method: method, headers: { "X-CSRF-Token": csrf }, credentials: "same-origin" };
    if (data !== undefined) {
      opts.body = raw ? data : JSON.stringify(data);
      if (!raw) opts.headers["Content-Type"] = "application/json";
    }
    const url = path.startsWith("/ui/") ? path : "/ui/api" + path;
    const r = await fetch(url, opts);
    const text = await r.text();
    let out = text;
    try { out = text ? JSON.parse(text) : null; } catch (e) { /* not JSON */ }
    if (!r.ok) {
      const msg = (out && out.Message) || (out && out.message) || (out && out.error) || text || r.statusText;
      throw new Error(r.status + ": " + msg);
    }
    return out;
  }

  function live(what, params, onData) {
    const q = new URLSearchParams(params || {}).toString();
    const es = new EventSource("/ui/stream/" + what + (q ? "?" + q : ""));
    es.onmessage = (ev) => onData(JSON.parse(ev.data));
    es.onerror = () => say("live updates interrupted; reconnecting…", true);
    es.onopen = () => { const s = $("status"); if (s && s.className === "error") say(""); };
    window.addEventListener("beforeunload", () => es.close());
    return es;
  }

  function el(tag, text, attrs) {
    const e = document.createElement(tag);
    if (text !== undefined && text !== null) e.textContent = String(text);
    for (const k in (attrs || {})) e.setAttribute(k, attrs[k]);
    return e;
  }

  function row(cells) {
    const tr = el("tr");
    cells.forEach((c) => { const td = el("td"); if (c instanceof Node) td.appendChild(c); else td.textContent = c === undefined || c === null ? "" : String(c); tr.appendChild(td); });
    return tr;
  }

  function duration(s) {
    if (s === null || s === undefined || !isFinite(s)) return "–";
    s = Math.max(0, Math.round(s));
    if (s < 90) return s + " s";
    if (s < 5400) return Math.round(s / 60) + " min";
    if (s < 172800) return (s / 3600).toFixed(1) + " h";
    return (s / 86400).toFixed(1) + " d";
  }
  function bytes(n) {
    if (!n) return "0 B";
    const u = ["B", "KB", "MB", "GB", "TB"]; let i = 0;
    while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
    return n.toFixed(i ? 1 : 0) + " " + u[i];
  }
  function guard(fn) {
    return async (ev) => {
      if (ev && ev.preventDefault) ev.preventDefault();
      try { await fn(ev); } catch (e) { say(e.message, true); }
    };
  }

  // A drain-time estimate from the backlog and the send rate over the last samples.
  function drainer() {
    const samples = [];
    return (st) => {
      const now = Date.now() / 1000;
      samples.push([now, st.sent || 0, st.backlog || 0]);
      while (samples.length > 30) samples.shift();
      if (!st.backlog) return 0;
      if (samples.length < 2) return null;
      const a = samples[0], b = samples[samples.length - 1];
      const rate = (b[1] - a[1]) / Math.max(b[0] - a[0], 1e-3);
      if (st.state !== "connected" || rate <= 0) return Infinity;
      return st.backlog / rate;
    };
  }
  function upstreamText(st, isSet) {
    if (!st || !isSet) return "not set";
    return st.state + (st.lastError && st.state !== "connected" ? " (" + st.lastError + ")" : "");
  }

  // -- Overview -------------------------------------------------------------------------
  function overview() {
    const points = [];
    let last = null;
    const drain = drainer();
    live("overview", {}, (o) => {
      $("health").textContent = o.rejected ? "store full: messages refused" : "running";
      $("uptime").textContent = duration(o.uptime);
      $("connections").textContent = (o.connections === null ? "?" : o.connections) + " (" + o.connected + " of " + o.devices + " devices)";
      if (last) {
        const rate = Math.max(0, (o.appended - last.appended) / Math.max(o.time - last.time, 1e-3));
        $("rate").textContent = rate.toFixed(1);
        points.push(rate);
        while (points.length > 300) points.shift();
        const max = Math.max(1, ...points);
        $("chart-line").setAttribute("points", points.map((v, i) => (i * 300 / Math.max(points.length - 1, 1)).toFixed(1) + "," + (78 - v * 74 / max).toFixed(1)).join(" "));
      }
      last = o;
      $("store").textContent = o.stored + " messages, " + bytes(o.storeBytes) + " of " + bytes(o.storeMax);
      const up = o.upstream;
      $("upstream-state").textContent = upstreamText(up, o.upstreamSet);
      $("backlog").textContent = up ? up.backlog + " messages (" + bytes(up.backlogBytes) + ")" : "–";
      $("oldest").textContent = up ? duration(up.oldestAgeSeconds) : "–";
      $("drain").textContent = up ? (function (t) { return t === Infinity ? "not draining" : duration(t); })(drain(up)) : "–";
    });
    const alerts = guard(async (ev) => {
      const all = await call("GET", "/ui/info/checks" + (ev ? "?refresh=1" : ""));
      // The clock (time sync) and disk cards: what gateway doctor says of them.
      [["clock", "clock"], ["disk", "disk"]].forEach(([id, check]) => {
        const f = all.find((x) => x.check === check);
        const dd = $(id);
        if (!f) { dd.textContent = "–"; return; }
        dd.textContent = (check === "clock" ? f.message.replace(/^[0-9-]+ [0-9:]+ UTC(, |; )?/, "") || f.message : f.message.replace(/ under .*$/, ""));
        dd.className = f.status === "ok" ? "" : f.status === "warn" ? "warn" : "error";
        dd.title = f.hint || "";
      });
      const list = all.filter((x) => x.status === "warn" || x.status === "fail");
      const ul = $("alerts"); ul.textContent = "";
      if (!list.length) ul.appendChild(el("li", "No alerts: every check passed."));
      list.forEach((a) => {
        const li = el("li", "", { class: a.status });
        li.appendChild(el("strong", a.status.toUpperCase() + " " + a.check + ": "));
        li.appendChild(document.createTextNode(a.message + (a.hint ? " — " + a.hint : "")));
        ul.appendChild(li);
      });
    });
    alerts();
    $("alerts-refresh").addEventListener("click", alerts);
  }

  // -- Devices --------------------------------------------------------------------------
  function connectionString(id, key) {
    return "HostName=" + body.dataset.host + ";DeviceId=" + id + ";SharedAccessKey=" + key;
  }
  function devices() {
    const tbody = document.querySelector("#devices tbody");
    live("devices", {}, (rows) => {
      tbody.textContent = "";
      rows.forEach((d) => {
        const a = el("a", d.deviceId, { href: "/ui/devices/" + encodeURIComponent(d.deviceId) });
        const tr = row([a, d.connectionState, d.lastActivityTime && !d.lastActivityTime.startsWith("0001") ? d.lastActivityTime : "never", d.status]);
        tr.dataset.device = d.deviceId;
        tbody.appendChild(tr);
      });
    });
    $("new-device").addEventListener("submit", guard(async () => {
      const id = $("new-device-id").value.trim();
      const d = await call("PUT", "/devices/" + encodeURIComponent(id), { deviceId: id });
      const cs = connectionString(id, d.authentication.symmetricKey.primaryKey);
      $("created-id").textContent = id;
      $("connstr").value = cs;
      $("created").hidden = false;
      $("qr").innerHTML = await call("POST", "/ui/qr", cs, true);
      say("device " + id + " created");
    }));
    $("copy-connstr").addEventListener("click", guard(async () => {
      const t = $("connstr");
      t.focus(); t.select();
      try { await navigator.clipboard.writeText(t.value); } catch (e) { document.execCommand("copy"); }
      say("connection string copied");
    }));
  }

  function device() {
    const id = body.dataset.device;
    const base = "/twins/" + encodeURIComponent(id);
    const load = guard(async () => {
      const t = await call("GET", base);
      const desired = Object.assign({}, t.properties.desired); delete desired.$metadata; delete desired.$version;
      const reported = Object.assign({}, t.properties.reported); delete reported.$metadata;
      $("twin-desired").value = JSON.stringify(desired, null, 2);
      $("twin-reported").textContent = JSON.stringify(reported, null, 2);
      $("device-state").textContent = id + ": " + t.connectionState;
    });
    load();
    $("twin-save").addEventListener("click", guard(async () => {
      let desired;
      try { desired = JSON.parse($("twin-desired").value); } catch (e) { throw new Error("desired properties: not JSON (" + e.message + ")"); }
      await call("PATCH", base, { properties: { desired: desired } });
      say("desired properties saved"); await load();
    }));
    $("method").addEventListener("submit", guard(async () => {
      let payload;
      try { payload = JSON.parse($("method-payload").value || "null"); } catch (e) { throw new Error("payload: not JSON"); }
      $("method-result").textContent = "invoking…";
      try {
        const r = await call("POST", base + "/methods", { methodName: $("method-name").value, payload: payload, responseTimeoutInSeconds: 30, connectTimeoutInSeconds: 5 });
        $("method-result").textContent = JSON.stringify(r, null, 2);
      } catch (e) { $("method-result").textContent = e.message; }
    }));
    $("device-delete").addEventListener("click", guard(async () => {
      if (!window.confirm("Delete device " + id + "? Its identity, keys and twin are gone for good.")) return;
      await call("DELETE", "/devices/" + encodeURIComponent(id));
      window.location.href = "/ui/devices";
    }));
    $("c2d").addEventListener("submit", guard(async () => {
      const r = await call("POST", "/devices/" + encodeURIComponent(id) + "/messages/deviceBound", { body: $("c2d-body").value });
      $("c2d-result").textContent = "queued " + r.messageId + " (" + r.pending + " pending)";
    }));
  }

  // -- Sensors: Modbus ------------------------------------------------------------------
  function sensors() {
    const mod = body.dataset.moduleModbus;
    const modTwin = "/twins/" + encodeURIComponent(gw) + "/modules/" + encodeURIComponent(mod || "modbus");
    const method = (name, payload) => call("POST", modTwin + "/methods", { methodName: name, payload: payload, responseTimeoutInSeconds: 60, connectTimeoutInSeconds: 10 });
    let bus = null, unit = null;
    let profileList = [];

    let busSpecs = {};
    const setting = (b, p) => b + " 8" + p + "1";
    const showBuses = (d) => {
      busSpecs = d.desired || {};
      const status = d.status || {};
      const tbody = document.querySelector("#buses tbody"); tbody.textContent = "";
      Object.keys(busSpecs).forEach((name) => {
        const b = busSpecs[name] || {};
        const link = b.tcp ? "tcp " + b.tcp.host + ":" + (b.tcp.port || 502) : b.serial ? b.serial.port + " " + setting(b.serial.baud || 19200, b.serial.parity || "E") : "?";
        const pick = el("button", name, { type: "button" });
        pick.addEventListener("click", () => openScan(name));
        const st = status[name] || {};
        const drop = el("button", "Remove", { type: "button", "aria-label": "remove bus " + name, class: "bus-remove" });
        drop.addEventListener("click", guard(async () => {
          if (!window.confirm("Remove bus " + name + "? Its sensors stop being polled.")) return;
          const buses = {}; buses[name] = null;  // a merge patch: null deletes
          const devs = {};  // and the sensors on it go with it
          Object.keys(d.devices || {}).forEach((n) => { if ((d.devices[n] || {}).bus === name) devs[n] = null; });
          await call("PATCH", modTwin, { properties: { desired: { buses: buses, devices: devs } } });
          say("bus " + name + " removed");
        }));
        const tr = row([pick, link, (st.state || "") + (st.last_error && st.state !== "up" ? " (" + st.last_error + ")" : ""), drop]);
        tr.dataset.bus = name;
        tbody.appendChild(tr);
      });
    };
    let busesSeen = false;
    const openBusForm = () => { $("bus-form").hidden = false; $("bus-host").focus(); };
    if (!mod) { $("modbus").hidden = true; if (!body.dataset.moduleBle && !body.dataset.moduleSerial) say("no sensor bridge is configured: add [modules.modbus] bridge = \"modbus\" (or serial, ble) to gateway.toml", true); }
    else live("buses", { module: mod }, (d) => {
      // No bus yet: the first thing to do is to add one, so its form is open.
      if (!busesSeen) { busesSeen = true; if (!Object.keys(d.desired || {}).length) openBusForm(); }
      showBuses(d);
    });

    $("new-bus").addEventListener("click", openBusForm);
    $("bus-kind").addEventListener("change", guard(async () => {
      const serial = $("bus-kind").value === "serial";
      $("bus-tcp").hidden = serial; $("bus-serial").hidden = !serial;
      if (serial) {
        const ports = await call("GET", "/ui/info/serial-ports");
        const sel = $("bus-device"); sel.textContent = "";
        if (!ports.length) sel.appendChild(el("option", "(no serial adapter plugged in: give a path)", { value: "" }));
        ports.forEach((p) => sel.appendChild(el("option", p.replace("/dev/serial/by-id/", ""), { value: p })));
      }
    }));
    function hostPort(text) {
      // "host", "host:port", "[v6]:port" or a bare IPv6 address
      let m = text.match(/^\[([^\]]+)\](?::(\d+))?$/);
      if (m) return { host: m[1], port: m[2] ? parseInt(m[2], 10) : 502 };
      m = text.match(/^([^:]+):(\d+)$/);
      if (m) return { host: m[1], port: parseInt(m[2], 10) };
      return { host: text, port: 502 };
    }
    $("bus-form").addEventListener("submit", guard(async () => {
      const name = $("bus-name").value.trim();
      let spec;
      if ($("bus-kind").value === "tcp") {
        const text = $("bus-host").value.trim();
        if (!text) throw new Error("give the host or IP address of the Modbus TCP device");
        const hp = hostPort(text);
        if (!(hp.port > 0 && hp.port < 65536)) throw new Error("the port must be 1..65535");
        spec = { tcp: hp, timeout: 1.0 };
      } else {
        const port = $("bus-path").value.trim() || $("bus-device").value;
        if (!port) throw new Error("choose a serial port or give its path");
        spec = { serial: { port: port, baud: parseInt($("bus-baud").value, 10) || 9600, parity: $("bus-parity").value } };
      }
      const buses = {}; buses[name] = spec;
      await call("PATCH", modTwin, { properties: { desired: { buses: buses } } });
      busSpecs[name] = spec;
      $("bus-form").hidden = true;
      say("bus " + name + " saved; the bridge connects to it now");
      openScan(name);
      // A TCP bus: look for units at once (what a new bus is for). A serial bus: the
      // technician first picks the settings to try (each one is a scan of its own).
      if (spec.tcp) $("scan-form").requestSubmit();
      else $("scan-units").focus();
    }));

    function openScan(name) {
      bus = name;
      $("scan-bus").textContent = name;
      $("scan-box").hidden = false;
      $("units").textContent = "";
      $("scan-text").textContent = "";
      const serial = (busSpecs[name] || {}).serial;
      $("scan-serial").hidden = !serial;
      if (serial) {
        const own = [String(serial.baud || 19200), serial.parity || "E"];
        // the bus's own setting, and the two most common ones of RTU devices
        document.querySelectorAll(".scan-baud").forEach((c) => { c.checked = c.value === own[0] || c.value === "9600" || c.value === "19200"; });
        document.querySelectorAll(".scan-parity").forEach((c) => { c.checked = c.value === own[1] || c.value === "E" || c.value === "N"; });
      }
    }

    function parseUnits(text) {
      const out = [];
      text.split(",").forEach((part) => {
        const m = part.trim().match(/^(\d+)(?:-(\d+))?$/);
        if (!m) throw new Error("unit ids: like 1-10 or 1,3,7");
        const a = parseInt(m[1], 10), b = m[2] ? parseInt(m[2], 10) : a;
        for (let u = a; u <= b && out.length < 247; u++) out.push(u);
      });
      return out;
    }

    // The serial settings a scan tries: the bus's own first (its live path), then the others.
    function scanSettings() {
      const serial = (busSpecs[bus] || {}).serial;
      if (!serial) return [null];
      const own = { baud: serial.baud || 19200, parity: serial.parity || "E" };
      const bauds = Array.from(document.querySelectorAll(".scan-baud:checked")).map((c) => parseInt(c.value, 10));
      const parities = Array.from(document.querySelectorAll(".scan-parity:checked")).map((c) => c.value);
      if (!bauds.length || !parities.length) throw new Error("tick at least one baud rate and one parity");
      const out = [];
      bauds.forEach((b) => parities.forEach((p) => out.push({ baud: b, parity: p })));
      out.sort((x, y) => (y.baud === own.baud && y.parity === own.parity) - (x.baud === own.baud && x.parity === own.parity));
      return out;
    }

    $("scan-form").addEventListener("submit", guard(async () => {
      const units = parseUnits($("scan-units").value);
      const settings = scanSettings();
      const total = units.length * settings.length;
      const bar = $("scan-progress"); bar.hidden = false; bar.max = total; bar.value = 0;
      const found = $("units"); found.textContent = "";
      $("scan-start").disabled = true;
      let answered = 0, done = 0;
      const notes = [];
      try {
        for (const set of settings) {
          const at = set ? " at " + setting(set.baud, set.parity) : "";
          for (let i = 0; i < units.length; i += 4) {
            const chunk = units.slice(i, i + 4);
            $("scan-text").textContent = "asking units " + chunk[0] + "–" + chunk[chunk.length - 1] + at + " (" + done + " of " + total + " done, " + answered + " found)";
            const req = { bus: bus, units: chunk.join(","), table: $("scan-table").value, seconds: 60 };
            if (set) { req.baud = set.baud; req.parity = set.parity; }
            // A bus saved a moment ago may not be running yet (404) or connected (503): wait a bit.
            let r;
            for (let attempt = 0; ; attempt++) {
              r = await method("scan", req);
              if (r.status === 200 || attempt >= 15 || (r.status !== 404 && r.status !== 503)) break;
              if (set && r.status === 503 && attempt >= 1) break;  // this setting cannot be opened
              $("scan-text").textContent = "waiting for the bridge to open bus " + bus + "…";
              await new Promise((ok) => setTimeout(ok, 1000));
            }
            done += chunk.length;
            bar.value = done;
            if (r.status !== 200) {
              const why = (r.payload && r.payload.error) || JSON.stringify(r.payload);
              if (!set) throw new Error("scan: " + why);
              notes.push(setting(set.baud, set.parity) + ": " + why);
              done += units.length - i - chunk.length; bar.value = done;
              break;
            }
            r.payload.answered.forEach((a) => {
              if (a.kind === "garbled") { notes.push("garbled answer from unit " + a.unit + at + ": another setting?"); return; }
              answered++;
              const b = el("button", "unit " + a.unit + at + (a.kind && a.kind !== "value" ? " (" + a.kind + ")" : ""), { type: "button", "data-unit": a.unit });
              if (set) { b.dataset.baud = set.baud; b.dataset.parity = set.parity; }
              b.addEventListener("click", guard(() => pickUnit(a.unit, set)));
              const li = el("li"); li.appendChild(b); found.appendChild(li);
            });
          }
        }
      } finally { $("scan-start").disabled = false; }
      $("scan-text").textContent = "scan done: " + answered + " answer(s)" + (answered ? "; choose a unit" : "") + (notes.length ? ". " + notes.join("; ") : "");
      const buttons = found.querySelectorAll("button");
      if (buttons.length === 1) buttons[0].click();  // one unit on the line: take it
    }));

    // A unit found at other serial settings than the bus's: the bus takes them.
    async function pickUnit(u, set) {
      const serial = (busSpecs[bus] || {}).serial;
      if (set && serial && (set.baud !== (serial.baud || 19200) || set.parity !== (serial.parity || "E"))) {
        const spec = Object.assign({}, busSpecs[bus], { serial: Object.assign({}, serial, { baud: set.baud, parity: set.parity }) });
        const buses = {}; buses[bus] = spec;
        await call("PATCH", modTwin, { properties: { desired: { buses: buses } } });
        busSpecs[bus] = spec;
        say("bus " + bus + " now runs at " + setting(set.baud, set.parity));
      }
      await openUnit(u);
    }

    async function openUnit(u) {
      unit = u;
      $("unit-id").textContent = u + " on " + bus;
      $("unit-box").hidden = false;
      if (!profileList.length) {
        profileList = await call("GET", "/ui/info/profiles");
        profileList.forEach((p) => $("profile").appendChild(el("option", p.name + (p.title ? " — " + p.title : ""), { value: p.name })));
      }
      $("profile").focus();
    }

    async function read(address, count, table) {
      let r;
      for (let attempt = 0; ; attempt++) {  // a bus whose settings just changed restarts
        r = await method("read_registers", { bus: bus, unit: unit, address: address, count: count, table: table, interpret: true });
        if (r.status === 200 || attempt >= 10 || (r.status !== 404 && r.status !== 503)) break;
        await new Promise((ok) => setTimeout(ok, 1000));
      }
      if (r.status !== 200) throw new Error("read: " + ((r.payload && r.payload.error) || JSON.stringify(r.payload)));
      return r.payload;
    }

    $("probe-form").addEventListener("submit", guard(async () => {
      const address = parseInt($("probe-address").value, 10) || 0, count = parseInt($("probe-count").value, 10) || 1;
      const p = await read(address, count, $("probe-table").value);
      const t = $("probe"); t.textContent = "";
      const head = el("tr"); head.appendChild(el("th", "type", { scope: "col" })); head.appendChild(el("th", "order", { scope: "col" }));
      for (let i = 0; i < count; i++) head.appendChild(el("th", String(address + i), { scope: "col" }));
      const thead = el("thead"); thead.appendChild(head); t.appendChild(thead);
      const tb = el("tbody");
      p.interpretations.forEach((it) => tb.appendChild(row([it.type, it.order].concat(it.values.map((v) => v === null ? "" : v)))));
      t.appendChild(tb);
    }));

    $("profile").addEventListener("change", () => {
      const p = profileList.find((x) => x.name === $("profile").value);
      $("profile-registers").textContent = p ? "reads: " + p.registers.join(", ") : "";
      $("map-box").hidden = !!p;
    });

    const TYPES = ["uint16", "int16", "uint32", "int32", "float32", "float64", "uint64", "int64"];
    $("add-row").addEventListener("click", () => {
      const tb = document.querySelector("#map tbody");
      const n = tb.children.length + 1;
      const tr = el("tr");
      const cell = (node) => { const td = el("td"); td.appendChild(node); tr.appendChild(td); return node; };
      const name = cell(el("input", null, { "aria-label": "name of register " + n, value: "value" + n, class: "m-name" }));
      const table = cell(el("select", null, { "aria-label": "table of register " + n, class: "m-table" }));
      ["input", "holding"].forEach((x) => table.appendChild(el("option", x, { value: x })));
      const addr = cell(el("input", null, { "aria-label": "address of register " + n, type: "number", value: "0", class: "m-address" }));
      const type = cell(el("select", null, { "aria-label": "type of register " + n, class: "m-type" }));
      TYPES.forEach((x) => type.appendChild(el("option", x, { value: x })));
      const scale = cell(el("input", null, { "aria-label": "scale of register " + n, type: "number", step: "any", value: "1", class: "m-scale" }));
      const unitIn = cell(el("input", null, { "aria-label": "unit of register " + n, value: "", class: "m-unit" }));
      const td = el("td"); const test = el("button", "Test", { type: "button" }); const out = el("output");
      td.appendChild(test); td.appendChild(out); tr.appendChild(td);
      test.addEventListener("click", guard(async () => {
        const width = /64/.test(type.value) ? 4 : /32/.test(type.value) ? 2 : 1;
        const p = await read(parseInt(addr.value, 10) || 0, width, table.value);
        const it = p.interpretations.find((x) => x.type === type.value);
        const v = it ? it.values[0] : null;
        out.textContent = v === null || v === undefined ? "?" : String(Number(v) * (parseFloat(scale.value) || 1)) + " " + unitIn.value;
      }));
      tb.appendChild(tr);
      name.focus();
    });

    $("save-form").addEventListener("submit", guard(async () => {
      if (unit === null) throw new Error("choose a unit first");
      const name = $("device-name").value.trim();
      const spec = { bus: bus, unit: unit, interval: parseFloat($("device-interval").value) || 5 };
      if ($("profile").value) spec.profile = $("profile").value;
      else {
        const regs = {};
        document.querySelectorAll("#map tbody tr").forEach((tr) => {
          const r = { table: tr.querySelector(".m-table").value, address: parseInt(tr.querySelector(".m-address").value, 10) || 0, type: tr.querySelector(".m-type").value };
          const scale = parseFloat(tr.querySelector(".m-scale").value); if (scale && scale !== 1) r.scale = scale;
          const u = tr.querySelector(".m-unit").value.trim(); if (u) r.unit = u;
          regs[tr.querySelector(".m-name").value.trim()] = r;
        });
        if (!Object.keys(regs).length) throw new Error("choose a profile or add a register");
        spec.registers = regs;
      }
      const devs = {}; devs[name] = spec;
      await call("PATCH", modTwin, { properties: { desired: { devices: devs } } });
      say("saved " + name + ": waiting for its first values");
      $("live-box").hidden = false;
    }));

    // Live values of every Modbus sensor, as the bridge sends them.
    const liveRows = {};
    // (every sensor's telemetry: Modbus and BLE bridges, and the child devices they speak for)
    live("telemetry", {}, (rows) => {
      rows.forEach((m) => {
        let p = m.event.payload;
        if (typeof p === "string") { try { p = JSON.parse(p); } catch (e) { return; } }
        if (!p || !p.readings) return;
        $("live-box").hidden = false;
        (p.readings || []).forEach((r) => {
          const key = p.sensor + "/" + r.name;
          let tr = liveRows[key];
          if (!tr) { tr = row([p.sensor, r.name, "", ""]); tr.dataset.key = key; liveRows[key] = tr; document.querySelector("#live tbody").appendChild(tr); }
          tr.children[2].textContent = (typeof r.value === "number" ? Math.round(r.value * 1000) / 1000 : r.value) + (r.unit ? " " + r.unit : "");
          const t = p.time !== undefined ? p.time : (m.event.annotations || {})["iothub-enqueuedtime"];
          tr.children[3].textContent = typeof t === "number" ? new Date(t > 1e12 ? t : t * 1000).toLocaleTimeString() : String(t || "").replace(/\.\d+/, "");
        });
      });
    });

    // -- Serial
    const ser = body.dataset.moduleSerial;
    const serTwin = "/twins/" + encodeURIComponent(gw) + "/modules/" + encodeURIComponent(ser || "serial");
    if (!ser) $("serial").hidden = true;
    else guard(async () => {
      const ports = await call("GET", "/ui/info/serial-ports");
      const sel = $("serial-port"); sel.textContent = "";
      sel.appendChild(el("option", ports.length ? "(choose a port)" : "(no serial adapter plugged in: give a path)", { value: "" }));
      ports.forEach((p) => sel.appendChild(el("option", p.replace("/dev/serial/by-id/", ""), { value: p })));
    })();
    $("serial-form").addEventListener("submit", guard(async () => {
      const path = $("serial-path").value.trim() || $("serial-port").value;
      if (!path) throw new Error("choose a port or give its path");
      const sensor = $("serial-sensor").value.trim();
      const fmt = $("serial-format").value;
      const spec = { path: path, sensor: sensor, baud: parseInt($("serial-baud").value, 10) || 9600, format: fmt };
      if (fmt === "regex") spec.decoder = { pattern: $("serial-pattern").value };
      if (fmt === "delimited") spec.decoder = { separator: $("serial-separator").value || ";", columns: $("serial-columns").value.split(",").map((c) => c.trim() || null) };
      const ports = {}; ports[sensor] = spec;
      await call("PATCH", serTwin, { properties: { desired: { ports: ports } } });
      say("serial port " + path + " saved: decoded lines appear under Live values");
    }));

    // -- BLE
    const ble = body.dataset.moduleBle;
    const bleTwin = "/twins/" + encodeURIComponent(gw) + "/modules/" + encodeURIComponent(ble || "ble");
    let bleAddress = null, bleFormats = [];
    let lastNearby = null;
    const showNearby = (r) => {
      lastNearby = r;
      const tb = document.querySelector("#ble-list tbody");
      if (r.status !== 200) { say("BLE bridge: " + ((r.payload && (r.payload.error || r.payload.Message)) || r.status), true); return; }
      tb.textContent = "";
      ((r.payload || {}).devices || []).forEach((d) => {
        const add = el("button", d.sensor ? "added as " + d.sensor : "Add", { type: "button" });
        add.disabled = !!d.sensor;
        add.setAttribute("data-address", d.address);
        add.addEventListener("click", () => { bleAddress = d.address; bleFormats = (d.formats || []).filter((f) => f !== "bthome" || !(d.values || {}).encrypted); $("ble-address").textContent = d.address; $("ble-form").hidden = false; $("ble-name").value = (d.name || "sensor").replace(/[^A-Za-z0-9_-]/g, "_"); $("ble-name").focus(); });
        const v = d.values || {};
        const vals = v.encrypted ? "encrypted BTHome: add it with its bindkey" : Object.keys(v).map((k) => k + " " + v[k]).join(", ") || (d.formats || []).join(", ");
        tb.appendChild(row([d.address, d.name || "", d.rssi + " dBm", vals, add]));
      });
    };
    if (!ble) $("ble").hidden = true;
    else live("ble", {}, showNearby);
    const nearby = async () => { if (lastNearby) showNearby(lastNearby); };
    $("ble-form").addEventListener("submit", guard(async () => {
      const name = $("ble-name").value.trim();
      const key = $("ble-bindkey").value.trim();
      const desired = { sensors: {} };
      if (key) {
        // Encrypted BTHome: the sensor speaks as a child device whose registry entry holds
        // the bindkey (never a twin), as `gateway device update --sensor-key` sets it.
        const g = await call("GET", "/devices/" + encodeURIComponent(gw));
        const child = gw.split(".")[0] + "-" + name;
        await call("PUT", "/devices/" + encodeURIComponent(child), { deviceId: child, authentication: { type: "none" }, deviceScope: g.deviceScope, parentScopes: [g.deviceScope], sensorKey: key });
        desired.sensors[name] = { address: bleAddress, decoder: "bthome" };
        desired.children = {}; desired.children[name] = { deviceId: child };
      } else {
        desired.sensors[name] = { address: bleAddress, decoder: bleFormats.length ? bleFormats : ["bthome", "ruuvi", "atc"] };
      }
      await call("PATCH", bleTwin, { properties: { desired: desired } });
      $("ble-form").hidden = true;
      $("ble-bindkey").value = "";
      say("sensor " + name + " added");
      await nearby();
    }));
  }

  // -- Routes ---------------------------------------------------------------------------
  function routes() {
    const load = guard(async () => {
      const rs = await call("GET", "/routing/routes");
      const tb = document.querySelector("#routes tbody"); tb.textContent = "";
      rs.forEach((r) => tb.appendChild(row([r.name, r.source, r.condition, (r.endpointNames || []).join(", "), r.isEnabled ? "yes" : "no"])));
      const eps = await call("GET", "/routing/endpoints");
      const health = await call("GET", "/routing/health");
      const hmap = {};
      (Array.isArray(health) ? health : []).forEach((h) => { hmap[h.endpointId || h.name] = h.healthStatus || h.status; });
      const sel = $("route-endpoint"); sel.textContent = "";
      sel.appendChild(el("option", "events (built-in)", { value: "events" }));
      const et = document.querySelector("#endpoints tbody"); et.textContent = "";
      et.appendChild(row(["events", "built-in", hmap.events || "healthy"]));
      eps.forEach((e) => { sel.appendChild(el("option", e.name, { value: e.name })); et.appendChild(row([e.name, e.type, hmap[e.name] || "unknown"])); });
    });
    load();
    const sample = () => {
      let b; try { b = JSON.parse($("route-sample").value); } catch (e) { b = $("route-sample").value; }
      return { body: b };
    };
    $("route-test").addEventListener("click", guard(async () => {
      const name = $("route-name").value.trim() || "new-route";
      const r = await call("POST", "/routing/test", Object.assign(sample(), { route: { name: name, source: $("route-source").value, condition: $("route-condition").value, endpointNames: [$("route-endpoint").value], isEnabled: true } }));
      const mine = (r.routes || []).find((x) => x.name === name) || {};
      $("route-test-result").textContent = (mine.matched ? "matches: the sample goes to " + mine.endpoint : "does not match: " + (mine.reason || "?")) + ". Endpoints reached: " + (r.endpoints || []).join(", ") + (r.fallback ? " (by the fallback route)" : "");
      $("route-test-result").className = mine.matched ? "" : "error";
    }));
    $("route-form").addEventListener("submit", guard(async () => {
      const name = $("route-name").value.trim();
      await call("PUT", "/routing/routes/" + encodeURIComponent(name), { name: name, source: $("route-source").value, condition: $("route-condition").value, endpointNames: [$("route-endpoint").value], isEnabled: true });
      say("route " + name + " created"); await load();
    }));
  }

  // -- Upstream -------------------------------------------------------------------------
  function upstream() {
    const drain = drainer();
    live("overview", {}, (o) => {
      const st = o.upstream;
      $("up-state").textContent = st && o.upstreamSet ? st.state : "not set";  // the error has its own card
      $("up-backlog").textContent = st ? st.backlog + " messages (" + bytes(st.backlogBytes) + ")" : "–";
      $("up-oldest").textContent = st ? duration(st.oldestAgeSeconds) : "–";
      $("up-sent").textContent = st ? st.sent : "–";
      $("up-error").textContent = st && st.lastError ? st.lastError : "none";
      const t = st ? drain(st) : null;
      $("up-drain").textContent = t === Infinity ? "not draining" : duration(t);
    });
    const show = guard(async () => {
      const s = await call("GET", "/upstream");
      $("up-target").textContent = s ? (s.deviceId || s.device_id || "") + " @ " + (s.host || s.hub) + ":" + (s.port || "") : "not set";
    });
    show();
    const groups = { connstr: ["up-g-connstr"], "dps-key": ["up-g-dps", "up-g-groupkey"], "dps-x509": ["up-g-dps", "up-g-cert"], x509: ["up-g-hub", "up-g-cert"] };
    const how = () => $("up-how").value;
    const showGroups = () => {
      ["up-g-connstr", "up-g-dps", "up-g-groupkey", "up-g-hub", "up-g-cert"].forEach((g) => { $(g).hidden = groups[how()].indexOf(g) < 0; });
    };
    $("up-how").addEventListener("change", showGroups);
    showGroups();
    const value = (id) => $(id).value.trim();
    const need = (id, what) => { const v = value(id); if (!v) { $(id).focus(); throw new Error("give " + what); } return v; };
    $("upstream-form").addEventListener("submit", guard(async () => {
      const req = {};
      const h = how();
      if (h === "connstr") req.connectionString = need("up-connstr", "the connection string");
      if (h === "x509") {
        req.hub = need("up-hub", "the parent's host name"); req.device = need("up-device", "our device id at the parent");
        req.x509 = { cert: need("up-cert", "the certificate file"), key: need("up-key", "the key file") };
      }
      if (h === "dps-key" || h === "dps-x509") {
        const e = { idScope: need("up-scope", "the ID scope"), provisioningHost: need("up-dps-host", "the provisioning service's address") };
        if (value("up-dps-port")) e.provisioningPort = parseInt(value("up-dps-port"), 10);
        if (value("up-regid")) e.registrationId = value("up-regid");
        if (h === "dps-key") { if (!e.registrationId) throw new Error("give the registration id"); e.groupKey = need("up-group-key", "the enrollment group key"); }
        else e.x509 = { cert: need("up-cert", "the certificate file"), key: need("up-key", "the key file") };
        req.enrollment = e;
      }
      if (value("up-host")) req.host = value("up-host");
      if (value("up-ca")) req.caFile = value("up-ca");
      if ($("up-port").value) req.port = parseInt($("up-port").value, 10);
      $("up-save").disabled = true;
      say(req.enrollment ? "registering at the provisioning service " + req.enrollment.provisioningHost + "…" : "saving…");
      let s;
      try { s = await call("PUT", "/upstream", req); } finally { $("up-save").disabled = false; }
      $("up-connstr").value = ""; $("up-group-key").value = "";
      say(req.enrollment ? "registered: this gateway is " + s.device_id + " at " + s.hub + "; connecting" : "upstream saved");
      await show();
    }));
    $("up-clear").addEventListener("click", guard(async () => {
      if (!window.confirm("Remove the upstream link? Messages are no longer kept for it.")) return;
      await call("DELETE", "/upstream");
      say("upstream link removed"); await show();
    }));
    $("up-test").addEventListener("click", guard(async () => {
      const ol = $("up-steps"); ol.textContent = ""; ol.appendChild(el("li", "testing…"));
      const steps = await call("POST", "/ui/upstream-test", {});
      ol.textContent = "";
      steps.forEach((s) => ol.appendChild(el("li", s.status.toUpperCase() + " " + s.check + ": " + s.message + (s.hint ? " — " + s.hint : ""), { class: s.status })));
    }));
  }

  // -- Logs -----------------------------------------------------------------------------
  function logs() {
    let es = null;
    const start = () => {
      if (es) es.close();
      const tb = document.querySelector("#logs tbody"); tb.textContent = "";
      es = live("logs", { level: $("log-level").value, device: $("log-device").value.trim(), module: $("log-module").value.trim() }, (records) => {
        records.forEach((r) => { const tr = row([r.time, r.level, r.message]); tr.className = r.level.toLowerCase(); tb.insertBefore(tr, tb.firstChild); });
        while (tb.children.length > 500) tb.removeChild(tb.lastChild);
      });
    };
    start();
    $("log-filter").addEventListener("submit", (ev) => { ev.preventDefault(); start(); });
  }

  // -- System ---------------------------------------------------------------------------
  function system() {
    guard(async () => {
      const s = await call("GET", "/ui/info/system");
      $("sys-version").textContent = s.version;
      $("sys-host").textContent = s.hostName;
      $("sys-hub").textContent = s.hubName;
      $("sys-addresses").textContent = s.addresses.join(", ");
      $("sys-time").textContent = s.time;
      $("sys-uptime").textContent = duration(s.uptime);
      $("sys-disk").textContent = bytes(s.disk.free) + " free of " + bytes(s.disk.total);
      $("restart").disabled = !s.restart;
    })();
    const sessions = guard(async () => {
      const list = await call("GET", "/ui/info/sessions");
      const tb = document.querySelector("#sessions tbody"); tb.textContent = "";
      const when = (t) => new Date(t * 1000).toLocaleString();
      list.forEach((x) => { const tr = row([x.id + (x.current ? " (this one)" : ""), x.address, when(x.created), when(x.seen)]); tr.dataset.session = x.id; tb.appendChild(tr); });
      $("end-others").disabled = list.length < 2;
    });
    sessions();
    $("end-others").addEventListener("click", guard(async () => {
      const r = await call("POST", "/ui/sessions/end-others", {});
      say(r.ended + " other session(s) logged out"); await sessions();
    }));
    $("password-form").addEventListener("submit", guard(async () => {
      if ($("pw-new").value !== $("pw-again").value) throw new Error("the two new passwords differ: nothing changed");
      const r = await call("POST", "/ui/password", { current: $("pw-current").value, new: $("pw-new").value });
      ["pw-current", "pw-new", "pw-again"].forEach((id) => { $(id).value = ""; });
      say("password changed; " + r.ended + " other session(s) logged out"); await sessions();
    }));
    $("restart").addEventListener("click", guard(async () => {
      if (!window.confirm("Restart the hub? Devices reconnect by themselves.")) return;
      await call("POST", "/ui/restart", {});
      say("restarting…");
    }));
  }

  const screens = { overview: overview, devices: devices, device: device, sensors: sensors, routes: routes, upstream: upstream, logs: logs, system: system };
  if (screens[screen]) screens[screen]();
})();
