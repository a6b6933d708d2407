"""``gateway doctor``, ``gateway support-bundle`` and ``gateway store inspect|export``.

Commands a technician runs on the box itself: they read the data directory directly and ask the
running hub over its service API when it runs (they also work when it does not).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gateway.config import load_config
from gateway.errors import GatewayError

Add = Callable[..., argparse.ArgumentParser]


def _context(args: argparse.Namespace) -> Any:
    from gateway.doctor.checks import Context, read_runtime
    from gateway.hubclient import HubClient

    data_dir = _data_dir(args)
    config = load_config(data_dir, Path(args.config) if getattr(args, "config", None) else None)
    runtime = read_runtime(data_dir)
    client = None
    if runtime is not None:
        try:
            client = HubClient(data_dir)
        except GatewayError:
            client = None
    return Context(data_dir=data_dir, config=config, runtime=runtime, client=client,
                   upstream=_upstream_target(data_dir, config))


def _upstream_target(data_dir: Path, config: Any) -> Any:
    """The upstream link the doctor probes, as the forwarder would dial it (``gateway upstream
    set`` overrides ``[upstream]``); None when the gateway has no parent."""
    from gateway.doctor.probe import UpstreamTarget
    from gateway.upstream.settings import load

    settings = load(data_dir, config.upstream)
    if settings is None:
        return None
    return UpstreamTarget(
        host=settings.host or settings.hub, port=settings.port, hub_name=settings.hub,
        device_id=settings.device_id, key=settings.shared_access_key,
        cert=Path(settings.cert_file) if settings.cert_file else None,
        cert_key=Path(settings.key_file) if settings.key_file else None,
        ca_file=Path(settings.ca_file) if settings.ca_file else None)


def _data_dir(args: argparse.Namespace) -> Path:
    from gateway.cli import _data_dir as data_dir

    return data_dir(args)


def cmd_doctor(args: argparse.Namespace) -> int:
    from gateway.doctor.checks import run_checks
    from gateway.doctor.report import exit_status, render_json, render_text

    findings = run_checks(_context(args))
    if args.json:
        print(json.dumps(render_json(findings), indent=2))
    else:
        print(render_text(findings))
    return exit_status(findings)


def cmd_support_bundle(args: argparse.Namespace) -> int:
    from gateway.doctor.bundle import write_bundle

    out = Path(args.out or time.strftime("gateway-support-%Y%m%d-%H%M%S.tar.gz"))
    members = write_bundle(_context(args), out,
                           log_file=Path(args.log_file) if args.log_file else None)
    print(f"wrote {out} ({out.stat().st_size} bytes, {len(members)} files, secrets redacted)")
    return 0


def cmd_store(args: argparse.Namespace) -> int:
    from gateway import storetool

    data_dir = _data_dir(args)
    if args.store_command == "inspect":
        report = storetool.inspect(data_dir)
        if args.json:
            print(json.dumps(report, indent=2))
        else:
            print(_inspect_text(report))
        return 0
    out = open(args.out, "w", encoding="utf-8", newline="") if args.out else sys.stdout
    try:
        n = storetool.export(data_dir, args.device, out, fmt=args.format, module_id=args.module)
    finally:
        if args.out:
            out.close()
    print(f"exported {n} messages of {args.device}", file=sys.stderr)
    return 0


def _inspect_text(report: dict[str, Any]) -> str:
    lines = [f"data directory {report['dataDir']}"]
    for name, db in report["databases"].items():
        files = ", ".join(f"{f} {n} bytes" for f, n in db["files"].items())
        lines.append(f"{name}: {files}")
        for t in db["tables"]:
            size = f", {t['bytes']} bytes" if t.get("bytes") is not None else ""
            lines.append(f"  {t['name']:<24} {t['rows']:>10} rows{size}")
    log = report.get("log")
    if log:
        lines.append(f"log: {log['messages']} messages, {log['bytes']} bytes, "
                     f"seq {log['firstSeq']}..{log['lastSeq']}")
    for b in report.get("backlog", []):
        lines.append(f"  cursor {b['cursor']:<40} at {b['seq']:>10}, {b['behind']} behind "
                     f"({b['behindBytes']} bytes)")
    for q in report.get("c2d", []):
        lines.append(f"c2d queue {q['deviceId']}: {q['queued']} messages")
    return "\n".join(lines)


def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("doctor", parents=[common],
                       help="check the gateway (clock, disk, store, certificates, ports, "
                            "modules, upstream) and say how to fix what fails")
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.add_argument("--config", help="the gateway.toml to check (default: DATA_DIR/gateway.toml)")
    p.set_defaults(fn=cmd_doctor)
    p = sub.add_parser("support-bundle", parents=[common],
                       help="write a tar.gz with logs, configuration and figures, secrets redacted")
    p.add_argument("--out", help="the file to write (default: gateway-support-TIME.tar.gz)")
    p.add_argument("--log-file", help="the hub's log file, when it does not log to the journal")
    p.add_argument("--config", help="the gateway.toml (default: DATA_DIR/gateway.toml)")
    p.set_defaults(fn=cmd_support_bundle)
    store = sub.add_parser("store", help="look into the store (read-only)").add_subparsers(
        dest="store_command", required=True, metavar="COMMAND")
    p = store.add_parser("inspect", parents=[common],
                         help="tables, sizes, backlog behind every cursor, C2D queues")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_store)
    p = store.add_parser("export", parents=[common],
                         help="one device's stored messages as JSON lines or CSV")
    p.add_argument("--device", required=True)
    p.add_argument("--module")
    p.add_argument("--format", choices=["jsonl", "csv"], default="jsonl")
    p.add_argument("--out", help="the file to write (default: standard output)")
    p.set_defaults(fn=cmd_store)
