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
4. The live lane: the origins are split over two upstream routes, ``lane`` (even device
   numbers, ``liveFirst``) and ``plain`` (odd, without it); during the drain a live device on
   each (``live-0`` and ``live-1``) publishes ``--live-rate`` messages/s at the child. The
   end-to-end latency of each (the device's send time to the parent's enqueued time) is
   printed, p50/p99: with the lane and without it, from the same run.

    python tests/bench/upstream.py                  # 1,000,000 messages, 100 origins
    python tests/bench/upstream.py --msgs 200000
    python tests/bench/upstream.py --msgs 200000 --profile   # + where each side's CPU goes

``--profile`` samples both hubs with py-spy from the parent's start to the end of the drain
and prints, per side and thread, the CPU per forwarded message by the innermost function of
the project that was running (as tests/bench/budget.py does for ingest).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

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
    ap.add_argument("--window", type=int, default=1024, help="the forwarder's QoS 1 window")
    ap.add_argument("--live-rate", type=float, default=20.0)
    ap.add_argument("--pack", action="store_true",
                    help="[upstream] pack = true: the backlog goes up in packs of <= 4 KB")
    ap.add_argument("--loadgen", default=str(LOADGEN))
    ap.add_argument("--profile", action="store_true",
                    help="sample both hubs with py-spy during the drain (CPU per function)")
    ap.add_argument("--profile-top", type=int, default=18)
    args = ap.parse_args()
    gen = loadgen_path(args.loadgen)
    tmp = Path(tempfile.mkdtemp(prefix="bench-upstream-"))
    parent_port = free_port(PARENT_ADDRESS)
    parent = HubProcess(tmp / "parent", host_name="parent.local", address=PARENT_ADDRESS,
                        tls_port=parent_port, log_level="warning")
    child = HubProcess(tmp / "child", host_name="child.local", address=CHILD_ADDRESS,
                       log_level="warning", extra_config=(
                           f"[upstream]\ngateway_inflight = {args.window}\n"
                           f"pack = {'true' if args.pack else 'false'}\n"
                           "reconnect_min = 0.2\nreconnect_max = 0.5\n"))
    try:
        parent.start()
        child.start()
        link(parent, child, port=parent_port)
        creds = loadgen_credentials(child.data_dir, "child.local", args.origins,
                                    tmp / "child-creds.tsv")
        live_info = {name: create_device(child, name) for name in ("live-0", "live-1")}
        even = " OR ".join(f"ENDS_WITH($connectionDeviceId, '{d}')" for d in "02468")
        child.cli("route", "create", "lane", "--endpoint", "$upstream", "--live-first",
                  "--condition", even)
        child.cli("route", "create", "plain", "--endpoint", "$upstream", "--condition",
                  f"NOT ({even})")
        parent.stop()  # the link is down while the backlog builds
        print(f"building a backlog of {args.msgs:,} messages from {args.origins} origins ...",
              flush=True)
        built = loadgen(gen, CHILD_ADDRESS, child.port("mqtt_local_port"), child.pid,
                        args.origins, 100, args.msgs, creds, "child")
        backlog = status(child)["backlog"]
        print(f"  child ingest {built['msgs_per_s']:,.0f} msg/s; backlog {backlog:,}", flush=True)

        # a live device on each route during the drain; its messages carry their send time
        lats: dict[str, list[tuple[float, float]]] = {"live-0": [], "live-1": []}
        stop = asyncio.Event()
        lives = [Device(name, info["authentication"]["symmetricKey"]["primaryKey"])
                 for name, info in live_info.items()]

        def live_thread() -> None:
            async def both() -> None:
                await asyncio.gather(*(run_device(
                    d, "child.local", CHILD_ADDRESS, lambda: child.port("mqtt_local_port"),
                    stop, count=10**9, rate=args.live_rate, window=5) for d in lives))
            asyncio.run(both())

        t0 = time.monotonic()
        parent.start()
        spies = _spy_start(tmp, {"child": child.pid, "parent": parent.pid}) if args.profile \
            else {}
        sent_at: dict[int, float] = {}
        thread = threading.Thread(target=live_thread, daemon=True)
        thread.start()
        readers = [threading.Thread(target=_read_live, args=(HubClient(parent.data_dir), lat,
                                                              name), daemon=True)
                   for name, lat in lats.items()]
        for reader in readers:
            reader.start()
        peak_rate = 0.0
        last = (time.monotonic(), 0)
        samples: list[tuple[float, int]] = []
        connected_at: float | None = None
        connected_wall = time.time()
        cpu0 = (0.0, 0.0, 0)
        while True:
            s = status(child)
            now = time.monotonic()
            if connected_at is None and s["state"] == "connected":
                connected_at = now
                connected_wall = time.time()
                cpu0 = (_cpu(child.pid), _cpu(parent.pid), s["sent"])
            samples.append((now - t0, s["sent"]))
            peak_rate = max(peak_rate, (s["sent"] - last[1]) / max(1e-6, now - last[0]))
            last = (now, s["sent"])
            if s["sent"] >= backlog:
                break
            if now - t0 > 3600:
                raise SystemExit("the drain took over an hour")
            time.sleep(0.5)
        drain_s = time.monotonic() - t0
        up_s = time.monotonic() - (connected_at or t0)  # at the end of the drain, not after
        drained_wall = time.time()
        cpu1 = (_cpu(child.pid), _cpu(parent.pid), s["sent"])
        profile = _spy_stop(spies, s["sent"], args.profile_top) if spies else ""
        stop.set()
        # what the live devices sent last waits behind the plain route's backlog: let it in
        settle = time.monotonic() + 120
        while status(child)["backlog"] and time.monotonic() < settle:
            time.sleep(0.5)
        time.sleep(2.0)
        packed = s.get("packed", {"messages": 0, "readings": 0})
        billed = _billed(parent)
        commits = {"child": _commits(child), "parent": _commits(parent)}
        drain_rate = backlog / drain_s
        linked_rate = backlog / up_s
        # the steady rate: from 10 % to 90 % of the backlog sent
        t10 = next(t for t, n in samples if n >= backlog * 0.1)
        n10 = next(n for t, n in samples if n >= backlog * 0.1)
        t90 = next(t for t, n in samples if n >= backlog * 0.9)
        n90 = next(n for t, n in samples if n >= backlog * 0.9)
        steady_rate = (n90 - n10) / max(1e-6, t90 - t10)
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
        # sent during the drain: after the link came up, before the backlog was through
        lat_sorted, plain_sorted = (
            sorted(lat for sent, lat in lats[name] if connected_wall <= sent <= drained_wall)
            for name in ("live-0", "live-1"))
        # CPU per forwarded message on each side (from the link up): what the drain would be
        # with a core per hub, against the parent's own CPU per ingested message
        moved = max(1, cpu1[2] - cpu0[2])
        child_us = 1e6 * (cpu1[0] - cpu0[0]) / moved
        parent_us = 1e6 * (cpu1[1] - cpu0[1]) / moved
        ingest_us = float(str(one.get("broker_cpu_us_per_msg") or "nan"))
        result = {
            "backlog": backlog, "drain_s": round(drain_s, 1),
            "drain_msgs_per_s": round(drain_rate), "peak_msgs_per_s": round(peak_rate),
            "connected_after_s": round((connected_at or t0) - t0, 1),
            "linked_msgs_per_s": round(linked_rate), "steady_msgs_per_s": round(steady_rate),
            "ratio_linked_1conn": round(linked_rate / float(str(one["msgs_per_s"])), 3),
            "ratio_steady_1conn": round(steady_rate / float(str(one["msgs_per_s"])), 3),
            "timeline": [(round(t, 1), n) for t, n in samples[::max(1, len(samples) // 30)]],
            "parent_ingest_1conn": one["msgs_per_s"], "parent_ingest_origins": many["msgs_per_s"],
            "ratio_1conn": round(drain_rate / float(str(one["msgs_per_s"])), 3),
            "ratio_origins": round(drain_rate / float(str(many["msgs_per_s"])), 3),
            "child_cpu_us_per_msg": round(child_us, 1),
            "parent_cpu_us_per_msg": round(parent_us, 1),
            "parent_ingest_cpu_us_per_msg_1conn": ingest_us,
            "ratio_cpu": round(ingest_us / max(child_us, parent_us), 3),
            "pack": args.pack, "packs": packed["messages"], "packed_readings": packed["readings"],
            "billed_at_parent": billed, "readings_sent": s["sent"],
            "load_average": _load(),
            "commits": commits,
            "live_messages": len(lat_sorted),
            "live_p50_ms": round(pct(lat_sorted, 0.5) * 1000, 1),
            "live_p99_ms": round(pct(lat_sorted, 0.99) * 1000, 1),
            "live_sent_in_all": lives[0].next - 1,
            "no_lane_messages": len(plain_sorted),
            "no_lane_p50_ms": round(pct(plain_sorted, 0.5) * 1000, 1),
            "no_lane_p99_ms": round(pct(plain_sorted, 0.99) * 1000, 1),
            "no_lane_sent_in_all": lives[1].next - 1,
        }
        print(json.dumps(result), flush=True)
        print(f"drain: {backlog:,} messages in {drain_s:.1f} s from the parent's start = "
              f"{drain_rate:,.0f} msg/s; {linked_rate:,.0f} msg/s from the link up "
              f"({result['ratio_linked_1conn']}x), steady (10-90 %) {steady_rate:,.0f} msg/s "
              f"({result['ratio_steady_1conn']}x); load average {_load()}")
        print(f"CPU per message: child {child_us:.1f} us, parent {parent_us:.1f} us; the "
              f"parent's own QoS 1 ingest {ingest_us:.1f} us (CPU ratio {result['ratio_cpu']}x)")
        print(f"billed at the parent: {billed:,.0f} messages for {s['sent']:,} readings "
              f"({packed['messages']:,} packs holding {packed['readings']:,})")
        print(f"drain: {backlog:,} messages in {drain_s:.1f} s = {drain_rate:,.0f} msg/s "
              f"(peak {peak_rate:,.0f}); the parent's own QoS 1 ingest: "
              f"{one['msgs_per_s']:,.0f} msg/s over 1 connection (ratio "
              f"{result['ratio_1conn']}x), {many['msgs_per_s']:,.0f} msg/s over "
              f"{args.origins} (ratio {result['ratio_origins']}x)")
        print(f"p99 latency of the live lane during the drain: {result['live_p99_ms']:,} ms "
              f"(p50 {result['live_p50_ms']:,} ms, {len(lat_sorted)} messages sent from the "
              f"link up to the end of the drain, route with liveFirst); without the lane: p99 "
              f"{result['no_lane_p99_ms']:,} ms (p50 {result['no_lane_p50_ms']:,} ms, "
              f"{len(plain_sorted)} messages, the same run)")
        for side, (count, seconds) in commits.items():
            print(f"{side}: {count:,.0f} group commits since its start, "
                  f"{seconds * 1e3 / max(1, count):.2f} ms each")
        if profile:
            print(profile)
    finally:
        child.stop()
        parent.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def _spy_start(tmp: Path, pids: dict[str, int]) -> dict[str, Any]:
    """py-spy on each hub (raw stacks, with thread ids) and each thread's CPU at the start."""
    from tests.bench.budget import thread_cpu
    exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    spies: dict[str, Any] = {}
    for name, pid in pids.items():
        raw = tmp / f"{name}.spy"
        proc = subprocess.Popen([exe, "record", "-p", str(pid), "-o", str(raw), "-f", "raw",
                                 "-r", "200", "--nonblocking", "--threads"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        spies[name] = (proc, raw, pid, thread_cpu(pid))
    return spies


def _spy_stop(spies: dict[str, Any], moved: int, top: int) -> str:
    """Stop the samplers; per side and thread, CPU per message split by the innermost
    ``gateway/`` function of each sample (its share of that thread's samples)."""
    from tests.bench.budget import thread_cpu
    out = []
    for name, (proc, raw, pid, before) in spies.items():
        after = thread_cpu(pid)
        proc.send_signal(2)
        proc.wait(timeout=60)
        per_thread: dict[str, Counter[str]] = {}
        for line in raw.read_text().splitlines() if raw.exists() else []:
            stack_text, _, count = line.rpartition(" ")
            frames = stack_text.split(";")
            thread = "store" if any("Database._main" in f for f in frames) else "loop"
            inner = next((f for f in reversed(frames) if "gateway/" in f), frames[-1])
            fn = re.sub(r" \((.*):\d+\)$", r" (\1)", inner)
            per_thread.setdefault(thread, Counter())[fn] += int(count)
        # the loop thread is the process's own pid; the busiest other one is the store's
        cpu = {"loop": after.get(pid, 0.0) - before.get(pid, 0.0),
               "store": max((after[t] - before.get(t, 0.0) for t in after if t != pid),
                            default=0.0)}
        for thread, counter in sorted(per_thread.items()):
            total = sum(counter.values()) or 1
            us = 1e6 * cpu[thread] / max(1, moved)
            out.append(f"{name} {thread} thread: {us:.1f} us per message")
            for fn, n in counter.most_common(top):
                out.append(f"  {us * n / total:6.2f} us  {fn}")
    return "\n".join(out)


def _billed(hub: HubProcess) -> float:
    """The parent's ``gateway_telemetry_billed_messages`` (a pack counts once)."""
    from prometheus_client.parser import text_string_to_metric_families
    with HubClient(hub.data_dir)._open("GET", "/metrics") as response:
        text = response.read().decode()
    return next(s.value for f in text_string_to_metric_families(text) for s in f.samples
                if s.name.startswith("gateway_telemetry_billed_messages"))


def _commits(hub: HubProcess) -> tuple[float, float]:
    """The hub's group commits since its start and the seconds they took."""
    from prometheus_client.parser import text_string_to_metric_families
    with HubClient(hub.data_dir)._open("GET", "/metrics") as response:
        text = response.read().decode()
    found = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples
             if s.name.startswith("gateway_store_commit_seconds")}
    return found.get("gateway_store_commit_seconds_count", 0.0), \
        found.get("gateway_store_commit_seconds_sum", 0.0)


def _cpu(pid: int) -> float:
    """utime + stime of ``pid`` in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _load() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def _read_live(api: HubClient, lat: list[tuple[float, float]], device: str) -> None:
    """Latency of a live device's messages: sent by the device -> enqueued at the parent."""
    try:
        for event in api.stream("/messages/events", {"consumerGroup": f"bench-{device}",
                                                     "start": "latest", "deviceId": device}):
            e = event.get("event", event)
            a = e.get("annotations", {})
            # the child's enqueued time travels as the creation of the message at the child
            arrived = a.get("iothub-enqueuedtime")
            sent = e.get("payload", {}).get("t") if isinstance(e.get("payload"), dict) else None
            if arrived and sent:
                lat.append((sent, arrived / 1000 - sent))
    except Exception:  # noqa: BLE001 - the hub stopped
        return


if __name__ == "__main__":
    main()
