"""``gateway upstream``: set, show and clear the link to a parent hub, and watch it drain.

Every subcommand speaks to the running hub's service API (``/upstream``); a change applies at
once and survives restarts (README "Connect to a parent hub").
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from gateway.errors import GatewayError


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    group = sub.add_parser("upstream", help="the link to a parent hub (store-and-forward)")
    actions = group.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = actions.add_parser("set", parents=[common], help="set the parent and our identity there")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--connection-string", metavar="CS",
                     help="our device connection string at the parent")
    how.add_argument("--x509", nargs=2, metavar=("CERT", "KEY"),
                     help="our X.509 certificate and key (with --hub and --device, or with "
                          "--id-scope: a DPS X.509 enrollment)")
    how.add_argument("--group-key", metavar="KEY",
                     help="DPS group enrollment: the group key (with --id-scope, "
                          "--provisioning-host, --registration-id); the gateway registers now")
    p.add_argument("--hub", help="the parent's host name (X.509)")
    p.add_argument("--device", help="our device id at the parent (X.509)")
    p.add_argument("--id-scope", help="DPS: the provisioning service's ID scope")
    p.add_argument("--provisioning-host", help="DPS: the provisioning service's address")
    p.add_argument("--provisioning-port", type=int, help="DPS: its port (default 8883)")
    p.add_argument("--registration-id", help="DPS: our registration id (X.509: default the CN)")
    p.add_argument("--ca-file", help="the parent's CA certificate (PEM)")
    p.add_argument("--host", help="address to dial (default: GatewayHostName, else HostName)")
    p.add_argument("--port", type=int, help="port to dial (default 8883)")
    p.set_defaults(fn=cmd_upstream)
    for name, help_ in (("show", "print the settings in force (without the key)"),
                        ("clear", "remove the upstream link")):
        actions.add_parser(name, parents=[common], help=help_).set_defaults(fn=cmd_upstream)
    p = actions.add_parser("status", parents=[common], help="state, backlog and counters")
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.add_argument("--watch", action="store_true", help="a live progress bar of the backlog")
    p.add_argument("--interval", type=float, default=1.0, help=argparse.SUPPRESS)
    p.set_defaults(fn=cmd_upstream)


def _client(args: argparse.Namespace) -> Any:
    from gateway.cli import _client as client

    return client(args)


def cmd_upstream(args: argparse.Namespace) -> int:
    client = _client(args)
    if args.action == "set":
        body: dict[str, Any] = {"caFile": _abs(args.ca_file), "host": args.host, "port": args.port}
        if args.connection_string:
            body["connectionString"] = args.connection_string
        elif args.group_key or args.id_scope:  # gateway/upstream/enroll.py
            if not args.id_scope or not args.provisioning_host:
                raise GatewayError("a DPS enrollment needs --id-scope and --provisioning-host")
            body["enrollment"] = {
                "idScope": args.id_scope, "provisioningHost": args.provisioning_host,
                "provisioningPort": args.provisioning_port,
                "registrationId": args.registration_id, "groupKey": args.group_key,
                "x509": {"cert": _abs(args.x509[0]), "key": _abs(args.x509[1])}
                if args.x509 else None}
            body["enrollment"] = {k: v for k, v in body["enrollment"].items() if v is not None}
        else:
            if not args.hub or not args.device:
                raise GatewayError("--x509 needs --hub HOSTNAME and --device ID")
            body.update(x509={"cert": _abs(args.x509[0]), "key": _abs(args.x509[1])},
                        hub=args.hub, device=args.device)
        print(json.dumps(client.request("PUT", "/upstream", body, timeout=90), indent=2))
    elif args.action == "show":
        print(json.dumps(client.request("GET", "/upstream"), indent=2))
    elif args.action == "clear":
        client.request("DELETE", "/upstream")
    elif args.watch:
        return _watch(client, args.interval)
    else:
        status = client.request("GET", "/upstream/status")
        print(json.dumps(status) if args.json else _summary(status))
    return 0


def _abs(path: str | None) -> str | None:
    return str(Path(path).resolve()) if path else None


def _summary(s: dict[str, Any]) -> str:
    dropped = ", ".join(f"{k} {v}" for k, v in s["dropped"].items())
    lines = [f"{s['state']} since {s['since'] or '-'}"
             + (f"  (last error: {s['lastError']})" if s["lastError"] else ""),
             f"backlog {s['backlog']} messages, {s['backlogBytes']} bytes, "
             f"oldest {s['oldestAgeSeconds']:.0f} s; sent {s['sent']}; dropped: {dropped}"]
    for name, r in s["routes"].items():
        lines.append(f"  route {name}: backlog {r['backlog']} ({r['backlogBytes']} bytes), "
                     f"oldest {r['oldestAgeSeconds']:.0f} s, sent {r['sent']}"
                     + (f"; live-first, {r['lanes']} lanes, live lane {r['liveBacklog']}"
                        if "lanes" in r else ""))
    return "\n".join(lines)


def progress_line(status: dict[str, Any], peak: int, rate: float, width: int = 30) -> str:
    """One line: state, a bar of how much of the peak backlog has drained, rate, time left."""
    backlog = status["backlog"]
    done = 1.0 if peak <= 0 else max(0.0, min(1.0, 1 - backlog / peak))
    filled = int(round(done * width))
    left = f"{backlog / rate:.0f} s left" if rate > 0 and backlog else "-"
    return (f"{status['state']:<12} [{'#' * filled}{'.' * (width - filled)}] {done * 100:5.1f}% "
            f"backlog {backlog:>8}  {rate:8.0f} msg/s  {left}")


def _watch(client: Any, interval: float) -> int:
    peak = 0
    last: tuple[float, int] | None = None
    rate = 0.0
    tty = sys.stdout.isatty()
    try:
        while True:
            status = client.request("GET", "/upstream/status")
            now = time.monotonic()
            peak = max(peak, status["backlog"])
            if status["backlog"] == 0:
                peak = 0
            if last is not None and now > last[0]:
                instant = (status["sent"] - last[1]) / (now - last[0])
                rate = instant if rate == 0 else 0.7 * rate + 0.3 * instant
            last = (now, status["sent"])
            line = progress_line(status, peak, rate)
            print(("\r" + line) if tty else line, end="" if tty else "\n", flush=True)
            time.sleep(interval)
    except KeyboardInterrupt:
        if tty:
            print()
        return 0
