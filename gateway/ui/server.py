"""The technician's web UI: an aiohttp shell on the hub's HTTPS port (issue 13).

Pages are server-rendered (:mod:`gateway.ui.pages`); one small script of ours
(``static/ui.js``) runs the forms and the live views. Live values come over server-sent events
(``/ui/stream/*``), never by polling pages.

Security: the admin logs in with the password of ``DATA_DIR/admin.json`` (no default: without
the file only the "how to set a password" page answers); failed logins are rate-limited per
address and overall; the session is server-side, its cookie ``HttpOnly; Secure;
SameSite=Strict`` with a random id; every state-changing request carries the session's CSRF
token (``X-CSRF-Token``) and a same-origin ``Origin``. Actions on the hub go through
``/ui/api/<service API path>``: the request is handed, in-process, to the service API's own
route with a short-lived ``iothubowner`` token, so it is authorized exactly as the REST API
authorizes it; each one is logged (``ui action user=... action=...``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from gateway import __version__
from gateway.api.errors import error_middleware
from gateway.errors import ConfigError, ForbiddenError, InvalidRequestError, NotFoundError
from gateway.hub.sas import generate_sas_token
from gateway.ui import pages
from gateway.ui.logbuf import RingHandler
from gateway.ui.security import (
    ADMIN_USER,
    RateLimiter,
    Session,
    Sessions,
    check_password,
    csrf_ok,
    password_stamp,
    read_admin,
    write_admin,
)

if TYPE_CHECKING:
    from gateway.api.server import ServiceApi
    from gateway.broker.broker import Broker
    from gateway.config import Config
    from gateway.upstream.service import Upstream

log = logging.getLogger(__name__)

COOKIE = "gw_session"
STATIC = Path(__file__).parent / "static"
PROFILES = Path(__file__).resolve().parent.parent.parent / "hw" / "profiles"
BY_ID = Path("/dev/serial/by-id")
_SAFE = frozenset({"GET", "HEAD"})
HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; "
                               "script-src 'self'; connect-src 'self'; frame-ancestors 'none'; "
                               "form-action 'self'; base-uri 'none'",
    "X-Frame-Options": "DENY", "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin", "Cache-Control": "no-store",
}


@dataclass
class UiServer:
    """Routes of the UI; :meth:`add_routes` registers them on the service API's app."""

    config: Config
    api: ServiceApi
    upstream: Upstream | None
    ring: RingHandler
    broker: Broker | None = None
    restart: Callable[[], None] | None = None
    clock: Callable[[], float] = time.time
    sessions: Sessions = field(default_factory=Sessions)
    limiter: RateLimiter = field(default_factory=RateLimiter)
    started: float = field(default_factory=time.time)
    _alerts: list[dict[str, str]] = field(default_factory=list)
    _alerts_at: float = 0.0

    @property
    def data_dir(self) -> Path:
        return self.config.data_dir

    @property
    def gateway_id(self) -> str:
        return self.config.hub.device_id or self.config.hub.host_name

    def add_routes(self) -> None:
        add = self.api.app.router.add_route
        add("GET", "/", self.page("overview"))
        for name in pages.SCREENS:
            add("GET", f"/ui/{name}", self.page(name))
        add("GET", "/ui/devices/{device_id}", self.device_page)
        add("GET", "/ui/login", self.login_page)
        add("POST", "/ui/login", self.login)
        add("POST", "/ui/logout", self.logout)
        add("GET", "/ui/static/{name}", self.static)
        add("*", "/ui/api/{tail:.+}", self.call)
        add("POST", "/ui/qr", self.qr)
        add("GET", "/ui/info/{what}", self.info)
        add("GET", "/ui/stream/{what}", self.stream)
        add("POST", "/ui/upstream-test", self.upstream_test)
        add("GET", "/ui/bundle", self.bundle)
        add("POST", "/ui/restart", self.restart_hub)
        add("POST", "/ui/password", self.change_password)
        add("POST", "/ui/sessions/end-others", self.end_other_sessions)

    # -- sessions and guards -------------------------------------------------------------

    def _address(self, request: web.Request) -> str:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        return str(peer[0]) if peer else "?"

    def _session(self, request: web.Request) -> Session | None:
        """The request's session, if it is live and of the password in force (a password
        changed since it logged in ends it: log out everywhere)."""
        return self.sessions.get(request.cookies.get(COOKIE), self.clock(),
                                 stamp=password_stamp(read_admin(self.data_dir)))

    def _same_origin(self, request: web.Request) -> bool:
        origin = request.headers.get("Origin")
        if origin is None or origin == "null":
            return origin is None and request.headers.get("Sec-Fetch-Site") in (None, "same-origin")
        return URL(origin).host == request.url.host and URL(origin).port == request.url.port

    def guard(self, request: web.Request) -> Session:
        """The session of a request; a state-changing one also needs its CSRF token."""
        session = self._session(request)
        if session is None:
            raise web.HTTPUnauthorized(text="not logged in (or the session expired)")
        if request.method not in _SAFE:
            token = request.headers.get("X-CSRF-Token")
            if not csrf_ok(session, token) or not self._same_origin(request):
                raise web.HTTPForbidden(text="CSRF check failed: reload the page")
        return session

    def action(self, request: web.Request, session: Session, what: str) -> None:
        log.info("ui action user=%s address=%s action=%s", session.user,
                 self._address(request), what)

    def _html(self, text: str, status: int = 200) -> web.Response:
        return web.Response(text=text, status=status, content_type="text/html", headers=HEADERS)

    def page(self, name: str) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handler(request: web.Request) -> web.StreamResponse:
            if read_admin(self.data_dir) is None:
                return self._html(pages.no_admin(self.data_dir), status=503)
            session = self._session(request)
            if session is None:
                raise web.HTTPSeeOther(f"/ui/login?next={request.path}")
            return self._html(pages.screen(name, self._context(session)))
        return handler

    def _context(self, session: Session) -> dict[str, Any]:
        return {"csrf": session.csrf, "user": session.user, "gateway": self.gateway_id,
                "host": self.config.hub.host_name,
                "modules": {m.name: m.bridge for m in self.config.modules}}

    async def device_page(self, request: web.Request) -> web.StreamResponse:
        session = self._session(request)
        if session is None or read_admin(self.data_dir) is None:
            raise web.HTTPSeeOther("/ui/login")
        ctx = self._context(session)
        ctx["device"] = request.match_info["device_id"]
        return self._html(pages.screen("device", ctx))

    # -- login ---------------------------------------------------------------------------

    async def login_page(self, request: web.Request) -> web.StreamResponse:
        if read_admin(self.data_dir) is None:
            return self._html(pages.no_admin(self.data_dir), status=503)
        return self._html(pages.login(error=request.query.get("error", "")))

    async def login(self, request: web.Request) -> web.StreamResponse:
        if read_admin(self.data_dir) is None:
            return self._html(pages.no_admin(self.data_dir), status=503)
        if not self._same_origin(request):
            log.warning("ui login refused address=%s reason=cross-site origin=%s",
                        self._address(request), request.headers.get("Origin"))
            raise web.HTTPForbidden(text="cross-site login refused")
        address, now = self._address(request), self.clock()
        wait = self.limiter.blocked(address, now)
        if wait > 0:
            log.warning("ui login refused address=%s reason=rate-limited", address)
            return self._html(pages.login(
                error=f"Too many failed logins: try again in {int(wait) + 1} s."), status=429)
        form = await request.post()
        password = form.get("password")
        ok = isinstance(password, str) and await asyncio.to_thread(
            check_password, self.data_dir, password)
        if not ok:
            self.limiter.failed(address, now)
            log.warning("ui login failed user=%s address=%s", ADMIN_USER, address)
            return self._html(pages.login(error="Wrong password."), status=401)
        self.limiter.succeeded(address)
        old = request.cookies.get(COOKIE)
        self.sessions.end(old)  # a fresh id at every login (no session fixation)
        session = self.sessions.create(ADMIN_USER, now, address=address,
                                       stamp=password_stamp(read_admin(self.data_dir)))
        log.info("ui login user=%s address=%s", ADMIN_USER, address)
        target = str(form.get("next") or "/")
        if not target.startswith("/") or target.startswith("//"):
            target = "/"
        response = web.HTTPSeeOther(target)
        response.set_cookie(COOKIE, session.sid, httponly=True, secure=True, samesite="Strict",
                            path="/", max_age=int(self.sessions.absolute))
        raise response

    async def logout(self, request: web.Request) -> web.StreamResponse:
        session = self._session(request)
        form = await request.post()
        if session is not None and csrf_ok(session, str(form.get("csrf", ""))) \
                and self._same_origin(request):
            self.action(request, session, "logout")
            self.sessions.end(session.sid)
        response = web.HTTPSeeOther("/ui/login")
        response.del_cookie(COOKIE, path="/")
        raise response

    async def static(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        path = STATIC / name
        if "/" in name or name.startswith(".") or not path.is_file():
            raise NotFoundError(f"no static file {name!r}")
        kind = {".js": "application/javascript", ".css": "text/css",
                ".txt": "text/plain"}.get(path.suffix, "application/octet-stream")
        return web.Response(body=path.read_bytes(), content_type=kind,
                            headers={**HEADERS, "Cache-Control": "max-age=300"})

    # -- the service API, in-process ----------------------------------------------------

    async def call(self, request: web.Request) -> web.StreamResponse:
        """``/ui/api/<path>``: the service API's own route for ``/<path>``, as iothubowner."""
        session = self.guard(request)
        target = "/" + request.match_info["tail"]
        if target.startswith("/ui/") or target == "/ui":
            raise NotFoundError("not a service API path")
        owner = self.api.registry.get_policy("iothubowner")
        if owner is None:
            raise ForbiddenError("the iothubowner policy is gone")
        token = generate_sas_token(self.config.hub.host_name, owner.primary_key,
                                   int(self.clock()) + 300, policy=owner.name)
        headers = CIMultiDict(request.headers)
        headers["Authorization"] = token
        sub = request.clone(rel_url=URL.build(path=target, query_string=request.query_string),
                            headers=headers)
        match = await self.api.app.router.resolve(sub)
        match.add_app(self.api.app)
        match.freeze()
        sub._match_info = match  # noqa: SLF001 (what aiohttp's own dispatch does)
        if request.method not in _SAFE:
            self.action(request, session, f"{request.method} {target}")
        return await error_middleware(sub, match.handler)

    async def qr(self, request: web.Request) -> web.StreamResponse:
        """A QR code (SVG) of a text the page holds (a connection string: never in a URL)."""
        self.guard(request)
        text = (await request.text())[:2000]
        if not text:
            raise InvalidRequestError("nothing to encode")
        import segno

        svg = segno.make(text, error="m").svg_inline(scale=4, dark="#000", light="#fff")
        return web.Response(text=svg, content_type="image/svg+xml", headers=HEADERS)

    async def info(self, request: web.Request) -> web.StreamResponse:
        self.guard(request)
        what = request.match_info["what"]
        if what == "serial-ports":
            data: Any = serial_ports()
        elif what == "profiles":
            data = profiles()
        elif what == "system":
            data = self.system()
        elif what == "alerts":
            data = await self.alerts(force=request.query.get("refresh") == "1")
        elif what == "checks":
            data = await self.checks(force=request.query.get("refresh") == "1")
        elif what == "overview":
            data = self.overview()
        elif what == "sessions":
            mine = self._session(request)
            data = [{"id": x.public_id, "user": x.user, "address": x.address,
                     "created": x.created, "seen": x.seen, "current": x is mine}
                    for x in self.sessions.all(self.clock())]
        else:
            raise NotFoundError(f"no information {what!r}")
        return web.json_response(data, headers=HEADERS)

    # -- what the screens show -----------------------------------------------------------

    def overview(self) -> dict[str, Any]:
        api = self.api
        broker = self.broker
        stats = api.log.stats()
        now = self.clock()
        oldest = (now - stats.oldest_enqueued_ms / 1000) if stats.oldest_enqueued_ms else 0.0
        upstream = self.upstream.status() if self.upstream is not None else None
        devices = api.registry.devices()
        return {
            "time": now, "uptime": now - self.started, "version": __version__,
            "connections": len(broker.live) if broker is not None else None,
            "devices": len(devices),
            "connected": sum(1 for d in devices if d.to_json().get("connectionState") == "Connected"),
            "appended": stats.appended, "stored": stats.count, "storeBytes": stats.bytes,
            "storeMax": self.config.store.max_bytes, "storeOldestAge": max(oldest, 0.0),
            "rejected": stats.rejected,
            "upstream": upstream, "upstreamSet": bool(self.upstream and self.upstream.settings),
        }

    def system(self) -> dict[str, Any]:
        disk = shutil.disk_usage(self.data_dir)
        addresses: set[str] = set()
        try:
            for info in socket.getaddrinfo(socket.gethostname(), None):
                addresses.add(str(info[4][0]))
        except OSError:
            pass
        return {"version": __version__, "hostName": socket.gethostname(),
                "hubName": self.config.hub.host_name, "addresses": sorted(addresses),
                "time": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "uptime": self.clock() - self.started,
                "disk": {"total": disk.total, "used": disk.used, "free": disk.free},
                "dataDir": str(self.data_dir), "restart": self.restart is not None}

    async def alerts(self, force: bool = False) -> list[dict[str, str]]:
        """Warnings and failures of ``gateway doctor`` (run at most once a minute)."""
        return [f for f in await self.checks(force) if f["status"] in ("warn", "fail")]

    async def checks(self, force: bool = False) -> list[dict[str, str]]:
        """Every finding of ``gateway doctor`` (the Overview's clock and disk cards)."""
        if force or self.clock() - self._alerts_at > 60:
            self._alerts_at = self.clock()
            self._alerts = await asyncio.to_thread(self._doctor)
        return self._alerts

    def _doctor(self) -> list[dict[str, str]]:
        from gateway.doctor.checks import run_checks

        try:
            findings = run_checks(self._doctor_context())
        except Exception as exc:  # the doctor's own trouble is an alert, not a crash
            return [{"check": "doctor", "status": "fail", "message": str(exc), "hint": ""}]
        return [{"check": f.check, "status": f.status, "message": f.message, "hint": f.hint}
                for f in findings]

    def _doctor_context(self) -> Any:
        from gateway.cli_doctor import _upstream_target
        from gateway.doctor.checks import Context, read_runtime
        from gateway.hubclient import HubClient

        return Context(data_dir=self.data_dir, config=self.config,
                       runtime=read_runtime(self.data_dir), client=HubClient(self.data_dir),
                       upstream=_upstream_target(self.data_dir, self.config))

    # -- live streams (server-sent events) -----------------------------------------------

    async def stream(self, request: web.Request) -> web.StreamResponse:
        self.guard(request)
        what = request.match_info["what"]
        if what not in ("overview", "logs", "telemetry", "devices", "ble", "buses"):
            raise NotFoundError(f"no stream {what!r}")
        if what == "buses" and request.query.get("module") not in {
                m.name for m in self.config.modules if m.bridge == "modbus"}:
            raise NotFoundError("no such Modbus bridge module")
        response = web.StreamResponse(headers={
            **HEADERS, "Content-Type": "text/event-stream", "X-Accel-Buffering": "no"})
        await response.prepare(request)
        try:
            if what == "overview":
                await self._stream_overview(response)
            elif what == "logs":
                await self._stream_logs(request, response)
            elif what == "devices":
                await self._stream_devices(response)
            elif what == "ble":
                await self._stream_ble(response)
            elif what == "buses":
                await self._stream_buses(request, response)
            else:
                await self._stream_telemetry(request, response)
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        return response

    @staticmethod
    async def _send(response: web.StreamResponse, data: Any, event: str = "message") -> None:
        await response.write(f"event: {event}\ndata: {json.dumps(data)}\n\n".encode())

    async def _stream_overview(self, response: web.StreamResponse) -> None:
        while True:
            await self._send(response, self.overview())
            await asyncio.sleep(1.0)

    async def _stream_devices(self, response: web.StreamResponse) -> None:
        last: Any = None
        while True:
            rows = [{"deviceId": d.device_id, "connectionState": j.get("connectionState"),
                     "lastActivityTime": j.get("lastActivityTime"), "status": j.get("status")}
                    for d in self.api.registry.devices() for j in (d.to_json(),)]
            if rows != last:
                await self._send(response, rows)
                last = rows
            else:
                await response.write(b": keep-alive\n\n")
            await asyncio.sleep(1.0)

    async def _stream_ble(self, response: web.StreamResponse) -> None:
        """What the BLE bridge hears (its ``nearby`` method, asked every 2 s inside the hub)."""
        module = next((m.name for m in self.config.modules if m.bridge == "ble"), None)
        if module is None:
            raise NotFoundError("no BLE bridge is configured")
        from gateway.errors import GatewayError

        while True:
            try:
                status, payload = await self.api.hub.methods.invoke(
                    self.gateway_id, module, {"methodName": "nearby", "payload": {},
                                              "responseTimeoutInSeconds": 10,
                                              "connectTimeoutInSeconds": 5})
            except GatewayError as exc:
                status, payload = 503, {"error": str(exc)}
            await self._send(response, {"status": status, "payload": payload})
            await asyncio.sleep(2.0)

    async def _stream_buses(self, request: web.Request, response: web.StreamResponse) -> None:
        """The Modbus bridge's buses: desired settings and reported state, on each change."""
        module = request.query.get("module", "")
        last: Any = None
        from gateway.errors import GatewayError

        while True:
            try:
                doc = (await self.api.hub.twins.twin(self.gateway_id, module)).document()
            except GatewayError:  # the module's identity is not there (yet)
                doc = {}
            props = doc.get("properties", {})
            status = (props.get("reported", {}).get("status") or {})
            data = {"desired": props.get("desired", {}).get("buses") or {},
                    "devices": props.get("desired", {}).get("devices") or {},
                    "status": status.get("buses") or {} if isinstance(status, dict) else {}}
            if data != last:
                await self._send(response, data)
                last = data
            else:
                await response.write(b": keep-alive\n\n")
            await asyncio.sleep(1.0)

    async def _stream_logs(self, request: web.Request, response: web.StreamResponse) -> None:
        q = request.query
        level = logging.getLevelName(q.get("level", "INFO").upper())
        level = level if isinstance(level, int) else logging.INFO
        seq = max(self.ring.last_seq - 200, 0)
        while True:
            records = self.ring.since(seq, level=level, device=q.get("device", ""),
                                      module=q.get("module", ""))
            seq = self.ring.last_seq
            if records:
                await self._send(response, [r.json() for r in records])
            else:
                await response.write(b": keep-alive\n\n")
            await asyncio.sleep(0.5)

    async def _stream_telemetry(self, request: web.Request, response: web.StreamResponse) -> None:
        """Telemetry of one device (and module) as it commits, from the last few messages."""
        from gateway.api.events import entry_json

        device = request.query.get("device", "")
        module = request.query.get("module", "")
        log_ = self.api.log
        after = max(log_.last_seq - 50, 0)
        while True:
            entries, after = await log_.scan(after, 200, device_id=device or None,
                                             kinds={"telemetry"}, max_bytes=1 << 20)
            rows = [entry_json(e, self.config.hub.host_name) for e in entries]
            rows = [r for r in rows if not module or r.get("event", {}).get("module") == module]
            if rows:
                await self._send(response, rows)
            if after < log_.last_seq:
                continue
            if not await log_.wait_beyond(after, 15.0):
                await response.write(b": keep-alive\n\n")

    # -- upstream, system ----------------------------------------------------------------

    async def upstream_test(self, request: web.Request) -> web.StreamResponse:
        """The doctor's step-by-step probe of the upstream link (gateway.doctor.probe)."""
        session = self.guard(request)
        self.action(request, session, "upstream test")
        from gateway.doctor.probe import UpstreamTarget, probe

        settings = self.upstream.settings if self.upstream is not None else None

        def run() -> list[dict[str, str]]:
            if settings is None:
                return [{"check": "upstream", "status": "fail", "message": "no upstream set",
                         "hint": "set the connection string first"}]
            def path(p: str | None) -> Path | None:
                return Path(p) if p else None

            target = UpstreamTarget(
                host=settings.host or settings.hub, port=settings.port, hub_name=settings.hub,
                device_id=settings.device_id, key=settings.shared_access_key,
                cert=path(settings.cert_file), cert_key=path(settings.key_file),
                ca_file=path(settings.ca_file))
            return [{"check": f.check, "status": f.status, "message": f.message,
                     "hint": f.hint} for f in probe(target)]

        return web.json_response(await asyncio.to_thread(run), headers=HEADERS)

    async def bundle(self, request: web.Request) -> web.StreamResponse:
        session = self.guard(request)
        self.action(request, session, "support bundle")
        from gateway.doctor.bundle import write_bundle

        out = self.data_dir / f".ui-bundle-{os.getpid()}.tar.gz"

        def make() -> bytes:
            write_bundle(self._doctor_context(), out)
            try:
                return out.read_bytes()
            finally:
                out.unlink(missing_ok=True)

        body = await asyncio.to_thread(make)
        name = f"support-{self.config.hub.host_name}-{time.strftime('%Y%m%d-%H%M%S')}.tar.gz"
        return web.Response(body=body, content_type="application/gzip", headers={
            **HEADERS, "Content-Disposition": f'attachment; filename="{name}"'})

    async def restart_hub(self, request: web.Request) -> web.StreamResponse:
        session = self.guard(request)
        if self.restart is None:
            raise InvalidRequestError("this hub cannot restart itself (no service manager)")
        self.action(request, session, "restart")
        asyncio.get_running_loop().call_later(0.5, self.restart)  # after this answer went out
        return web.json_response({"restarting": True}, headers=HEADERS)


    async def change_password(self, request: web.Request) -> web.StreamResponse:
        """``{"current", "new"}``: set a new admin password; every other session ends."""
        session = self.guard(request)
        address, now = self._address(request), self.clock()
        wait = self.limiter.blocked(address, now)
        if wait > 0:
            log.warning("ui password change refused address=%s reason=rate-limited", address)
            raise web.HTTPTooManyRequests(text=f"Too many wrong passwords: try again in "
                                               f"{int(wait) + 1} s")
        try:
            body = await request.json()
        except ValueError:
            raise InvalidRequestError("the body must be JSON") from None
        current, new = (body.get("current"), body.get("new")) if isinstance(body, dict) \
            else (None, None)
        if not isinstance(current, str) or not isinstance(new, str):
            raise InvalidRequestError("give the current and the new password")
        if not await asyncio.to_thread(check_password, self.data_dir, current):
            self.limiter.failed(address, now)
            log.warning("ui password change refused user=%s address=%s reason=wrong-password",
                        session.user, address)
            raise web.HTTPForbidden(text="the current password is wrong: nothing changed")
        try:
            await asyncio.to_thread(write_admin, self.data_dir, new)
        except ConfigError as exc:
            raise InvalidRequestError(str(exc)) from None
        session.stamp = password_stamp(read_admin(self.data_dir))
        ended = self.sessions.end_others(session.sid)
        self.action(request, session, f"password change (ended {ended} other sessions)")
        return web.json_response({"ended": ended}, headers=HEADERS)

    async def end_other_sessions(self, request: web.Request) -> web.StreamResponse:
        session = self.guard(request)
        ended = self.sessions.end_others(session.sid)
        self.action(request, session, f"log out everywhere else (ended {ended} sessions)")
        return web.json_response({"ended": ended}, headers=HEADERS)


def reexec() -> None:
    """Run the same command again in this process (the hub has stopped cleanly: its modules,
    listeners and store are closed; the process id stays, so a service manager sees no exit)."""
    import sys

    log.warning("ui restart: the hub restarts now")
    logging.shutdown()
    os.execv(sys.executable, sys.orig_argv)


def serial_ports(by_id: Path = BY_ID) -> list[str]:
    try:
        return sorted(str(p) for p in by_id.iterdir())
    except OSError:
        return []


def profiles(directory: Path = PROFILES) -> list[dict[str, Any]]:
    """The Modbus profiles of the library (hw/profiles/*.toml): name, title, registers."""
    import tomllib

    out = []
    for path in sorted(directory.glob("*.toml")):
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        head = data.get("profile", {})
        if head.get("bus", "modbus") != "modbus":
            continue
        out.append({"name": head.get("name", path.stem), "title": head.get("title", ""),
                    "registers": sorted(data.get("registers", {}))})
    return out
