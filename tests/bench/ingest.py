#!/usr/bin/env python3
"""Durable QoS 1 ingest: our hub against Debian's Mosquitto, same machine, same generator.

Runs tests/bench/loadgen.py (or --loadgen PATH) first against a Mosquitto started here with its
defaults (as users run it), then against a hub started here (100 registered devices, one SAS
token each), and prints both rates, the ratio, broker CPU per message and publish-to-PUBACK
latency p50/p99. ``--mosquitto-tuned`` also runs Mosquitto with ``set_tcp_nodelay`` and prints
it beside (the ratio against the defaults stays the headline).

The hub acknowledges only after the SQLite group commit (synchronous=FULL by default: every
commit is fsynced); Mosquitto acknowledges from memory. Plain TCP is compared with plain TCP
(the hub's local listener, still authenticated) and, with --tls, TLS with TLS.

    python tests/bench/ingest.py                       # 100 conns x 100 in flight, 400k msgs
    python tests/bench/ingest.py --conns 1000 --window 1 --msgs 200000
    python tests/bench/ingest.py --tls --mosquitto-tuned
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.bench.peers import LOADGEN, loadgen_credentials, loadgen_path, start_mosquitto, tls_files
from tests.hubproc import HubProcess


def run_loadgen(loadgen: Path, args: argparse.Namespace, port: int, pid: int, label: str,
                extra: list[str]) -> dict[str, object]:
    cmd = [sys.executable, str(loadgen), "--port", str(port), "--conns", str(args.conns),
           "--window", str(args.window), "--msgs", str(args.msgs), "--qos", "1",
           "--payload-size", "200", "--broker-pid", str(pid), "--label", label, *extra]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
    lines = [l for l in out.stdout.splitlines() if l.startswith("{")]
    if not lines:
        raise SystemExit(f"loadgen failed for {label}:\n{out.stdout}\n{out.stderr}")
    return json.loads(lines[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--conns", type=int, default=100)
    ap.add_argument("--window", type=int, default=100)
    ap.add_argument("--msgs", type=int, default=400_000)
    ap.add_argument("--tls", action="store_true", help="compare over TLS instead of plain TCP")
    ap.add_argument("--sync", choices=["full", "normal"], default="full")
    ap.add_argument("--mosquitto-tuned", action="store_true",
                    help="also run Mosquitto with set_tcp_nodelay and show it beside")
    ap.add_argument("--loadgen", default=str(LOADGEN))
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args()
    loadgen = loadgen_path(args.loadgen)
    tmp = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    try:
        hub = HubProcess(tmp / "hub", host_name="bench.local", extra_config=f"[store]\nsync = \"{args.sync}\"\n", log_level="info")
        hub.start()
        cred_file = loadgen_credentials(hub.data_dir, "bench.local", args.conns,
                                        tmp / "creds.tsv")

        mosq_dir = Path(tempfile.mkdtemp(prefix="bench-ingest-mosquitto-"))  # not under tmp (0700)
        tls = tls_files(hub.data_dir, mosq_dir) if args.tls else None
        tls_args = ["--tls", "--ca-file", hub.ca_file, "--tls-server-name", "localhost"] if args.tls else []
        peers: dict[str, dict[str, object]] = {}
        for label, tuned in (("mosquitto", False), ("mosq-tuned", True)):
            if tuned and not args.mosquitto_tuned:
                continue
            mosq, mport = start_mosquitto(mosq_dir, tls, tuned=tuned)
            try:
                peers[label] = run_loadgen(loadgen, args, mport, mosq.pid, label, tls_args)
            finally:
                mosq.terminate()
                mosq.wait()
        m = peers["mosquitto"]
        hport = hub.port("mqtt_tls_port" if args.tls else "mqtt_local_port")
        h = run_loadgen(loadgen, args, hport, hub.pid, "hub", ["--cred-file", str(cred_file), *tls_args])
        hub.stop()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if "mosq_dir" in locals():
            shutil.rmtree(mosq_dir, ignore_errors=True)
    ratio = h["msgs_per_s"] / m["msgs_per_s"]  # type: ignore[operator]
    cpu_ratio = h["broker_cpu_us_per_msg"] / m["broker_cpu_us_per_msg"]  # type: ignore[operator]
    transport = "TLS" if args.tls else "TCP"
    print(f"durable QoS1 ingest, {args.conns} conns x {args.window} in flight, {args.msgs} msgs, "
          f"200-byte JSON, {transport}, hub store sync={args.sync}; mosquitto = its defaults"
          + (", mosq-tuned = with set_tcp_nodelay" if args.mosquitto_tuned else ""))
    print(f"{'':10} {'msg/s':>10} {'cpu us/msg':>11} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6}")
    for label, r in (*peers.items(), ("hub", h)):
        print(f"{label:10} {r['msgs_per_s']:>10,.0f} {r['broker_cpu_us_per_msg']:>11.2f} "
              f"{r['lat_p50_ms']:>8.2f} {r['lat_p99_ms']:>8.2f} {len(r['errors']):>6}")  # type: ignore[arg-type]
    print(f"ratio hub/mosquitto: rate {ratio:.2f}x, cpu per message {cpu_ratio:.2f}x")
    tuned_ratios = {}
    if "mosq-tuned" in peers:
        t = peers["mosq-tuned"]
        tuned_ratios = {"rate_ratio_tuned": h["msgs_per_s"] / t["msgs_per_s"],  # type: ignore[operator]
                        "cpu_ratio_tuned": h["broker_cpu_us_per_msg"] / t["broker_cpu_us_per_msg"]}  # type: ignore[operator]
        print(f"ratio hub/mosq-tuned: rate {tuned_ratios['rate_ratio_tuned']:.2f}x, "
              f"cpu per message {tuned_ratios['cpu_ratio_tuned']:.2f}x")
    if args.json_out:
        with open(args.json_out, "a") as fh:
            fh.write(json.dumps({"mosquitto": m, "hub": h, "rate_ratio": ratio, "cpu_ratio": cpu_ratio,
                                 **({"mosquitto_tuned": peers["mosq-tuned"], **tuned_ratios}
                                    if tuned_ratios else {})}) + "\n")


if __name__ == "__main__":
    main()
