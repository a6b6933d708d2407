#!/usr/bin/env python3
"""Routing cost: durable ingest with 10 routes against ingest with none, and condition
evaluation in microseconds per message per route.

1. Ingest: the same hub setup twice (100 devices with twins, tests/bench/loadgen.py, QoS 1,
   200-byte JSON sent as ``application/json``/``utf-8`` with application properties), once with
   no routes, once with 10 routes whose conditions read the body, the properties and the twin
   (all into ``events``, so no endpoint drains during the run). Printed: both rates, the ratio,
   and the hub's CPU per message.
2. Conditions, in process: the router on distinct messages with the per-topic cache off (every
   condition runs, the body decoded once per message) and on (as the hub runs it), and the
   plain tree-walking evaluator for comparison.

    python tests/bench/routing.py                 # 200k messages per ingest run
    python tests/bench/routing.py --msgs 400000 --skip-ingest
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.bench.ingest import run_loadgen
from tests.bench.peers import LOADGEN, loadgen_credentials, loadgen_path
from tests.hubproc import HubProcess

ROUTES = {
    "hot": "$body.temperature > 30",
    "shaky": "$body.vib.z > 0.5 AND $body.humidity < 80",
    "battery": "IS_NUMBER($body.battery) AND $body.battery < 3.0",
    "weak": "$body.rssi < -90 OR $body.pressure > 1100",
    "alerts": "alert = 'high'",
    "level3": "level = '3' AND $contentType = 'application/json'",
    "some": "STARTS_WITH($connectionDeviceId, 'dev-1')",
    "plant": "$twin.tags.site = 'plant-7'",
    "upper": "$twin.tags.floor > 2",
    "eco": "$twin.properties.desired.mode = 'eco' AND $body.temperature > 20",
}
TOPIC = "devices/{id}/messages/events/%24.ct=application%2Fjson&%24.ce=utf-8&alert=high&level=3"
BODY = (b'{"deviceId":"dev-1","ts":"2024-05-01T12:00:00.000Z","seq":123456,"temperature":21.53,'
        b'"humidity":45.21,"pressure":1013.25,"vib":{"x":0.012,"y":-0.003,"z":0.981},'
        b'"battery":3.71,"rssi":-67,"pad":"xxxxxxxxxx"}')


def routes_toml() -> str:
    lines = ["[routes]"]
    for name, cond in ROUTES.items():
        lines.append(f"{name} = {{ source = \"DeviceMessages\", condition = {json.dumps(cond)}, "
                     "endpoint = \"events\" }")
    return "\n".join(lines) + "\n"


def ingest(tmp: Path, args: argparse.Namespace, loadgen: Path, label: str, extra: str) -> dict[str, object]:
    from gateway.hubclient import HubClient

    hub = HubProcess(tmp / label, host_name="bench.local", log_level="info",
                     extra_config='[store]\nsync = "full"\n' + extra)
    hub.start()
    try:
        creds = loadgen_credentials(hub.data_dir, "bench.local", args.conns, tmp / f"{label}.tsv")
        client = HubClient(hub.data_dir)
        for i in range(args.conns):
            client.request("PATCH", f"/twins/dev-{i}", {
                "tags": {"site": "plant-7" if i % 2 else "plant-9", "floor": i % 5},
                "properties": {"desired": {"mode": "eco" if i % 3 else "boost"}}},
                headers={"If-Match": "*"})
        extra_args = ["--cred-file", str(creds), "--topic-template", TOPIC]
        return run_loadgen(loadgen, args, hub.port("mqtt_local_port"), hub.pid, label, extra_args)
    finally:
        hub.stop()


def conditions(n: int) -> tuple[float, float, float]:
    """µs per message per route: (router, no cache), (router, per-topic cache), (evaluator)."""
    from gateway.routing.message import MessageView
    from gateway.routing.model import RoutingState, parse_route
    from gateway.routing.router import Router
    from gateway.routing.semantics import evaluate

    class Twin:
        tags = {"site": "plant-7", "floor": 3}
        desired = {"mode": "eco"}
        reported: dict[str, object] = {}

    state = RoutingState(tuple(parse_route(k, {"condition": v, "endpointNames": ["events"]})
                               for k, v in ROUTES.items()))
    twin = Twin()
    router = Router(state, twins=lambda d, m: twin)
    system = {"content-type": "application/json", "content-encoding": "utf-8",
              "iothub-connection-device-id": "dev-17"}
    app = {"alert": "high", "level": "3"}
    bodies = [BODY.replace(b"21.53", f"{20 + i % 20}.5".encode()) for i in range(1000)]
    k = len(ROUTES)

    def timed(fn: object) -> float:
        """CPU time (the machine is shared: wall time counts other jobs), best of three."""
        best = float("inf")
        for _ in range(3):
            start = time.process_time()
            for i in range(n):
                fn(bodies[i % 1000])  # type: ignore[operator]
            best = min(best, time.process_time() - start)
        return best / n / k * 1e6

    no_cache = timed(lambda b: router.route("telemetry", system, app, b, "dev-17", None, 0))
    key = json.dumps({"system": system, "application": app})
    cached = timed(lambda b: router.route("telemetry", system, app, b, "dev-17", None, 0, key))
    trees = [r.compiled.tree for r in router._routes]

    def reference(b: bytes) -> None:
        view = MessageView(system, app, b, device_id="dev-17", module_id=None, enqueued_ms=0,
                           twins=lambda d, m: twin)
        for tree in trees:
            evaluate(tree, view)

    return no_cache, cached, timed(reference)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--conns", type=int, default=100)
    ap.add_argument("--window", type=int, default=100)
    ap.add_argument("--msgs", type=int, default=200_000)
    ap.add_argument("--loadgen", default=str(LOADGEN))
    ap.add_argument("--skip-ingest", action="store_true")
    ap.add_argument("--eval-msgs", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=1,
                    help="alternate none/10-routes this many times (a loaded machine drifts)")
    args = ap.parse_args()
    no_cache, cached, reference = conditions(args.eval_msgs)
    print(f"condition evaluation, {len(ROUTES)} routes (4 on $body, 3 on properties, 3 on the twin):")
    print(f"  router, every condition run:     {no_cache:6.3f} us per message per route")
    print(f"  router, per-topic cache (hub):   {cached:6.3f} us per message per route")
    print(f"  tree-walking reference evaluator: {reference:5.3f} us per message per route")
    if args.skip_ingest:
        return
    loadgen = loadgen_path(args.loadgen)
    tmp = Path(tempfile.mkdtemp(prefix="bench-routing-"))
    rounds: list[tuple[dict[str, object], dict[str, object]]] = []
    try:
        for i in range(args.rounds):
            plain = ingest(tmp, args, loadgen, f"none{i}", "")
            routed = ingest(tmp, args, loadgen, f"routes{i}", routes_toml())
            rounds.append((plain, routed))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"durable QoS1 ingest, {args.conns} conns x {args.window} in flight, {args.msgs} msgs, "
          "JSON with properties, TCP, sync=full")
    print(f"{'':12} {'msg/s':>10} {'cpu us/msg':>11} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6}")
    ratios = []
    for plain, routed in rounds:
        for label, r in (("no routes", plain), ("10 routes", routed)):
            print(f"{label:12} {r['msgs_per_s']:>10,.0f} {r['broker_cpu_us_per_msg']:>11.2f} "
                  f"{r['lat_p50_ms']:>8.2f} {r['lat_p99_ms']:>8.2f} {len(r['errors']):>6}")  # type: ignore[arg-type]
        ratios.append(routed["msgs_per_s"] / plain["msgs_per_s"])  # type: ignore[operator]
    cpu = [r["broker_cpu_us_per_msg"] / p["broker_cpu_us_per_msg"] for p, r in rounds]  # type: ignore[operator]
    print("ratio 10 routes / none: " + ", ".join(f"{x:.2f}x" for x in ratios)
          + " (goal >= 0.9x); cpu per message " + ", ".join(f"{x:.2f}x" for x in cpu))


if __name__ == "__main__":
    main()
