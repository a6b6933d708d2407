"""The checks of ``gateway doctor``: the box, the store, the certificates, the listeners, the
modules and their hardware, and the upstream link.

Each check is a function of a :class:`Context` returning findings. Checks read the data
directory and, when the hub runs, ask it over its service API; none changes anything.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import sqlite3
import stat
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

from cryptography import x509

from gateway.config import Config
from gateway.doctor.probe import UpstreamTarget, probe
from gateway.doctor.report import Finding, fail, ok, skip, warn
from gateway.errors import GatewayError

CERT_WARN = timedelta(days=30)
DISK_WARN_FRACTION, DISK_WARN_BYTES = 0.10, 1 << 30
DISK_FAIL_FRACTION, DISK_FAIL_BYTES = 0.02, 100 << 20
EARLIEST_PLAUSIBLE_YEAR = 2025  # a board without RTC that boots in 1970 (or at its build date)


class ApiClient(Protocol):
    """What the checks need of the running hub (``gateway.hubclient.HubClient`` fits)."""

    def request(self, method: str, path: str, body: Any = None, **kw: Any) -> Any: ...


@dataclass(frozen=True)
class Context:
    data_dir: Path
    config: Config
    runtime: Mapping[str, Any] | None  # hub.json of a running hub, or None
    client: ApiClient | None  # the running hub's service API, or None
    upstream: UpstreamTarget | None = None
    now: Callable[[], float] = time.time
    sys_root: Path = Path("/")  # /sys and /dev are read under it (tests point it elsewhere)


Check = Callable[[Context], Iterator[Finding]]


def check_hub(ctx: Context) -> Iterator[Finding]:
    if ctx.runtime is None:
        yield fail("hub.running", f"no running hub found in {ctx.data_dir}",
                   "start it: systemctl start gateway (journalctl -u gateway says why it "
                   f"stopped), or gateway run --data-dir {ctx.data_dir}")
        return
    pid = int(ctx.runtime.get("pid", 0))
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        yield fail("hub.running", f"hub.json names process {pid}, which is gone",
                   "the hub died without cleaning up: journalctl -u gateway -b shows why")
        return
    except PermissionError:
        pass
    yield ok("hub.running", f"hub running (pid {pid}) as {ctx.runtime.get('host_name')}")


def check_clock(ctx: Context) -> Iterator[Finding]:
    now = datetime.fromtimestamp(ctx.now(), UTC)
    if now.year < EARLIEST_PLAUSIBLE_YEAR:
        yield fail("clock", f"the clock says {now:%Y-%m-%d %H:%M} UTC, which cannot be right",
                   "SAS tokens and certificates are checked against the clock: set the time "
                   "servers in gateway-setup.toml or run timedatectl set-ntp true")
        return
    synced = _time_synchronized(ctx.sys_root)
    if synced is None:
        yield warn("clock", f"{now:%Y-%m-%d %H:%M:%S} UTC; cannot tell whether it is synchronized",
                   "install and enable systemd-timesyncd or chrony (timedatectl status)")
    elif synced:
        yield ok("clock", f"{now:%Y-%m-%d %H:%M:%S} UTC, synchronized")
    else:
        yield warn("clock", f"{now:%Y-%m-%d %H:%M:%S} UTC, NOT synchronized",
                   "tokens are refused beyond 5 minutes of skew: check the time servers "
                   "(timedatectl timesync-status) and that UDP 123 is allowed out")


def _time_synchronized(root: Path) -> bool | None:
    if (root / "run/systemd/timesync/synchronized").exists():
        return True
    if shutil.which("timedatectl") and root == Path("/"):
        try:
            out = subprocess.run(["timedatectl", "show", "-p", "NTPSynchronized", "--value"],
                                 capture_output=True, text=True, timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            return None
        if out.returncode == 0 and out.stdout.strip() in ("yes", "no"):
            return out.stdout.strip() == "yes"
    return None


def check_disk(ctx: Context) -> Iterator[Finding]:
    try:
        usage = shutil.disk_usage(ctx.data_dir)
    except OSError as exc:
        yield fail("disk", f"cannot read the data directory's file system: {exc.strerror}",
                   f"check that {ctx.data_dir} exists and is mounted")
        return
    free, fraction = usage.free, usage.free / usage.total if usage.total else 0.0
    text = f"{_size(free)} free of {_size(usage.total)} ({fraction:.0%}) under {ctx.data_dir}"
    hint = ("the store keeps messages while the upstream link is down: free space, or lower "
            "store.max_bytes so its full policy acts before the disk is full")
    if free < DISK_FAIL_BYTES or fraction < DISK_FAIL_FRACTION:
        yield fail("disk", text, hint, free=free, total=usage.total)
    elif free < DISK_WARN_BYTES or fraction < DISK_WARN_FRACTION:
        yield warn("disk", text, hint, free=free, total=usage.total)
    else:
        yield ok("disk", text, free=free, total=usage.total)
    stored = sum(_file_size(ctx.data_dir / n) for n in ("hub.db", "hub.db-wal"))
    if ctx.config.store.max_bytes > free + stored:
        yield warn("disk.store-cap",
                   f"store.max_bytes ({_size(ctx.config.store.max_bytes)}) is more than the "
                   f"store could ever use ({_size(free + stored)} free plus stored)",
                   "lower store.max_bytes below the free space, so the byte-cap policy "
                   "(not a full disk) decides what happens when the store fills")


def check_store(ctx: Context) -> Iterator[Finding]:
    for name in ("hub.db", "registry.db"):
        path = ctx.data_dir / name
        check = f"store.{name.removesuffix('.db')}"
        if not path.exists():
            yield (skip(check, f"{name} does not exist yet") if ctx.runtime is None else
                   fail(check, f"{path} is missing", "the hub creates it at start: restart it"))
            continue
        try:
            conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
            try:
                rows = conn.execute("PRAGMA quick_check").fetchall()
            finally:
                conn.close()
        except sqlite3.Error as exc:
            yield fail(check, f"cannot read {name}: {exc}",
                       "the file is damaged or not a database: stop the hub, keep a copy, and "
                       "see `gateway store inspect`; a support bundle helps")
            continue
        result = "; ".join(str(r[0]) for r in rows)
        if result != "ok":
            yield fail(check, f"{name} integrity check failed: {result[:200]}",
                       "stop the hub and keep a copy of the data directory before anything "
                       "else; sqlite3 hub.db '.recover' can save what is readable")
            continue
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            yield warn(check, f"{name} is intact but readable by others (mode {mode:o})",
                       f"chmod 600 {path}: it holds messages and keys")
        else:
            yield ok(check, f"{name} intact ({_size(_file_size(path))})")


def check_certificates(ctx: Context) -> Iterator[Finding]:
    now = datetime.fromtimestamp(ctx.now(), UTC)
    for name, what in (("ca.pem", "the hub's root CA"), ("server.pem", "the server certificate")):
        path = ctx.data_dir / name
        check = f"certificates.{name.removesuffix('.pem')}"
        if not path.exists():
            yield skip(check, f"{name} does not exist yet (made at the hub's first start)")
            continue
        try:
            cert = x509.load_pem_x509_certificate(path.read_bytes())
        except (OSError, ValueError) as exc:
            yield fail(check, f"cannot read {path}: {exc}",
                       "move the file away; the hub makes a new one at start (devices must "
                       "then trust the new CA)")
            continue
        yield _expiry(check, what, cert, now)
        if name == "server.pem":
            yield from _server_names(ctx, cert)


def _expiry(check: str, what: str, cert: x509.Certificate, now: datetime) -> Finding:
    not_after, not_before = cert.not_valid_after_utc, cert.not_valid_before_utc
    if now < not_before:
        return fail(check, f"{what} is not valid before {not_before:%Y-%m-%d %H:%M} UTC",
                    "the clock is behind: fix the time (see the clock check)")
    if now >= not_after:
        return fail(check, f"{what} expired on {not_after:%Y-%m-%d}",
                    "restart the hub: it renews its server certificate; an expired CA must be "
                    "replaced and handed to every device again", expires=not_after.isoformat())
    left = not_after - now
    if left < CERT_WARN:
        return warn(check, f"{what} expires in {left.days} days ({not_after:%Y-%m-%d})",
                    "restart the hub within that time: it renews the server certificate "
                    "30 days ahead", expires=not_after.isoformat())
    return ok(check, f"{what} valid until {not_after:%Y-%m-%d}", expires=not_after.isoformat())


def _server_names(ctx: Context, cert: x509.Certificate) -> Iterator[Finding]:
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return
    names = {n.lower() for n in sans.get_values_for_type(x509.DNSName)}
    wanted = [ctx.config.hub.host_name, *ctx.config.hub.aliases]
    missing = [n for n in wanted if n.lower() not in names]
    if missing:
        yield warn("certificates.names", f"the server certificate does not name {', '.join(missing)}",
                   "devices that dial that name will refuse the hub: restart it to reissue "
                   "the certificate for its current names")


def check_listeners(ctx: Context) -> Iterator[Finding]:
    mqtt, api = ctx.config.mqtt, ctx.config.api
    wanted = [("mqtt-tls", mqtt.bind, mqtt.tls_port), ("api", api.bind, api.port)]
    if mqtt.local_port:
        wanted.append(("mqtt-local", mqtt.local_bind, mqtt.local_port))
    if ctx.runtime is not None:
        seen = {"mqtt-tls": ctx.runtime.get("mqtt_tls_port"), "api": ctx.runtime.get("api_port"),
                "mqtt-local": ctx.runtime.get("mqtt_local_port")}
        for name, bind, _port in wanted:
            port = seen.get(name)
            if not port:
                continue
            host = _dial_address(bind)
            try:
                socket.create_connection((host, int(port)), timeout=3).close()
            except OSError as exc:
                yield fail(f"listeners.{name}", f"the hub does not answer on {host}:{port}: "
                           f"{exc.strerror or exc}",
                           "the hub may be wedged: systemctl restart gateway")
            else:
                yield ok(f"listeners.{name}", f"listening on {bind}:{port}")
        return
    for name, bind, port in wanted:  # the hub is not running: may it bind its ports?
        if port == 0:
            continue
        problem = _bind_problem(bind, port)
        if problem is None:
            yield ok(f"listeners.{name}", f"{bind}:{port} is free for the hub")
        elif problem == errno.EADDRINUSE:
            yield fail(f"listeners.{name}", f"{bind}:{port} is in use by another program",
                       f"find it with: ss -ltnp 'sport = :{port}' and stop it, or give the hub "
                       "another port in gateway.toml")
        elif problem == errno.EACCES:
            yield fail(f"listeners.{name}", f"not allowed to bind {bind}:{port}",
                       "ports below 1024 need CAP_NET_BIND_SERVICE (the systemd unit grants it)")
        else:
            yield fail(f"listeners.{name}", f"cannot bind {bind}:{port}: {os.strerror(problem)}",
                       "check the address exists on this machine (ip addr)")


def _dial_address(bind: str) -> str:
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(bind, bind)


def _bind_problem(bind: str, port: int) -> int | None:
    family = socket.AF_INET6 if ":" in bind else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((bind, port))
        except OSError as exc:
            return exc.errno or errno.EINVAL
    return None


def check_upstream(ctx: Context) -> Iterator[Finding]:
    if ctx.upstream is None:
        yield skip("upstream", "no upstream configured (this gateway is the top of its hierarchy)")
        return
    yield from probe(ctx.upstream)


def check_modules(ctx: Context) -> Iterator[Finding]:
    """Each configured bridge: connected, configuration accepted, and its hardware present."""
    if not ctx.config.modules:
        yield skip("modules", "no bridge modules configured")
        return
    if ctx.client is None or ctx.runtime is None:
        yield skip("modules", "the hub is not running: module states unknown")
        return
    device = str(ctx.runtime.get("device_id") or ctx.runtime.get("host_name"))
    for spec in ctx.config.modules:
        check = f"modules.{spec.name}"
        if not spec.enabled:
            yield skip(check, "disabled in gateway.toml")
            continue
        try:
            identity = ctx.client.request("GET", f"/devices/{device}/modules/{spec.name}")
            twin = ctx.client.request("GET", f"/twins/{device}/modules/{spec.name}")
        except GatewayError as exc:
            yield fail(check, f"cannot read module {spec.name}: {exc}",
                       "the supervisor creates bridge identities at start: restart the hub")
            continue
        desired = twin.get("properties", {}).get("desired", {})
        reported = twin.get("properties", {}).get("reported", {})
        config_error = (reported.get("config") or {}).get("error")
        if identity.get("connectionState") != "Connected":
            yield fail(check, f"{spec.bridge} bridge is not connected",
                       f"journalctl -u gateway MODULE_ID={spec.name} shows why it stopped; "
                       "the supervisor restarts it with backoff")
        elif config_error:
            yield fail(check, f"configuration refused: {config_error}",
                       f"fix the module twin's desired properties (gateway twin show {device} "
                       f"--module {spec.name})")
        else:
            yield ok(check, f"{spec.bridge} bridge connected, configuration applied")
        if spec.bridge in ("modbus", "serial"):
            yield from _serial_ports(ctx, spec.name, _configured_ports(spec.bridge, desired))
        elif spec.bridge == "ble":
            yield from _ble_adapter(ctx, spec.name)


def _configured_ports(bridge: str, desired: Mapping[str, Any]) -> dict[str, str]:
    """Serial device paths named in a bridge's desired properties, by bus or port name."""
    out: dict[str, str] = {}
    if bridge == "modbus":
        for name, bus in (desired.get("buses") or {}).items():
            serial = bus.get("serial") if isinstance(bus, dict) else None
            if isinstance(serial, dict) and isinstance(serial.get("port"), str):
                out[name] = serial["port"]
    else:
        for name, port in (desired.get("ports") or {}).items():
            if isinstance(port, dict) and isinstance(port.get("path"), str):
                out[name] = port["path"]
    return out


