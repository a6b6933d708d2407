#!/usr/bin/env python3
"""Where the microseconds of one durable QoS 1 telemetry message go, in a running hub.

Starts a hub (as tests/bench/ingest.py does), drives it with tests/bench/loadgen.py, samples it
with py-spy (``pip install py-spy``; it attaches to the hub's pid, so run as root or with
ptrace allowed) and reads each thread's CPU time from /proc. Each thread's samples are sorted
into the steps of the message's path by the innermost frame that names one, and the step's
share of that thread's samples is multiplied by the thread's CPU time per message:

    python tests/bench/budget.py                        # 100 conns x 100 in flight, TCP
    python tests/bench/budget.py --conns 1000 --window 1 --msgs 100000
    python tests/bench/budget.py --tls --json-out budget.jsonl

The figures are estimates: a sampling profiler attributes time spent in a system call to the
Python line that made it (``write`` of the PUBACK, the loop's own reads and epoll), and the
store thread's samples include its waits for the disk (scaled by its CPU time they are
counted as CPU). The sum of the steps is the measured CPU per message.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.bench.peers import LOADGEN, loadgen_credentials, loadgen_path  # noqa: E402
from tests.hubproc import HubProcess  # noqa: E402

# (step, frame patterns): the innermost frame matching a pattern decides the step; order
# matters only between patterns that can match the same frame.
MAIN_STEPS: list[tuple[str, tuple[str, ...]]] = [
    ("PUBACK write (send system call)", ("MqttConnection.flush (gateway/broker/connection.py",)),
    ("routing (route conditions)", ("Router.route", "_table (<route table>")),
    ("property bag, topic and identity check (once per topic)",
     ("Hub.prepare_publish", "Hub._prepare_telemetry", "decode_bag")),
    ("the stored record (telemetry_record, 256 KB check, Record)",
     ("Hub.telemetry_record", "new_record", "Hub.handle_publish")),
    ("store append, loop side (rows into the group-commit buffer)",
     ("MessageLog._enqueue", "MessageLog.append", "Hub.append", "MqttConnection._commit",
      "MqttConnection._queue_ack", "Database.submit", "ROW_OF")),
    ("commit delivery and PUBACK encoding",
     ("_WriteBody.settle", "MessageLog._committed", "_Commit.__call__", "_drain_acks",
      "ServerSession.ack_many", "encode_pubacks", "_deliver")),
    ("read: MQTT decode and session", ("ServerSession.receive", "Decoder.")),
    ("connection shell (data_received, dispatch)", ("MqttConnection.data_received",
                                                    "MqttConnection._on_publish")),
    ("connect, authenticate, disconnect",
     ("MqttConnection._on_connect", "MqttConnection.connection_lost", "connection_made",
      "Listener.", "_Counted.", "Broker.attach", "Broker.connection_")),
    ("logging", ("Logger.",)),
]
DB_STEPS: list[tuple[str, tuple[str, ...]]] = [
    ("store thread: INSERT (executemany)", ("insert (gateway/store/_log_sql.py",)),
    ("store thread: transaction, COMMIT and fsync", ("Database._transact",)),
]
LOOP = "event loop (uvloop: epoll, socket reads, callback dispatch)"
OTHER = "other"
_FRAME = re.compile(r"^(.*) \(([^()]*):(\d+)\)$")


def classify(stack: list[str], steps: list[tuple[str, tuple[str, ...]]], fallback: str) -> str:
    for frame in reversed(stack):
        for step, patterns in steps:
            if any(p in frame for p in patterns):
                return step
    return fallback


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds of each thread of ``pid``."""
    out = {}
    tick = os.sysconf("SC_CLK_TCK")
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        out[int(tid)] = (int(fields[11]) + int(fields[12])) / tick
    return out


