#!/usr/bin/env python3
"""Federation overhead: direct-method round trip through 0, 1 and 2 gateways, and the time
for a desired patch at the top to reach a device at the leaf.

Three hubs on loopback (leaf -> site -> top, $FED_NET.1-3, default 127.0.23, tests/federation/hierarchy.py).
A device (the hub's own codec, answering at once) is connected at the top, at the site and at
the leaf; ``--calls`` sequential invocations through the top's service API each. Printed:
p50/p99 per depth and the per-hop overhead (p50 difference), then p50/p99 of ``--patches``
desired patches from the top's service API to the leaf device's PUBLISH.

    python tests/bench/federation.py               # 300 calls per depth, 100 patches
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from gateway.hubclient import HubClient  # noqa: E402
from gateway.mqtt.packets import Publish, Subscribe  # noqa: E402
from tests.federation.hierarchy import LEAF, SITE, TOP, start, wait  # noqa: E402
from tests.hubproc import HubProcess, create_device, device_token, username  # noqa: E402
from tests.mqttraw import Closed, RawClient  # noqa: E402


class Responder(threading.Thread):
    """A device that answers every method at once and notes when desired patches arrive."""

    def __init__(self, hub: HubProcess, address: str, device_id: str, key: str) -> None:
        super().__init__(daemon=True)
        self.client = RawClient(hub.port("mqtt_local_port"), host=address)
        self.client.connect(device_id, username(hub, device_id),
                            device_token(hub, device_id, key), clean=True)
        self.client.send(Subscribe(1, (("$iothub/methods/POST/#", 0),
                                       ("$iothub/twin/PATCH/properties/desired/#", 0))))
        self.client.recv()
        self.desired: dict[int, float] = {}
        self.start()

    def run(self) -> None:
        while True:
            try:
                packet = self.client.recv(timeout=3600)
            except Closed:  # the hubs stop at the end
                return
            if not isinstance(packet, Publish):
                continue
            if packet.topic.startswith("$iothub/methods/POST/"):
                rid = packet.topic.split("$rid=")[1]
                self.client.send(Publish(topic=f"$iothub/methods/res/200/?$rid={rid}",
                                         payload=b'{"ok":1}', qos=0))
            elif packet.topic.startswith("$iothub/twin/PATCH/properties/desired/"):
                self.desired[json.loads(packet.payload)["n"]] = time.monotonic()


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--patches", type=int, default=100)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        h = start(Path(tmp))
        try:
            top_dev = create_device(h.top, "b0")
            create_device(h.top, "b1", "--parent", "site")
            create_device(h.top, "b2", "--parent", "leaf")
            keys = {}
            for hub, name in ((h.site, "b1"), (h.leaf, "b2")):
                dev = wait(lambda hub=hub, name=name: json.loads(
                    hub.cli("device", "show", name, check=False).stdout or "null"), 15, name)
                keys[name] = dev["authentication"]["symmetricKey"]["primaryKey"]
            keys["b0"] = top_dev["authentication"]["symmetricKey"]["primaryKey"]
            devices = {0: Responder(h.top, TOP, "b0", keys["b0"]),
                       1: Responder(h.site, SITE, "b1", keys["b1"]),
                       2: Responder(h.leaf, LEAF, "b2", keys["b2"])}
            api = HubClient(h.top.data_dir)
            p50s = {}
            for depth in (0, 1, 2):
                name = f"b{depth}"
                body = {"methodName": "ping", "payload": {}, "responseTimeoutInSeconds": 10}
                for _ in range(20):  # warm-up
                    api.request("POST", f"/twins/{name}/methods", body)
                took = []
                for _ in range(args.calls):
                    t0 = time.monotonic()
                    result = api.request("POST", f"/twins/{name}/methods", body)
                    took.append(time.monotonic() - t0)
                    assert result["status"] == 200, result
                p50s[depth] = pct(took, 0.5)
                print(f"method round trip through {depth} gateway(s): p50 {pct(took, 0.5):.1f} ms"
                      f"  p99 {pct(took, 0.99):.1f} ms  (n={len(took)})")
            print(f"per hop (p50): {(p50s[1] - p50s[0]):.1f} ms, {(p50s[2] - p50s[1]):.1f} ms")
            leaf = devices[2]
            lat = []
            for n in range(args.patches):
                t0 = time.monotonic()
                api.request("PATCH", "/twins/b2", {"properties": {"desired": {"n": n}}},
                            headers={"If-Match": "*"})
                deadline = time.monotonic() + 10
                while n not in leaf.desired and time.monotonic() < deadline:
                    time.sleep(0.0005)
                lat.append(leaf.desired[n] - t0)
            print(f"desired patch top -> leaf device: p50 {pct(lat, 0.5):.1f} ms"
                  f"  p99 {pct(lat, 0.99):.1f} ms  (n={len(lat)}; includes the PATCH request)")
        finally:
            h.stop()


if __name__ == "__main__":
    main()
