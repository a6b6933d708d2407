#!/usr/bin/env python3
"""Store-and-forward drain: a backlog built at a child hub with its link down drains to the
parent when the link comes up.

1. A parent and a child hub, each on its own loopback address (127.0.6.1 and .2).
2. With the parent down, tests/bench/loadgen.py sends ``--msgs`` QoS 1 messages (200-byte
   bodies) to the child from ``--origins`` devices: the child's backlog.
3. The parent starts; the child drains its backlog over its one on-behalf-of connection.
   Printed: the drain rate, and its ratio to the parent's own QoS 1 ingest from the load
   generator with the same number of connections (1, window = the forwarder's) and with
   ``--origins`` connections.
4. During the drain a live device publishes ``--live-rate`` messages/s at the child; their
   latency to the parent's built-in endpoint (p50/p99) is printed.

    python tests/bench/upstream.py                  # 1,000,000 messages, 100 origins
    python tests/bench/upstream.py --msgs 200000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from gateway.hubclient import HubClient  # noqa: E402
from tests.bench.peers import LOADGEN, loadgen_credentials, loadgen_path  # noqa: E402
from tests.hubproc import HubProcess, create_device  # noqa: E402
from tests.upstream.federation import (  # noqa: E402
    CHILD_ADDRESS,
    PARENT_ADDRESS,
    free_port,
    link,
    status,
)
from tests.upstream.load import Device, run_device  # noqa: E402


def loadgen(path: Path, host: str, port: int, pid: int, conns: int, window: int, msgs: int,
            creds: Path, label: str) -> dict[str, object]:
    cmd = [sys.executable, str(path), "--host", host, "--port", str(port), "--conns", str(conns),
           "--window", str(window), "--msgs", str(msgs), "--qos", "1", "--payload-size", "200",
           "--broker-pid", str(pid), "--label", label, "--cred-file", str(creds),
           "--procs", "1" if conns < 2 else "2"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=False)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise SystemExit(f"loadgen failed for {label}:\n{out.stdout}\n{out.stderr}")
    return json.loads(lines[-1])


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(p * len(values)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--msgs", type=int, default=1_000_000)
    ap.add_argument("--origins", type=int, default=100)
    ap.add_argument("--window", type=int, default=512, help="the forwarder's QoS 1 window")
    ap.add_argument("--live-rate", type=float, default=20.0)
    ap.add_argument("--loadgen", default=str(LOADGEN))
    args = ap.parse_args()
    gen = loadgen_path(args.loadgen)
    tmp = Path(tempfile.mkdtemp(prefix="bench-upstream-"))
    parent_port = free_port(PARENT_ADDRESS)
    parent = HubProcess(tmp / "parent", host_name="parent.local", address=PARENT_ADDRESS,
                        tls_port=parent_port, log_level="warning")
    child = HubProcess(tmp / "child", host_name="child.local", address=CHILD_ADDRESS,
                       log_level="warning", extra_config=(
                           f"[upstream]\ngateway_inflight = {args.window}\n"
                           "reconnect_min = 0.2\nreconnect_max = 0.5\n"))
    try:
        parent.start()
        child.start()
        link(parent, child, port=parent_port)
        creds = loadgen_credentials(child.data_dir, "child.local", args.origins,
                                    tmp / "child-creds.tsv")
        live_info = create_device(child, "live-0")
        parent.stop()  # the link is down while the backlog builds
        print(f"building a backlog of {args.msgs:,} messages from {args.origins} origins ...",
              flush=True)
        built = loadgen(gen, CHILD_ADDRESS, child.port("mqtt_local_port"), child.pid,
                        args.origins, 100, args.msgs, creds, "child")
        backlog = status(child)["backlog"]
        print(f"  child ingest {built['msgs_per_s']:,.0f} msg/s; backlog {backlog:,}", flush=True)

        # a live device during the drain; its messages carry their send time
        lat: list[float] = []
        stop = asyncio.Event()
        live = Device("live-0", live_info["authentication"]["symmetricKey"]["primaryKey"])

        def live_thread() -> None:
            asyncio.run(run_device(live, "child.local", CHILD_ADDRESS,
                                   lambda: child.port("mqtt_local_port"), stop, count=10**9,
                                   rate=args.live_rate, window=5))

        t0 = time.monotonic()
        parent.start()
        sent_at: dict[int, float] = {}
        thread = threading.Thread(target=live_thread, daemon=True)
        thread.start()
        api = HubClient(parent.data_dir)
        reader = threading.Thread(target=_read_live, args=(api, lat, t0), daemon=True)
        reader.start()
        peak_rate = 0.0
        last = (time.monotonic(), 0)
        while True:
            s = status(child)
            now = time.monotonic()
            peak_rate = max(peak_rate, (s["sent"] - last[1]) / max(1e-6, now - last[0]))
            last = (now, s["sent"])
            if s["sent"] >= backlog:
                break
            if now - t0 > 3600:
                raise SystemExit("the drain took over an hour")
            time.sleep(0.5)
        drain_s = time.monotonic() - t0
        stop.set()
        drain_rate = backlog / drain_s
        del sent_at
        # the parent's own ingest with the same connection count, and with one per origin: a
        # fresh hub like the parent (the parent's dev-N are now the child's origins there)
        child.stop()
        parent.stop()
        fresh = HubProcess(tmp / "fresh", host_name="parent.local", address=PARENT_ADDRESS,
                           log_level="warning").start()
        try:
            pcreds = loadgen_credentials(fresh.data_dir, "parent.local", args.origins,
                                         tmp / "parent-creds.tsv")
            one = loadgen(gen, PARENT_ADDRESS, fresh.port("mqtt_local_port"), fresh.pid, 1,
                          args.window, min(args.msgs, 200_000), pcreds, "parent-1conn")
            many = loadgen(gen, PARENT_ADDRESS, fresh.port("mqtt_local_port"), fresh.pid,
                           args.origins, 100, min(args.msgs, 400_000), pcreds, "parent-many")
        finally:
            fresh.stop()
        lat_sorted = sorted(lat)
        result = {
            "backlog": backlog, "drain_s": round(drain_s, 1),
            "drain_msgs_per_s": round(drain_rate), "peak_msgs_per_s": round(peak_rate),
            "parent_ingest_1conn": one["msgs_per_s"], "parent_ingest_origins": many["msgs_per_s"],
            "ratio_1conn": round(drain_rate / float(str(one["msgs_per_s"])), 3),
            "ratio_origins": round(drain_rate / float(str(many["msgs_per_s"])), 3),
            "live_messages": len(lat_sorted),
            "live_p50_ms": round(pct(lat_sorted, 0.5) * 1000, 1),
            "live_p99_ms": round(pct(lat_sorted, 0.99) * 1000, 1),
        }
        print(json.dumps(result), flush=True)
        print(f"drain: {backlog:,} messages in {drain_s:.1f} s = {drain_rate:,.0f} msg/s "
              f"(peak {peak_rate:,.0f}); the parent's own QoS 1 ingest: "
              f"{one['msgs_per_s']:,.0f} msg/s over 1 connection (ratio "
              f"{result['ratio_1conn']}x), {many['msgs_per_s']:,.0f} msg/s over "
              f"{args.origins} (ratio {result['ratio_origins']}x); live lane during the drain: "
              f"p50 {result['live_p50_ms']} ms, p99 {result['live_p99_ms']} ms "
              f"({len(lat_sorted)} messages)")
    finally:
        child.stop()
        parent.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def _read_live(api: HubClient, lat: list[float], t0: float) -> None:
    """Latency of the live device's messages: enqueued at the child -> stored at the parent."""
    try:
        for event in api.stream("/messages/events", {"consumerGroup": "bench", "start": "latest",
                                                     "deviceId": "live-0"}):
            e = event.get("event", event)
            a = e.get("annotations", {})
            # the child's enqueued time travels as the creation of the message at the child
            arrived = a.get("iothub-enqueuedtime")
            sent = e.get("payload", {}).get("t") if isinstance(e.get("payload"), dict) else None
            if arrived and sent:
                lat.append(arrived / 1000 - sent)
    except Exception:  # noqa: BLE001 - the hub stopped
        return


if __name__ == "__main__":
    main()
