#!/usr/bin/env python3
"""The mqtt endpoint's delivery rate into Mosquitto against the load generator publishing into
the same Mosquitto (one run; the machine is shared, so read the ratio, not the rates).

Both sides publish QoS 1 on one connection with the same window of PUBLISHes awaiting PUBACK
(``--window``, the endpoint's ``maxInflight``), ~200-byte JSON bodies from ``--devices``
devices. The endpoint drains ``--msgs`` messages already committed to a message log (as after
an outage) and the clock runs until its cursor has passed the last one, i.e. until every
PUBACK came back and the cursor was stored.

    python tests/bench/mqtt_endpoint.py                 # 50k messages, window 16
    python tests/bench/mqtt_endpoint.py --envelope json --window 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from gateway.endpoints.manager import EndpointManager  # noqa: E402
from gateway.endpoints.spec import parse_endpoint  # noqa: E402
from gateway.hub.messages import props_json  # noqa: E402
from gateway.store import Database, MessageLog, Record  # noqa: E402
from tests.bench.peers import HOST, LOADGEN, loadgen_path, start_mosquitto  # noqa: E402


def run_loadgen(loadgen: Path, port: int, pid: int,
                args: argparse.Namespace) -> tuple[float, float]:
    cmd = [sys.executable, str(loadgen), "--host", HOST, "--port", str(port), "--conns", "1",
           "--procs", "1", "--window", str(args.window), "--msgs", str(args.msgs), "--qos", "1",
           "--payload-size", "200", "--broker-pid", str(pid), "--label", "loadgen"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise SystemExit(f"loadgen failed:\n{out.stdout}\n{out.stderr}")
    result = json.loads(lines[-1])
    return float(result["msgs_per_s"]), float(result["gen_cpu_us_per_msg"])


def records(count: int, devices: int) -> list[Record]:
    out = []
    for i in range(count):
        device = f"dev-{i % devices}"
        system = {"message-id": f"m{i}", "content-type": "application/json",
                  "content-encoding": "utf-8", "iothub-connection-device-id": device,
                  "iothub-enqueuedtime": "2026-12-01T10:00:00.0000000Z"}
        body = json.dumps({"deviceId": device, "seq": i, "temperature": 21.53,
                           "humidity": 45.21, "pressure": 1013.25, "pad": "x" * 80}).encode()
        out.append(Record("telemetry", device, None, 1_764_583_200_000 + i,
                          props_json(system, {"i": str(i)}), body))
    return out


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)  # the loop and the store's thread
    return usage.ru_utime + usage.ru_stime


async def endpoint_rate(work: Path, port: int, args: argparse.Namespace) -> tuple[float, float]:
    db = Database(str(work / "hub.db"), synchronous="full")
    await db.open()
    log = MessageLog(db)
    await log.open()
    manager = EndpointManager(log, hub_name="bench", data_dir=work)
    spec = parse_endpoint("bench", {"type": "mqtt", "url": f"mqtt://{HOST}:{port}",
                                    "topic": "devices/{deviceId}/messages/events",
                                    "envelope": args.envelope, "maxInflight": args.window})
    await manager.apply([spec], lambda _n: lambda _e: True, lambda _n, _e: {})
    batch = records(args.msgs, args.devices)
    for start in range(0, len(batch), 1000):
        await log.append(batch[start:start + 1000])
    target = log.last_seq
    task = asyncio.create_task(manager.run())
    began, cpu0 = time.perf_counter(), cpu_s()
    while (await log.get_cursor("endpoint/bench") or 0) < target:
        await asyncio.sleep(0.01)
    elapsed, cpu = time.perf_counter() - began, cpu_s() - cpu0
    health = manager.health("bench")[0]
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await db.close()
    assert health["delivered"] == args.msgs, health
    return args.msgs / elapsed, 1e6 * cpu / args.msgs


def run(coro: Coroutine[Any, Any, tuple[float, float]]) -> tuple[float, float]:
    """On uvloop, as ``gateway run`` serves."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return asyncio.run(coro)
    return uvloop.run(coro)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--msgs", type=int, default=50_000)
    ap.add_argument("--window", type=int, default=16)
    ap.add_argument("--devices", type=int, default=100)
    ap.add_argument("--envelope", choices=["body", "json"], default="body")
    ap.add_argument("--loadgen", default=str(LOADGEN))
    args = ap.parse_args()
    loadgen = loadgen_path(args.loadgen)
    work = Path(tempfile.mkdtemp(prefix="bench-endpoint-"))
    broker, port = start_mosquitto(work)
    try:
        generator, generator_cpu = run_loadgen(loadgen, port, broker.pid, args)
        endpoint, endpoint_cpu = run(endpoint_rate(work, port, args))
    finally:
        broker.terminate()
        broker.wait(10)
        shutil.rmtree(work, ignore_errors=True)
    print(f"{'publisher':12} {'msgs/s':>10} {'CPU us/msg':>11}")
    print(f"{'loadgen':12} {generator:>10,.0f} {generator_cpu:>11.1f}")
    print(f"{'endpoint':12} {endpoint:>10,.0f} {endpoint_cpu:>11.1f}")
    print(f"ratio endpoint/loadgen: {endpoint / generator:.2f}x the rate at "
          f"{endpoint_cpu / generator_cpu:.2f}x the CPU per message "
          f"(QoS 1, one connection, window {args.window}, envelope {args.envelope})")


if __name__ == "__main__":
    main()
