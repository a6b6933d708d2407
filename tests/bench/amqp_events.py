#!/usr/bin/env python3
"""Reading the built-in endpoint: AMQP (Event Hubs-compatible) against the REST stream.

Starts a hub here, fills its log with ``--events`` telemetry messages (paho, QoS 1, on the
local listener), then reads all of them from the start twice, one reader at a time:

* REST: ``GET /messages/events?start=earliest&stream=true`` (newline-delimited JSON),
  read by this process (urllib, like ``gateway monitor-events``);
* AMQP: the unmodified azure-eventhub ``EventHubConsumerClient`` (``receive_batch``,
  prefetch 300) in the Azure venv, over TLS to the AMQP listener: once with its default
  pure-Python transport, once with its uamqp (C) transport.

Prints events/s for each (wall time from the request to the last event, connection set-up
included), the ratios, and the hub's CPU time per event for each reader (so a reader-bound
rate can be told from a hub-bound one). The machine is shared: compare the ratio, not the
absolute rates.

    python tests/bench/amqp_events.py                 # 20000 events of 200 bytes
    python tests/bench/amqp_events.py --events 50000 --payload 1000
"""

from __future__ import annotations

import argparse
import json
import os
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import paho.mqtt.client as paho  # noqa: E402

from gateway.hubclient import HubClient  # noqa: E402
from tests.hubproc import HubProcess, create_device, device_token, username  # noqa: E402

ADDRESS = "127.0.8.3"
AZURE_VENV = Path(os.environ.get("AZURE_VENV", REPO / ".venv-azure"))


def fill(hub: HubProcess, count: int, payload: int) -> None:
    device = create_device(hub, "bench-dev")
    key = device["authentication"]["symmetricKey"]["primaryKey"]
    done = threading.Event()
    acked = [0]
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="bench-dev",
                         protocol=paho.MQTTv311)
    client.username_pw_set(username(hub, "bench-dev"), device_token(hub, "bench-dev", key))
    client.tls_set(ca_certs=hub.ca_file, tls_version=ssl.PROTOCOL_TLS_CLIENT)
    client.max_inflight_messages_set(200)
    client.max_queued_messages_set(0)

    def on_publish(c: object, u: object, mid: int, rc: object, p: object) -> None:
        acked[0] += 1
        if acked[0] == count:
            done.set()

    client.on_publish = on_publish
    client.connect("localhost", hub.port("mqtt_tls_port"))
    client.loop_start()
    body = json.dumps({"v": "x" * max(payload - 10, 0)})
    for i in range(count):
        client.publish(f"devices/bench-dev/messages/events/n={i}&kind=bench", body, qos=1)
    if not done.wait(600):
        raise SystemExit(f"only {acked[0]} of {count} messages acknowledged")
    client.disconnect()
    client.loop_stop()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def read_rest(hub: HubProcess, count: int) -> float:
    api = HubClient(hub.data_dir)
    start = time.monotonic()
    got = 0
    for _event in api.stream("/messages/events", {"start": "earliest", "limit": "5000"},
                             idle_timeout=30):
        got += 1
        if got >= count:
            break
    if got < count:
        raise SystemExit(f"REST stream gave {got} of {count} events")
    return time.monotonic() - start


def read_amqp(hub: HubProcess, count: int, *, uamqp: bool = False) -> dict[str, float]:
    cs = hub.cli("events", "connection-string").stdout.strip()
    args = {"connection_string": cs, "ca_file": hub.ca_file, "count": count, "uamqp": uamqp,
            "endpoint": f"sb://{ADDRESS}:{hub.port('amqp_port')}"}
    out = subprocess.run([str(AZURE_VENV / "bin" / "python"),
                          str(Path(__file__).with_name("eventhub_read.py")), json.dumps(args)],
                         capture_output=True, text=True, timeout=900, check=False)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise SystemExit(f"the AMQP reader failed:\n{out.stderr[-3000:]}")
    result: dict[str, float] = json.loads(lines[-1])
    if result["events"] < count:
        raise SystemExit(f"the AMQP reader got {result['events']} of {count} events")
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=20000)
    ap.add_argument("--payload", type=int, default=200)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-amqp-") as tmp:
        hub = HubProcess(Path(tmp) / "hub", host_name="bench.local", log_level="warning",
                         hub_config=f'addresses = ["{ADDRESS}"]\n',
                         amqp_config=f'port = 0\nbind = "{ADDRESS}"\n',
                         extra_config='[store]\nsync = "normal"\n')
        hub.start()
        try:
            fill(hub, args.events, args.payload)
            total = args.events + 2  # the device's lifecycle and connection events
            cpu = [cpu_seconds(hub.pid)]
            rest_s = read_rest(hub, total)
            cpu.append(cpu_seconds(hub.pid))
            amqp = read_amqp(hub, total)
            cpu.append(cpu_seconds(hub.pid))
            amqp_c = read_amqp(hub, total, uamqp=True)
            cpu.append(cpu_seconds(hub.pid))
        finally:
            hub.stop()
    rest_rate = total / rest_s
    amqp_rate = total / amqp["seconds"]
    print(json.dumps({
        "events": total, "payload_bytes": args.payload,
        "rest_events_per_s": round(rest_rate), "amqp_events_per_s": round(amqp_rate),
        "amqp_first_to_last_events_per_s": round(total / amqp["first_to_last"])
        if amqp["first_to_last"] else None,
        "amqp_over_rest": round(amqp_rate / rest_rate, 2),
        "amqp_uamqp_events_per_s": round(total / amqp_c["seconds"]),
        "amqp_uamqp_over_rest": round(total / amqp_c["seconds"] / rest_rate, 2),
        "hub_cpu_us_per_event": {"rest": round((cpu[1] - cpu[0]) / total * 1e6),
                                 "amqp": round((cpu[2] - cpu[1]) / total * 1e6),
                                 "amqp_uamqp": round((cpu[3] - cpu[2]) / total * 1e6)},
    }))


if __name__ == "__main__":
    main()