def _serial_ports(ctx: Context, module: str, ports: Mapping[str, str]) -> Iterator[Finding]:
    by_id = ctx.sys_root / "dev/serial/by-id"
    plugged = sorted(p.name for p in by_id.iterdir()) if by_id.is_dir() else []
    for name, path in ports.items():
        check = f"serial.{module}.{name}"
        device = Path(path)
        if not device.is_absolute():
            device = ctx.sys_root / path
        elif ctx.sys_root != Path("/"):
            device = ctx.sys_root / path.lstrip("/")
        if device.exists():
            target = os.path.realpath(device)
            yield ok(check, f"{path} present" + (f" ({target})" if target != str(device) else ""))
            continue
        hint = ("plug the adapter in, or choose the port again: "
                + (f"plugged in now: {', '.join(plugged)}" if plugged
                   else "no USB serial adapter is plugged in (ls -l /dev/serial/by-id)"))
        if device.is_symlink():
            yield fail(check, f"{path} points to {os.readlink(device)}, which is gone", hint)
        else:
            yield fail(check, f"{path} does not exist", hint, plugged=plugged)


def _ble_adapter(ctx: Context, module: str) -> Iterator[Finding]:
    base = ctx.sys_root / "sys/class/bluetooth"
    adapters = sorted(p.name for p in base.iterdir() if p.name.startswith("hci")) \
        if base.is_dir() else []
    if not adapters:
        yield fail(f"ble.{module}", "no Bluetooth adapter found",
                   "plug in a USB Bluetooth adapter, or enable the onboard one (on a Raspberry "
                   "Pi: bluez-firmware, and dtparam=krnbt=on)")
        return
    blocked = [a for a in adapters if _rfkill_blocked(ctx.sys_root, a)]
    if blocked:
        yield fail(f"ble.{module}", f"Bluetooth adapter {', '.join(blocked)} blocked by rfkill",
                   "rfkill unblock bluetooth")
        return
    yield ok(f"ble.{module}", f"Bluetooth adapter {', '.join(adapters)} present")


def _rfkill_blocked(root: Path, adapter: str) -> bool:
    for soft in (root / "sys/class/bluetooth" / adapter).glob("rfkill*/soft"):
        try:
            if soft.read_text().strip() == "1":
                return True
        except OSError:
            pass
    return False


CHECKS: tuple[Check, ...] = (check_hub, check_clock, check_disk, check_store,
                             check_certificates, check_listeners, check_modules, check_upstream)


def run_checks(ctx: Context, checks: tuple[Check, ...] = CHECKS) -> list[Finding]:
    findings: list[Finding] = []
    for check in checks:
        try:
            findings.extend(check(ctx))
        except Exception as exc:  # a broken check must not hide the others
            name = check.__name__.removeprefix("check_")
            findings.append(fail(name, f"the check itself failed: {type(exc).__name__}: {exc}",
                                 "please report this with a support bundle"))
    return findings


def read_runtime(data_dir: Path) -> dict[str, Any] | None:
    try:
        info = json.loads((data_dir / "hub.json").read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"  # pragma: no cover
