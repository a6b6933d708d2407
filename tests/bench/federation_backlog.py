#!/usr/bin/env python3
"""Federation backlog drain: how long the reported patches and C2D completions of ``--devices``
devices, made at the leaf while its link was down, take to reach the top once it is back.

Three hubs on loopback (tests/federation/hierarchy.py, ``$FED_NET``). Each device (the hub's own
codec over the leaf's local port) reports once and completes one C2D message while the site is
stopped; the site is started, and the clock runs from the leaf's link being up again until the
top holds every report (and, separately, until its C2D queues are empty). Run it with another
tree's ``PYTHONPATH`` (e.g. main's) for the peer in the same run: the code under test is the one
the hubs import.

    PYTHONPATH=$PWD python tests/bench/federation_backlog.py --devices 200
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from gateway.errors import GatewayError
from gateway.hubclient import HubClient
from gateway.mqtt.packets import Connack, Puback, Publish, Suback, Subscribe
from tests.federation.hierarchy import LEAF, start, wait
from tests.hubproc import device_token, username
from tests.mqttraw import RawClient


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", type=int, default=200)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="fed-backlog-") as tmp:
        h = start(Path(tmp))
        clients: list[RawClient] = []
        try:
            top, leaf = HubClient(h.top.data_dir), HubClient(h.leaf.data_dir)
            scope = top.request("GET", "/devices/leaf")["deviceScope"]
            ids = [f"bk{i}" for i in range(args.devices)]
            keys = {}
            for d in ids:
                keys[d] = top.request("PUT", f"/devices/{d}", {"deviceId": d, "parentScopes": [
                    scope]})["authentication"]["symmetricKey"]["primaryKey"]
                top.request("POST", f"/devices/{d}/messages/deviceBound", {"body": d})
            def at_leaf(d: str) -> bool:
                try:
                    return bool(leaf.request("GET", f"/devices/{d}")[
                        "cloudToDeviceMessageCount"] == 1)
                except GatewayError:
                    return False

            wait(lambda: all(at_leaf(d) for d in ids), 60, "messages at the leaf")
            h.site.stop()
            for d in ids:
                c = RawClient(h.leaf.port("mqtt_local_port"), host=LEAF)
                ack = c.connect(d, username(h.leaf, d), device_token(h.leaf, d, keys[d]),
                                clean=True)
                assert isinstance(ack, Connack) and ack.return_code == 0
                c.send(Subscribe(1, (("$iothub/twin/res/#", 0),
                                     (f"devices/{d}/messages/devicebound/#", 1))))
                c.send(Publish(topic="$iothub/twin/PATCH/properties/reported/?$rid=1",
                               payload=json.dumps({"k": d}).encode(), qos=0))
                answered = completed = False
                while not (answered and completed):
                    p = c.recv()
                    if isinstance(p, Publish) and p.topic.startswith("$iothub/twin/res/204"):
                        answered = True
                    elif isinstance(p, Publish) and p.qos == 1 and p.packet_id is not None:
                        c.send(Puback(p.packet_id))
                        completed = True
                    elif isinstance(p, Suback | Publish):
                        continue
                clients.append(c)
            h.site.start()
            deadline = time.monotonic() + 60
            while leaf.request("GET", "/upstream/status").get("state") != "connected":
                if time.monotonic() > deadline:  # polled in a tight loop: t0 within a few ms
                    raise SystemExit("the leaf did not link again")
                time.sleep(0.001)
            t0 = time.monotonic()
            last = ids[-1]  # sent up last, in both orders (one at a time, or batched)
            times: dict[str, float] = {}
            while len(times) < 2:
                if "reported" not in times and top.request("GET", f"/twins/{last}")[
                        "properties"]["reported"].get("k") == last:
                    times["reported"] = time.monotonic() - t0
                if "c2d" not in times and top.request("GET", f"/devices/{last}")[
                        "cloudToDeviceMessageCount"] == 0:
                    times["c2d"] = time.monotonic() - t0
                if time.monotonic() - t0 > 120:
                    raise SystemExit(f"timed out: {times}")
                time.sleep(0.002)
            wait(lambda: all(top.request("GET", f"/twins/{d}")["properties"]["reported"].get(
                "k") == d and top.request("GET", f"/devices/{d}")[
                "cloudToDeviceMessageCount"] == 0 for d in ids), 60, "every device at the top")
            print(f"{args.devices} devices' backlog after the leaf's link returned: the last "
                  f"reported patch at the top after {times['reported'] * 1000:.0f} ms, the last "
                  f"C2D completion after {times['c2d'] * 1000:.0f} ms (all checked)")
        finally:
            for c in clients:
                c.sock.close()
            h.stop()


if __name__ == "__main__":
    main()
