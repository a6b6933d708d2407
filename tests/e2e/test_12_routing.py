"""Message routing end to end (IoT Hub ref §10): the CLI and REST management, conditions on
properties, body and twin, the fallback route, enrichments, endpoints, persistence across
restarts, and gateway.toml as the starting state."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from gateway.hubclient import HubClient
from gateway.mqtt.packets import Puback, Publish
from tests.hubproc import HubProcess, create_device, device_token, username
from tests.mqttraw import RawClient

JSON_BAG = "%24.ct=application%2Fjson&%24.ce=utf-8"


def sender(hub: HubProcess, device_id: str) -> RawClient:
    key = create_device(hub, device_id)["authentication"]["symmetricKey"]["primaryKey"]
    c = RawClient(hub.port("mqtt_tls_port"), ca_file=hub.ca_file)
    ack = c.connect(device_id, username(hub, device_id), device_token(hub, device_id, key))
    assert ack.return_code == 0  # type: ignore[union-attr]
    return c


def send(c: RawClient, device_id: str, body: dict[str, object], bag: str, pid: int) -> None:
    c.send(Publish(topic=f"devices/{device_id}/messages/events/{bag}",
                   payload=json.dumps(body).encode(), qos=1, packet_id=pid))
    assert c.recv() == Puback(pid)


def wait_until(check: object, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def events(hub: HubProcess) -> list[dict[str, object]]:
    out = hub.cli("monitor-events", "--from-beginning", "--timeout", "2", "--json").stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def error_line(hub: HubProcess, *args: str) -> str:
    result = hub.cli(*args, check=False)
    assert result.returncode == 1, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.slow
def test_routes_managed_live_and_kept(tmp_path: Path) -> None:
    hub = HubProcess(tmp_path / "data").start()
    try:
        archive = tmp_path / "archive"
        hub.cli("endpoint", "create", "archive", "--type", "file", "--path", str(archive),
                "--roll-seconds", "1")
        hub.cli("route", "create", "hot", "--source", "DeviceMessages", "--endpoint", "archive",
                "--condition", "$body.temp > 30 AND alert = 'high'", "--priority", "1", "--ttl", "600")
        hub.cli("route", "create", "plant7", "--route",
                "FROM /messages/* WHERE $twin.tags.site = 'plant-7' INTO events")
        hub.cli("enrichment", "create", "site", "--value", "$twin.tags.site",
                "--endpoint", "archive,events")
        hub.cli("enrichment", "create", "hub", "--value", "$iothubname", "--endpoint", "archive")

        # bad input: one line each, nothing applied
        assert "exists already" in error_line(hub, "route", "create", "hot", "--endpoint", "events")
        assert "column 14" in error_line(hub, "route", "create", "x", "--endpoint", "events",
                                         "--condition", "$body.temp > AND")
        assert "does not exist" in error_line(hub, "route", "create", "x", "--endpoint", "nowhere")
        assert "still used by route hot" in error_line(hub, "endpoint", "delete", "archive")
        assert "not an option of file" in error_line(hub, "endpoint", "create", "e2", "--type",
                                                     "file", "--path", "/tmp", "--topic", "t")
        listed = hub.cli("route", "list").stdout.splitlines()
        assert [line.split("\t")[0] for line in listed] == ["hot", "plant7", "$fallback"]

        c = sender(hub, "dev1")
        hub.cli("twin", "update", "dev1", "--tags", '{"site": "plant-7"}')
        create_device(hub, "dev2")
        send(c, "dev1", {"temp": 35}, JSON_BAG + "&alert=high", 1)  # hot + plant7
        send(c, "dev1", {"temp": 20}, JSON_BAG + "&alert=high", 2)  # plant7
        hub.cli("twin", "update", "dev1", "--tags", '{"site": "elsewhere"}')
        send(c, "dev1", {"temp": 40}, JSON_BAG + "&alert=high", 3)  # hot only: not in events
        send(c, "dev1", {"temp": 10}, JSON_BAG, 4)  # nothing: fallback to events

        got = events(hub)
        temps = [e["event"]["payload"]["temp"] for e in got]  # type: ignore[index]
        assert temps == [35, 20, 10]
        assert got[0]["event"]["properties"]["application"]["site"] == "elsewhere"  # type: ignore[index]

        def archived() -> list[dict[str, object]]:
            lines = [line for f in sorted(archive.rglob("*.jsonl"))
                     for line in f.read_text().splitlines() if line.strip()]
            return [json.loads(line) for line in lines]

        wait_until(lambda: len(archived()) == 2, timeout=30)
        rows = archived()
        assert [r["body"]["temp"] for r in rows] == [35, 40]
        assert rows[0]["properties"]["hub"] == hub.host_name
        assert rows[1]["properties"]["site"] == "elsewhere"  # the twin as it is at delivery

        test = hub.cli("route", "test", "--body", '{"temp": 12}', "--app-props", "alert=high",
                       "--twin", '{"tags": {"site": "plant-7"}}').stdout
        assert "match\tplant7\t-> events" in test
        assert "no\thot\t($body.temp > 30) was false" in test

        # disabling the fallback drops what matches nothing; a disabled route is skipped
        hub.cli("route", "fallback", "--disable")
        hub.cli("route", "update", "plant7", "--disabled")
        send(c, "dev1", {"temp": 11}, JSON_BAG, 5)
        hub.cli("route", "fallback", "--enable")
        send(c, "dev1", {"temp": 12}, JSON_BAG, 6)
        assert [e["event"]["payload"]["temp"] for e in events(hub)] == [35, 20, 10, 12]  # type: ignore[index]
        health = {r["endpointId"]: r for r in json.loads(hub.cli("endpoint", "health", "--json").stdout)}
        assert health["events"]["healthStatus"] == "healthy"
        assert health["archive"]["healthStatus"] == "healthy" and health["archive"]["delivered"] == 2
        c.close()

        hub.stop()
        hub.start()
        state = HubClient(hub.data_dir).request("GET", "/routing")
        assert [r["name"] for r in state["routes"]] == ["hot", "plant7"]
        assert state["routes"][0]["priority"] == 1 and state["routes"][0]["timeToLiveSecs"] == 600
        assert not state["routes"][1]["isEnabled"]
        assert [e["key"] for e in state["enrichments"]] == ["site", "hub"]
        hub.cli("route", "delete", "hot")
        hub.cli("enrichment", "delete", "hub")
        hub.cli("enrichment", "delete", "site")
        hub.cli("endpoint", "delete", "archive")
        assert hub.cli("endpoint", "list").stdout == ""
    finally:
        hub.stop()


def test_limits_and_upstream_health(tmp_path: Path) -> None:
    hub = HubProcess(tmp_path / "data").start()
    try:
        client = HubClient(hub.data_dir)
        for i in range(10):
            client.request("PUT", f"/routing/enrichments/k{i}",
                           {"value": "v", "endpointNames": ["events"]})
        assert "at most 10 enrichments" in error_line(
            hub, "enrichment", "create", "k10", "--value", "v", "--endpoint", "events")
        created = hub.cli("route", "create", "up", "--route", "FROM /messages/* INTO $upstream")
        assert "forwards only while an upstream is set" in created.stderr
        health = json.loads(hub.cli("endpoint", "health", "$upstream", "--json").stdout)
        assert health["healthStatus"] == "unknown"
        assert health["lastError"] == "no upstream set (gateway upstream set)"
    finally:
        hub.stop()


@pytest.mark.slow
def test_toml_is_the_starting_state(tmp_path: Path) -> None:
    out = tmp_path / "files"
    config = f"""
