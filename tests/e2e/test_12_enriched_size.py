"""A message that enrichments push over 256 KB is dropped for those endpoints only (IoT Hub ref
§10.4), end to end: a module's three messages, the middle one near 262,000 bytes, reach a file
endpoint without enrichments whole, and the enriched file endpoint, the built-in endpoint
(``monitor-events`` and an AMQP Event Hubs reader) and a module input without the middle one;
health and /metrics count the drop once per endpoint, and each endpoint goes on with the next
message."""

from __future__ import annotations

import json
import re
import urllib.parse
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.hubclient import HubClient
from gateway.mqtt.packets import Puback, Publish, Suback, Subscribe
from tests.amqp.protonclient import ProtonClient
from tests.amqp.test_listener import token
from tests.e2e.test_08_module_routes import connect, module
from tests.e2e.test_12_routing import events, wait_until
from tests.hubproc import HubProcess, create_device

ADDRESS = "127.0.8.6"  # the AMQP listener's, in the hub's certificate
PARTITION = "testhub/ConsumerGroups/$Default/Partitions/0"
FILTER = 'BrokeredEndpoint("/modules/filter/inputs/in1")'
ENRICHED = ["archive", "events", FILTER]
PAD = 264  # two enrichments: 4 + 128 and 4 + 128 bytes (ref §2.4)
SYSTEM = 140  # about what the hub stamps on a module's message (ids, auth method, source)


def config(out: Path) -> str:
    return f"""
[routes]
toArchive = 'FROM /messages/modules/sensor/* INTO archive'
toPlain = 'FROM /messages/modules/sensor/* INTO plain'
toEvents = 'FROM /messages/modules/sensor/* INTO events'
toFilter = 'FROM /messages/modules/sensor/outputs/raw INTO {FILTER}'

[endpoints.archive]
type = "file"
path = "{out / 'archive'}"

[endpoints.plain]
type = "file"
path = "{out / 'plain'}"

[enrichments.pad1]
value = "{'a' * 128}"
endpointNames = {json.dumps(ENRICHED)}

[enrichments.pad2]
value = "{'b' * 128}"
endpointNames = {json.dumps(ENRICHED)}
"""


def scrape(hub: HubProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with HubClient(hub.data_dir)._open("GET", "/metrics") as response:
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


@pytest.mark.slow
def test_enriched_over_256_kb_is_dropped_per_endpoint(tmp_path: Path) -> None:
    out = tmp_path / "out"
    hub = HubProcess(tmp_path / "data", extra_config=config(out),
                     hub_config=f'addresses = ["{ADDRESS}"]\n',
                     amqp_config=f'port = 0\nbind = "{ADDRESS}"\n').start()
    amqp: ProtonClient | None = None
    try:
        create_device(hub, "edge1")
        sensor, filt = module(hub, "edge1", "sensor"), module(hub, "edge1", "filter")
        f = connect(hub, filt)
        f.send(Subscribe(packet_id=1, topics=(("devices/edge1/modules/filter/inputs/#", 1),)))
        assert f.recv() == Suback(1, (1,))
        s = connect(hub, sensor)
        big = b"x" * (262_000 - SYSTEM)  # under 262,144 as sent, over it once enriched
        for n, body in enumerate([b"small 0", big, b"small 2"]):
            s.send(Publish(topic=f"devices/edge1/modules/sensor/messages/events/%24.on=raw&n={n}",
                           payload=body, qos=1, packet_id=n + 1))
            assert s.recv() == Puback(n + 1)  # accepted: not over the limit at ingress

        got = []
        for _ in range(2):
            msg = f.recv()
            assert isinstance(msg, Publish)
            bag = dict(urllib.parse.parse_qsl(msg.topic.split("/", 6)[6]))
            assert bag["pad1"] == "a" * 128 and bag["pad2"] == "b" * 128
            got.append((bag["n"], msg.payload))
            f.send(Puback(msg.packet_id))  # type: ignore[arg-type]
        assert got == [("0", b"small 0"), ("2", b"small 2")]

        def lines(name: str) -> list[dict[str, Any]]:  # in seq order (the files' names)
            files = sorted((out / name).rglob("*.jsonl"), key=lambda p: p.name.split(".")[1])
            return [json.loads(line) for p in files for line in p.read_text().splitlines()]

        wait_until(lambda: len(lines("plain")) == 3 and len(lines("archive")) == 2, 15)
        plain = lines("plain")
        assert [line["properties"] for line in plain] == [{"n": "0"}, {"n": "1"}, {"n": "2"}]
        assert plain[1]["body"] == big.decode()  # the endpoint without enrichments: whole
        assert [line["properties"]["n"] for line in lines("archive")] == ["0", "2"]

        for _ in range(2):  # read twice: dropped each time, counted once
            shown = [e["event"] for e in events(hub)]
            assert [e["properties"]["application"]["n"] for e in shown] == ["0", "2"]
            assert shown[0]["properties"]["application"]["pad1"] == "a" * 128

        amqp = ProtonClient(ADDRESS, hub.port("amqp_port"), ca_file=hub.ca_file,
                            server_hostname=ADDRESS, hub_name=hub.host_name)
        assert amqp.put_token(token(hub), f"sb://{hub.host_name}/testhub") == (200, "OK")
        link = amqp.receiver(PARTITION)  # from the start
        read = [amqp.receive(link) for _ in range(2)]
        assert [m.properties["n"] for m in read] == ["0", "2"]
        assert read[1].properties["pad2"] == "b" * 128 and bytes(read[1].body) == b"small 2"

        health = {h["endpointId"]: h for h in json.loads(
            hub.cli("endpoint", "health", "--json").stdout)}
        sizes = []
        for name in ENRICHED:
            assert health[name]["deadLettered"] == 1, health[name]
            found = re.fullmatch(r"dropped seq (\d+) of edge1/sensor: (\d+) bytes enriched, "
                                 r"over 262144", health[name]["lastError"])
            assert found, health[name]["lastError"]
            sizes.append(int(found.group(2)))
        assert len(set(sizes)) == 1 and 262_144 < sizes[0] <= 262_144 + PAD  # pushed over
        assert health["plain"]["deadLettered"] == 0 and health["plain"]["delivered"] == 3
        assert health["archive"]["backlog"] == 0
        samples = scrape(hub)
        for name in ENRICHED:
            key = ("gateway_messages_dropped_total",
                   (("endpoint", name), ("reason", "enrichedTooLarge")))
            assert samples[key] == 1
        log = hub.log_text()
        for name in ENRICHED:  # one line per endpoint and message, naming seq, device, size
            assert log.count(f"endpoint {name}: dropped seq=") == 1
        assert f"device=edge1/sensor size={sizes[0]}: over the 262144-byte limit" in log

        # and on: the next message reaches every endpoint, nothing is sent again
        s.send(Publish(topic="devices/edge1/modules/sensor/messages/events/%24.on=raw&n=3",
                       payload=b"small 3", qos=1, packet_id=9))
        assert s.recv() == Puback(9)
        live = f.recv()
        assert isinstance(live, Publish) and live.payload == b"small 3"
        f.send(Puback(live.packet_id))  # type: ignore[arg-type]
        wait_until(lambda: len(lines("archive")) == 3, 15)
        assert [line["properties"]["n"] for line in lines("archive")] == ["0", "2", "3"]
        assert amqp.receive(link).properties["n"] == "3"
        assert [e["event"]["properties"]["application"]["n"] for e in events(hub)] == [
            "0", "2", "3"]
        s.close()
        f.close()
    finally:
        if amqp is not None:
            amqp.close()
        hub.stop()
