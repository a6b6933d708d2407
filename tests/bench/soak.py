#!/usr/bin/env python3
"""Memory under sustained load and connection churn: our hub against Debian's Mosquitto.

Users of comparable gateways report memory that climbs until the box falls over (peers.md §3,
theme 4). This runs the same workload against both brokers, same machine, same generator
(tests/bench/loadgen.py):

1. **Idle connections**, on the fresh broker: ``--idle-conns`` connections held open for a
   few seconds; resident memory per connection.
2. **Churn**: ``--rounds`` rounds back to back; in each, ``--conns`` devices connect, publish
   ``--msgs`` QoS 1 messages in all (200-byte JSON, ``--window`` in flight each) and
   disconnect. The broker's resident memory is read after every round. Reported: the first
   and last round, the peak, and the growth per round from round 2 on (least squares;
   round 1 includes warm-up such as the allocator's first arenas and SQLite's page cache).

The hub stores and fsyncs every message (its store grows on disk: that is retention's job,
not memory's); Mosquitto keeps nothing.

    python tests/bench/soak.py
    python tests/bench/soak.py --rounds 60 --msgs 200000 --conns 500
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.bench.peers import LOADGEN, loadgen_credentials, loadgen_path, start_mosquitto
from tests.hubproc import HubProcess

HOST = "bench.local"


def loadgen(path: Path, port: int, pid: int, label: str, *extra: str) -> dict[str, Any]:
    cmd = [sys.executable, str(path), "--port", str(port), "--broker-pid", str(pid),
           "--label", label, "--payload-size", "200", "--no-latency", *extra]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise SystemExit(f"loadgen failed for {label}:\n{out.stdout}\n{out.stderr}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def slope(values: list[float]) -> float:
    """Least-squares growth per step."""
    n = len(values)
    if n < 2:
        return 0.0
    mean_x, mean_y = (n - 1) / 2, sum(values) / n
    num = sum((i - mean_x) * (v - mean_y) for i, v in enumerate(values))
    den = sum((i - mean_x) ** 2 for i in range(n))
    return num / den


def soak(path: Path, port: int, pid: int, label: str, args: argparse.Namespace,
         creds: list[str]) -> dict[str, Any]:
    idle = loadgen(path, port, pid, label, "--conns", str(args.idle_conns), "--msgs", "0",
                   "--hold", "3", *creds)  # first, on a fresh broker
    rss: list[float] = []
    errors = 0
    started = time.monotonic()
    for r in range(args.rounds):
        res = loadgen(path, port, pid, label, "--conns", str(args.conns), "--msgs",
                      str(args.msgs), "--qos", "1", "--window", str(args.window), *creds)
        rss.append(float(res["broker_rss_end_mb"]))
        errors += len(res["errors"])
        print(f"  {label} round {r + 1}/{args.rounds}: {res['msgs_per_s']:,.0f} msg/s, "
              f"RSS {rss[-1]:.1f} MB", flush=True)
    return {"rss": rss, "errors": errors, "seconds": time.monotonic() - started,
            "growth_mb_per_round": slope(rss[1:]), "peak": max(rss),
            "idle_kb_per_conn": idle.get("broker_rss_per_conn_kb")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--msgs", type=int, default=100_000, help="messages per round")
    ap.add_argument("--conns", type=int, default=200, help="devices per round")
    ap.add_argument("--window", type=int, default=20)
    ap.add_argument("--idle-conns", type=int, default=1000)
    ap.add_argument("--loadgen", default=str(LOADGEN))
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args()
    path = loadgen_path(args.loadgen)
    devices = max(args.conns, args.idle_conns)
    tmp = Path(tempfile.mkdtemp(prefix="bench-soak-"))
    mosq_dir = Path(tempfile.mkdtemp(prefix="bench-soak-mosquitto-"))
    try:
        mosq, mport = start_mosquitto(mosq_dir, None)
        try:
            m = soak(path, mport, mosq.pid, "mosquitto", args, [])
        finally:
            mosq.terminate()
            mosq.wait()
        hub = HubProcess(tmp / "hub", host_name=HOST, log_level="warning").start()
        try:
            cred_file = loadgen_credentials(hub.data_dir, HOST, devices, tmp / "creds.tsv")
            h = soak(path, hub.port("mqtt_local_port"), hub.pid, "hub", args,
                     ["--cred-file", str(cred_file)])
        finally:
            hub.stop()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(mosq_dir, ignore_errors=True)
    total = args.rounds * args.msgs
    print(f"\nsoak: {args.rounds} rounds x ({args.conns} devices connect, {args.msgs:,} QoS 1 "
          f"messages, disconnect) = {total:,} messages, after {args.idle_conns} idle "
          f"connections; TCP")
    print(f"{'':10} {'round 1 MB':>10} {'last MB':>8} {'peak MB':>8} {'MB/round':>9} "
          f"{'idle KB/conn':>12} {'errors':>6}")
    for label, r in (("mosquitto", m), ("hub", h)):
        print(f"{label:10} {r['rss'][0]:>10.1f} {r['rss'][-1]:>8.1f} {r['peak']:>8.1f} "
              f"{r['growth_mb_per_round']:>9.3f} {r['idle_kb_per_conn'] or 0:>12.1f} "
              f"{r['errors']:>6}")
    if args.json_out:
        with open(args.json_out, "a") as fh:
            fh.write(json.dumps({"mosquitto": m, "hub": h, "args": vars(args)}) + "\n")


if __name__ == "__main__":
    main()