[routes]
legacy = 'FROM /messages/modules/sensor/* INTO BrokeredEndpoint("/modules/filter/inputs/in1")'
alerts = {{ source = "DeviceMessages", condition = "level = 'alarm'", endpoint = "files", priority = 0 }}

[endpoints.files]
type = "file"
path = "{out}"

[enrichments.line]
value = "L7"
endpointNames = ["files"]

[routing]
fallback = false
"""
    hub = HubProcess(tmp_path / "data", extra_config=config).start()
    try:
        state = HubClient(hub.data_dir).request("GET", "/routing")
        assert [r["name"] for r in state["routes"]] == ["legacy", "alerts"]
        assert state["routes"][0]["endpointNames"] == ['BrokeredEndpoint("/modules/filter/inputs/in1")']
        assert state["fallbackRoute"]["isEnabled"] is False
        # a change through the API is kept across a restart with the same file
        hub.cli("route", "create", "extra", "--endpoint", "events")
        hub.stop()
        hub.start()
        names = [r["name"] for r in HubClient(hub.data_dir).request("GET", "/routing/routes")]
        assert names == ["legacy", "alerts", "extra"]
        # an edited file is applied over it: what it dropped goes, what it has is set
        hub.stop()
        hub.config_file.write_text(hub.config_file.read_text().replace(
            "legacy = 'FROM /messages/modules/sensor/* INTO BrokeredEndpoint(\"/modules/filter/inputs/in1\")'\n", ""))
        hub.start()
        state = HubClient(hub.data_dir).request("GET", "/routing")
        assert [r["name"] for r in state["routes"]] == ["alerts", "extra"]
    finally:
        hub.stop()


def test_bad_endpoint_in_toml_is_refused(tmp_path: Path) -> None:
    hub = HubProcess(tmp_path / "data", extra_config='[endpoints.x]\ntype = "ftp"\n')
    with pytest.raises(RuntimeError) as err:
        hub.start(timeout=15)
    assert "endpoints.x" in str(err.value) and "must be one of mqtt, http, file" in str(err.value)
    time.sleep(0)
