"""``gateway support-bundle``: one tar.gz a technician can hand over, with no secret in it.

It holds the doctor's findings, the store's figures (``gateway store inspect``), the
configuration, the runtime file, the identities and module twins as the service API shows them,
the hub's recent log (the journal under systemd, or a log file), and version information. Every
value whose key names a secret (keys, passwords, tokens, connection strings, signatures) is
replaced by ``"<redacted>"``, and secrets inside text (``SharedAccessKey=...``, ``sig=...``) are
cut out, before anything is written.
"""

from __future__ import annotations

import io
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from gateway import storetool
from gateway.doctor.checks import ApiClient, Context, run_checks
from gateway.doctor.report import render_json, render_text
from gateway.errors import GatewayError

REDACTED = "<redacted>"
_SECRET_KEY = re.compile(
    r"(key|password|passwd|secret|token|signature|connection_?string|bindkey|sas)$",
    re.IGNORECASE)
_SECRET_TEXT = re.compile(
    r"(SharedAccessKey=|SharedAccessSignature[= ]|sig=|password\s*=\s*|"
    r"connection_string\s*=\s*|key\s*=\s*)(\"?)[^;&\s\"]+", re.IGNORECASE)
_PEM_KEY = re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?-----END [A-Z ]*PRIVATE KEY-----",
                      re.DOTALL)


def redact(value: Any) -> Any:
    """A copy of a JSON value with secrets replaced (by key name, and inside strings)."""
    if isinstance(value, Mapping):
        return {k: (REDACTED if _SECRET_KEY.search(str(k)) and v not in (None, "", {})
                    else redact(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    if isinstance(value, str):
        return redact_text(value)
    return value


def redact_text(text: str) -> str:
    text = _PEM_KEY.sub(REDACTED, text)
    return _SECRET_TEXT.sub(lambda m: m.group(1) + m.group(2) + REDACTED, text)


def journal(unit: str = "gateway", lines: int = 5000) -> str | None:
    if shutil.which("journalctl") is None:
        return None
    try:
        out = subprocess.run(["journalctl", "-u", unit, "--no-pager", "-n", str(lines),
                              "-o", "short-iso"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 and out.stdout.strip() else None


def write_bundle(ctx: Context, out: Path, *, log_file: Path | None = None,
                 journal_reader: Callable[[], str | None] = journal) -> list[str]:
    """Write the bundle to ``out`` (mode 0600); returns the member names."""
    members: dict[str, bytes] = {}

    def add_json(name: str, value: Any) -> None:
        members[name] = (json.dumps(redact(value), indent=2, default=str) + "\n").encode()

    findings = run_checks(ctx)
    add_json("doctor.json", render_json(findings))
    members["doctor.txt"] = (redact_text(render_text(findings)) + "\n").encode()
    try:
        add_json("store.json", storetool.inspect(ctx.data_dir))
    except GatewayError as exc:
        add_json("store.json", {"error": str(exc)})
    for name in ("gateway.toml",):
        path = ctx.data_dir / name
        if path.exists():
            members[f"config/{name}"] = redact_text(path.read_text(errors="replace")).encode()
    if ctx.runtime is not None:
        add_json("hub.json", ctx.runtime)
    add_json("config/effective.json", _config_view(ctx))
    if ctx.client is not None:
        add_json("identities.json", _identities(ctx.client, ctx.runtime or {}))
    text = journal_reader()
    if text is None and log_file is not None and log_file.exists():
        text = log_file.read_text(errors="replace")[-4_000_000:]
    if text is not None:
        members["logs/gateway.log"] = redact_text(text).encode()
    add_json("version.json", {
        "python": sys.version, "platform": platform.platform(), "machine": platform.machine(),
        "gateway": _version(), "createdAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    })
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as raw, tarfile.open(fileobj=raw, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(f"support-bundle/{name}")
            info.size, info.mtime, info.mode = len(data), int(time.time()), 0o600
            tar.addfile(info, io.BytesIO(data))
    return list(members)


def _config_view(ctx: Context) -> dict[str, Any]:
    import dataclasses

    view = dataclasses.asdict(ctx.config)
    view["data_dir"] = str(ctx.config.data_dir)
    return view


def _identities(client: ApiClient, runtime: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    try:
        out["devices"] = client.request("GET", "/devices")
        device = str(runtime.get("device_id") or runtime.get("host_name") or "")
        if device:
            modules = client.request("GET", f"/devices/{device}/modules") or []
            out["gatewayModules"] = modules
            out["moduleTwins"] = {
                m["moduleId"]: client.request("GET", f"/twins/{device}/modules/{m['moduleId']}")
                for m in modules if isinstance(m, dict) and "moduleId" in m}
    except GatewayError as exc:
        out["error"] = str(exc)
    return out


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("edge-gateway")
    except Exception:  # not installed as a distribution (running from a checkout)
        return "unknown"