def budget(raw: Path, main_us: float, db_us: float) -> dict[str, float]:
    main: Counter[str] = Counter()
    db: Counter[str] = Counter()
    for line in raw.read_text().splitlines():
        stack_text, _, count = line.rpartition(" ")
        stack = stack_text.split(";")
        n = int(count)
        if any("Database._main" in f for f in stack):
            db[classify(stack, DB_STEPS, "store thread: other")] += n
        elif any("Runner.run" in f for f in stack):
            step = classify(stack, MAIN_STEPS, OTHER)
            if step == OTHER and _FRAME.match(stack[-1]) and "runners.py" in stack[-1]:
                step = LOOP  # no Python frame below the loop: uvloop's own C code
            main[step] += n
    out: dict[str, float] = {}
    for counter, per_msg in ((main, main_us), (db, db_us)):
        total = sum(counter.values()) or 1
        for step, n in counter.most_common():
            out[step] = per_msg * n / total
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--conns", type=int, default=100)
    ap.add_argument("--window", type=int, default=100)
    ap.add_argument("--msgs", type=int, default=300_000)
    ap.add_argument("--tls", action="store_true")
    ap.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    ap.add_argument("--loadgen", default=str(LOADGEN))
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args()
    loadgen = loadgen_path(args.loadgen)
    spy_exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy_exe).exists():
        raise SystemExit("py-spy not found: pip install py-spy")
    tmp = Path(tempfile.mkdtemp(prefix="bench-budget-"))
    try:
        hub = HubProcess(tmp / "hub", host_name="bench.local", log_level="info",
                         extra_config='[store]\nsync = "full"\n')
        hub.start()
        creds = loadgen_credentials(hub.data_dir, "bench.local", args.conns, tmp / "creds.tsv")
        raw = tmp / "profile.txt"
        spy = subprocess.Popen([spy_exe, "record", "-p", str(hub.pid), "-o", str(raw), "-f", "raw",
                                "-r", str(args.rate), "--nonblocking"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)
        port = hub.port("mqtt_tls_port" if args.tls else "mqtt_local_port")
        tls = ["--tls", "--ca-file", hub.ca_file, "--tls-server-name", "localhost"] if args.tls else []
        before = thread_cpu(hub.pid)
        out = subprocess.run(
            [sys.executable, str(loadgen), "--port", str(port), "--conns", str(args.conns),
             "--window", str(args.window), "--msgs", str(args.msgs), "--qos", "1",
             "--payload-size", "200", "--broker-pid", str(hub.pid), "--label", "hub",
             "--cred-file", str(creds), *tls],
            capture_output=True, text=True, timeout=900, check=False)
        after = thread_cpu(hub.pid)
        spy.send_signal(2)
        spy.wait(timeout=60)
        lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
        if not lines:
            raise SystemExit(f"loadgen failed:\n{out.stdout}\n{out.stderr}")
        result = json.loads(lines[-1])
        used = {tid: after[tid] - before.get(tid, 0.0) for tid in after}
        main_tid = hub.pid
        main_us = used.pop(main_tid, 0.0) / args.msgs * 1e6
        db_us = max(used.values(), default=0.0) / args.msgs * 1e6  # the store thread is the busy one
        steps = budget(raw, main_us, db_us)
        hub.stop()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    transport = "TLS" if args.tls else "TCP"
    print(f"per-message budget, {args.conns} conns x {args.window} in flight, {transport}: "
          f"{result['msgs_per_s']:,.0f} msg/s, {main_us + db_us:.2f} us of CPU per message "
          f"(loop thread {main_us:.2f}, store thread {db_us:.2f}); load average "
          f"{os.getloadavg()[0]:.1f}")
    for step, us in steps.items():
        print(f"  {us:6.2f} us  {step}")
    if args.json_out:
        with open(args.json_out, "a") as fh:
            fh.write(json.dumps({"conns": args.conns, "window": args.window, "tls": args.tls,
                                 "msgs_per_s": result["msgs_per_s"], "main_us": main_us,
                                 "db_us": db_us, "steps": steps}) + "\n")


if __name__ == "__main__":
    main()
