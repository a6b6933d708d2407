"""Routing with real peers (issue 9's interop check): unmodified Azure SDK devices send JSON
messages with properties and content types; routes with conditions send them to Debian's
mosquitto (a paho subscriber checks topics, envelopes and enrichments), to a local HTTP
collector and to files; ``monitor-events`` shows only what went to ``events``. The broker is
stopped while messages flow and started again: everything arrives, in order."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest

from tests.hubproc import HubProcess
from tests.interop.conftest import run_sdk
from tests.routing_peers import HOST, Mosquitto, wait_for

pytestmark = [pytest.mark.interop, pytest.mark.slow]


class Collector(BaseHTTPRequestHandler):
    posts: list[Any] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        data = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).posts.append((self.headers.get("Content-Type"), json.loads(data)))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def peers(tmp_path: Path) -> Iterator[tuple[Mosquitto, ThreadingHTTPServer, list[tuple[str, bytes]]]]:
    broker = Mosquitto(tmp_path / "mosquitto")
    broker.start()
    received: list[tuple[str, bytes]] = []
    sub = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"sub-{uuid.uuid4().hex[:6]}",
                      clean_session=False)
    subscribed = threading.Event()
    sub.on_connect = lambda c, *_: c.subscribe("routed/#", qos=1)
    sub.on_subscribe = lambda *_: subscribed.set()
    sub.on_message = lambda _c, _u, m: received.append((m.topic, bytes(m.payload)))
    sub.reconnect_delay_set(0.05, 0.5)
    sub.connect_async(HOST, broker.port, keepalive=30)
    sub.loop_start()
    assert subscribed.wait(10)
    Collector.posts = []
    http = ThreadingHTTPServer((HOST, 0), Collector)
    threading.Thread(target=http.serve_forever, daemon=True).start()
    yield broker, http, received
    sub.disconnect()
    sub.loop_stop()
    http.shutdown()
    broker.stop()


def test_routes_to_mosquitto_http_files_and_events(
    iot_hub: HubProcess, azure_python: Path, peers: Any, tmp_path: Path
) -> None:
    broker, http, received = peers
    hub = iot_hub
    dev = f"rt-{uuid.uuid4().hex[:6]}"
    hub.cli("device", "create", dev)
    hub.cli("twin", "update", dev, "--tags", '{"site": "plant-7"}')
    files = tmp_path / "files"
    mine = f"$connectionDeviceId = '{dev}'"
    made: list[tuple[str, ...]] = []

    def cli(*args: str) -> None:
        hub.cli(*args)
        made.append(args)

    try:
        cli("endpoint", "create", "rt-mq", "--type", "mqtt", "--url", f"mqtt://{HOST}:{broker.port}",
            "--topic", "routed/{deviceId}", "--qos", "1", "--envelope", "json")
        cli("endpoint", "create", "rt-web", "--type", "http", "--url",
            f"http://{HOST}:{http.server_address[1]}/ingest", "--batch", "5", "--header", "X-Plant: 7")
        cli("endpoint", "create", "rt-files", "--type", "file", "--path", str(files),
            "--roll-seconds", "1")
        cli("route", "create", "rt-hot", "--source", "DeviceMessages", "--endpoint", "rt-mq",
            "--condition", f"{mine} AND $body.temperature >= 25")
        cli("route", "create", "rt-all", "--route", f"FROM /messages WHERE {mine} INTO rt-web")
        cli("route", "create", "rt-even", "--endpoint", "rt-files",
            "--condition", f"{mine} AND AS_NUMBER(seq) % 2 = 0")
        cli("route", "create", "rt-ev", "--endpoint", "events",
            "--condition", f"{mine} AND $body.temperature = 20")
        cli("enrichment", "create", "rt-site", "--value", "$twin.tags.site", "--endpoint", "rt-mq")
        cli("enrichment", "create", "rt-hub", "--value", "$iothubname", "--endpoint", "rt-web,rt-files")

        cs = hub.connection_string(dev, gateway_host="localhost")
        run_sdk(azure_python, "send_telemetry.py", {"connection_string": cs, "ca_file": hub.ca_file,
                                                    "count": 20})
        hot = wait_for(lambda: len(received) >= 10 and received, 60, "mqtt endpoint messages")
        assert {t for t, _ in hot} == {f"routed/{dev}"}
        envelopes = [json.loads(p) for _, p in hot]
        assert [e["body"]["seq"] for e in envelopes] == [5, 6, 7, 8, 9, 15, 16, 17, 18, 19]
        first = envelopes[0]
        assert first["body"] == {"seq": 5, "temperature": 25, "note": "ü & = / %"}
        assert first["properties"] == {"seq": "5", "alert level": "high & low=1/2", "rt-site": "plant-7"}
        assert first["systemProperties"]["content_type"] == "application/json"
        assert first["systemProperties"]["iothub-connection-device-id"] == dev

        posted = wait_for(lambda: sum(len(b) for _, b in Collector.posts) >= 20 and Collector.posts,
                          60, "http endpoint posts")
        bodies = [m for _, batch in posted for m in batch]
        assert [m["body"]["seq"] for m in bodies] == list(range(20))
        assert all(ctype.startswith("application/json") for ctype, _ in posted)
        assert all(m["properties"]["rt-hub"] == "localhost" for m in bodies)

        def filed() -> list[dict[str, Any]]:
            return [json.loads(line) for f in sorted(files.rglob("*.jsonl"))
                    for line in f.read_text().splitlines() if line.strip()]

        wait_for(lambda: len(filed()) >= 10, 60, "file endpoint lines")
        assert [m["body"]["seq"] for m in filed()] == list(range(0, 20, 2))

        out = hub.cli("monitor-events", "--device", dev, "--from-beginning", "--timeout", "2",
                      "--json").stdout
        shown = [json.loads(line)["event"]["payload"]["seq"] for line in out.splitlines() if line.strip()]
        assert shown == [0, 10]  # only what a route sent to events (the rest matched other routes)

        # the broker goes away while messages flow, and comes back: all arrive, in order
        broker.stop()
        run_sdk(azure_python, "send_telemetry.py", {"connection_string": cs, "ca_file": hub.ca_file,
                                                    "count": 10, "prefix": "again"})

        def unhealthy() -> bool:
            rows = json.loads(hub.cli("endpoint", "health", "rt-mq", "--json").stdout)
            return rows["healthStatus"] in ("unhealthy", "dead") and bool(rows["lastError"])

        wait_for(unhealthy, 60, "rt-mq unhealthy")
        broker.start()
        wait_for(lambda: len(received) >= 15, 90, "messages after the broker restart")
        seqs = [json.loads(p)["body"]["seq"] for _, p in received]
        assert seqs[:10] == [5, 6, 7, 8, 9, 15, 16, 17, 18, 19]
        assert sorted(set(seqs[10:])) == [5, 6, 7, 8, 9]  # at-least-once: no loss, in order
        assert [s for i, s in enumerate(seqs[10:]) if i == 0 or s != seqs[10 + i - 1]] == [5, 6, 7, 8, 9]
        wait_for(lambda: json.loads(hub.cli("endpoint", "health", "rt-mq", "--json").stdout)
                 ["healthStatus"] == "healthy", 30, "rt-mq healthy again")
    finally:
        for args in reversed(made):
            kind, _, name = args[0], args[1], args[2]
            hub.cli(kind, "delete", name, check=False)
