"""Issue 16: twin-change events only when a route or a live reader wants them (as IoT Hub),
reported patches answered in ``$version`` order, and method answers passed through as the
device sent them."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from typing import Any

from gateway.hubclient import HubClient
from gateway.mqtt.packets import Publish
from tests.e2e.test_05_twins_methods import connect
from tests.hubproc import REPO, HubProcess, create_device
from tests.routing_peers import wait_for

REPORTED = "$iothub/twin/PATCH/properties/reported/?$rid={}"


def all_events(hub: HubProcess) -> list[dict[str, Any]]:
    out = hub.cli("monitor-events", "--from-beginning", "--timeout", "1", "--json",
                  "--all-kinds").stdout
    return [json.loads(line)["event"] for line in out.splitlines() if line.strip()]


def twin_changes(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events
            if e["annotations"].get("iothub-message-source") == "twinChangeEvents"]


def patch(c: Any, start: int, count: int) -> list[str]:
    """``count`` reported patches sent back to back (QoS 0); the answer topics in order."""
    for i in range(start, start + count):
        c.send(Publish(topic=REPORTED.format(i), payload=json.dumps({"seq": i}).encode()))
    return [c.recv().topic for _ in range(count)]


def test_twin_change_events_follow_routes_and_readers(hub: HubProcess) -> None:
    info = create_device(hub, "dev1")
    c = connect(hub, ("dev1", info["authentication"]["symmetricKey"]["primaryKey"]),
                "$iothub/twin/res/#")
    # No routes: IoT Hub emits no twin-change event (its fallback route carries device
    # messages only), and nobody reads: the patches are answered, in $version order.
    answers = patch(c, 1, 8)
    assert answers == [f"$iothub/twin/res/204/?$rid={i}&$version={i + 1}" for i in range(1, 9)]
    assert twin_changes(all_events(hub)) == []
    assert HubClient(hub.data_dir).request("GET", "/twins/dev1")[
        "properties"]["reported"]["seq"] == 8

    # A live reader of every kind: recorded while it reads.
    mark = "live events reader kinds=all"
    readers_before = hub.log_text().count(mark)  # all_events() read too, and stopped
    reader = subprocess.Popen(
        [sys.executable, "-m", "gateway", "--data-dir", str(hub.data_dir), "monitor-events",
         "--json", "--all-kinds", "--timeout", "20"],
        stdout=subprocess.PIPE, text=True, cwd=REPO)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(reader.stdout.readline, "")),  # type: ignore[union-attr]
                     daemon=True).start()
    try:
        wait_for(lambda: hub.log_text().count(mark) > readers_before, 20, "the reader")
        answers = patch(c, 9, 1)
        assert answers == ["$iothub/twin/res/204/?$rid=9&$version=10"]
        wait_for(lambda: any("twinChangeEvents" in line for line in lines), 20, "the event")
    finally:
        reader.terminate()
        reader.wait(10)
    [seen] = [json.loads(line)["event"] for line in lines if "twinChangeEvents" in line]
    assert seen["payload"]["properties"]["reported"]["seq"] == 9

    # A route that takes twin changes: recorded with nobody reading.
    hub.cli("route", "create", "twins", "--source", "TwinChangeEvents", "--endpoint", "events")
    assert patch(c, 10, 2) == [f"$iothub/twin/res/204/?$rid={i}&$version={i + 1}"
                               for i in (10, 11)]
    changes = twin_changes(all_events(hub))
    assert [e["payload"]["properties"]["reported"]["seq"] for e in changes] == [9, 10, 11]
    assert [e["payload"]["version"] for e in changes] == [10, 11, 12]
    # A bad patch still gets its 400 on the fast path, and changes nothing.
    c.send(Publish(topic=REPORTED.format(12), payload=b"[1, 2]"))
    assert c.recv().topic.startswith("$iothub/twin/res/400/?$rid=12")  # type: ignore[union-attr]
    c.send(Publish(topic=REPORTED.format(13) + "&$version=3", payload=b'{"a": 1}'))
    assert c.recv().topic.startswith("$iothub/twin/res/412/?$rid=13")  # type: ignore[union-attr]
    assert len(twin_changes(all_events(hub))) == 3


def test_method_answers_pass_through(hub: HubProcess) -> None:
    info = create_device(hub, "dev2")
    c = connect(hub, ("dev2", info["authentication"]["symmetricKey"]["primaryKey"]),
                "$iothub/methods/POST/#")
    api = HubClient(hub.data_dir)
    answers = [b'{"t\xc3\xa9": [1, 2.5, null], "big": 123456789012345678901234567890}',
               b"plain text", b"", b'"just a string"', b'{"nan": NaN}']
    expected = [{"t\u00e9": [1, 2.5, None], "big": 123456789012345678901234567890},
                "plain text", None, "just a string", None]
    for body, want in zip(answers, expected):
        result: dict[str, Any] = {}

        def call() -> None:
            result["r"] = api.request("POST", "/twins/dev2/methods",
                                      {"methodName": "m", "payload": {"x": 1},
                                       "responseTimeoutInSeconds": 10})

        t = threading.Thread(target=call)
        t.start()
        request = c.recv()
        assert isinstance(request, Publish) and json.loads(request.payload) == {"x": 1}
        rid = request.topic.split("$rid=")[1]
        c.send(Publish(topic=f"$iothub/methods/res/201/?$rid={rid}", payload=body))
        t.join(10)
        assert result["r"]["status"] == 201
        if body == b'{"nan": NaN}':  # json's NaN goes back as json writes it
            assert str(result["r"]["payload"]["nan"]) == "nan"
        else:
            assert result["r"]["payload"] == want
