"""The built-in endpoint read as an Event Hub by the unmodified azure-eventhub
EventHubConsumerClient (its own venv), over AMQP/TLS and AMQP over WebSocket.

Telemetry is sent with paho over MQTT/TLS on an ephemeral port (the device SDK's fixed 8883
is exercised by test_azure_service_amqp.py under the ports lock). The AMQP listener is on
127.0.8.1 (this suite's loopback address), and the clients are pointed at it with
``custom_endpoint_address`` while their connection string keeps the hub's name, as a back
end reaching an IoT Hub through a private endpoint does.
"""

from __future__ import annotations

import json
import queue
import ssl
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest

from gateway.hub.sas import generate_sas_token
from tests.hubproc import HubProcess, create_device, device_token, username
from tests.interop.conftest import SDK_DIR

pytestmark = pytest.mark.interop

ADDRESS = "127.0.8.1"


@pytest.fixture(scope="module")
def eh_hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubProcess]:
    proc = HubProcess(tmp_path_factory.mktemp("eventhub") / "data",
                      hub_config=f'addresses = ["{ADDRESS}"]\n',
                      amqp_config=f'port = 0\nbind = "{ADDRESS}"\nconsumer_groups = ["backend"]\n')
    proc.start()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def sender(eh_hub: HubProcess) -> Iterator[Publisher]:
    device = create_device(eh_hub, "ehdev")
    pub = Publisher(eh_hub, "ehdev", device["authentication"]["symmetricKey"]["primaryKey"])
    yield pub
    pub.close()


class Publisher:
    """A paho 2 device connection publishing telemetry at QoS 1 with a property bag."""

    def __init__(self, hub: HubProcess, device_id: str, key: str) -> None:
        self.acked: queue.Queue[int] = queue.Queue()
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=device_id,
                                  protocol=paho.MQTTv311)
        self.client.username_pw_set(username(hub, device_id), device_token(hub, device_id, key))
        self.client.tls_set(ca_certs=hub.ca_file, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        self.client.on_publish = lambda c, u, mid, rc, p: self.acked.put(mid)
        self.device_id = device_id
        self.client.connect("localhost", hub.port("mqtt_tls_port"))
        self.client.loop_start()

    def send(self, tag: str, n: int) -> None:
        bag = (f"%24.mid={tag}-{n}&%24.cid=corr-{n}&%24.ct=application%2Fjson&%24.ce=utf-8"
               f"&tag={tag}&n={n}")
        info = self.client.publish(f"devices/{self.device_id}/messages/events/{bag}",
                                   json.dumps({"tag": tag, "n": n}), qos=1)
        mid = info.mid
        deadline = time.monotonic() + 30
        while self.acked.get(timeout=max(deadline - time.monotonic(), 0.1)) != mid:
            pass

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class Consumer:
    """eventhub_session.py in the Azure venv: events and errors as JSON lines."""

    def __init__(self, python: Path, hub: HubProcess, **options: Any) -> None:
        args = {"connection_string": options.pop("connection_string", None)
                or hub.cli("events", "connection-string").stdout.strip(),
                "ca_file": hub.ca_file, **options}
        if "endpoint" not in args:
            args["endpoint"] = endpoint(hub, websocket=bool(options.get("websocket")))
        self.proc = subprocess.Popen([str(python), str(SDK_DIR / "eventhub_session.py"),
                                      json.dumps(args)], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.lines: queue.Queue[dict[str, Any]] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.strip():
                self.lines.put(json.loads(line))

    def next(self, key: str, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                item = self.lines.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                err = ""
                if self.proc.poll() is not None and self.proc.stderr is not None:
                    err = self.proc.stderr.read()[-3000:]
                raise AssertionError(f"no {key!r} from the consumer in {timeout} s {err}") from None
            if key in item:
                return item
            if "error" in item:
                raise AssertionError(f"consumer error: {item['error']}")

    def events(self, count: int, timeout: float = 60) -> list[dict[str, Any]]:
        return [self.next("event", timeout)["event"] for _ in range(count)]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()


def endpoint(hub: HubProcess, *, websocket: bool = False) -> str:
    if websocket:
        return f"sb://127.0.0.1:{hub.port('api_port')}"
    return f"sb://{ADDRESS}:{hub.port('amqp_port')}"


def test_connection_string_is_event_hubs_shaped(eh_hub: HubProcess) -> None:
    cs = eh_hub.cli("events", "connection-string").stdout.strip()
    parts = dict(p.split("=", 1) for p in cs.split(";"))
    assert parts["Endpoint"] == f"sb://{eh_hub.host_name}/"
    assert parts["SharedAccessKeyName"] == "iothubowner" and parts["EntityPath"] == "testhub"
    service = eh_hub.cli("events", "connection-string", "--policy-name", "service",
                         "--key-type", "secondary").stdout.strip()
    assert "SharedAccessKeyName=service;" in service and service != cs


def test_properties_and_annotations_from_a_sequence_number(
        eh_hub: HubProcess, sender: Publisher, azure_python: Path) -> None:
    tag = uuid.uuid4().hex[:8]
    first = Consumer(azure_python, eh_hub, properties=True, start="@latest", count=1, timeout=20)
    props = first.next("properties")["properties"]
    first.close()
    assert props["eventhub"]["eventhub_name"] == "testhub"
    assert props["eventhub"]["partition_ids"] == ["0"]
    before = props["partition"]["last_enqueued_sequence_number"]
    for n in range(3):
        sender.send(tag, n)
    consumer = Consumer(azure_python, eh_hub, start={"sequence": before}, count=3)
    try:
        got = consumer.events(3)
        events = [e for e in got if e["properties"].get("tag") == tag]
    finally:
        consumer.close()
    assert [e["body"] for e in events] == [json.dumps({"tag": tag, "n": n}) for n in range(3)]
    event = events[0]
    assert event["properties"] == {"tag": tag, "n": "0"}
    assert event["message_id"] == f"{tag}-0" and event["content_type"] == "application/json"
    annotations = event["annotations"]
    assert annotations["iothub-connection-device-id"] == "ehdev"
    assert annotations["iothub-message-source"] == "Telemetry"
    assert json.loads(annotations["iothub-connection-auth-method"])["type"] == "sas"
    assert "iothub-enqueuedtime" in annotations and "x-opt-enqueued-time" in annotations
    assert event["sequence_number"] == before + 1 == annotations["x-opt-sequence-number"]
    assert event["offset"] == str(before + 1) == annotations["x-opt-offset"]
    assert event["system"]["correlation-id"] == "corr-0"
    assert [e["sequence_number"] for e in events] == [before + 1, before + 2, before + 3]


def test_from_latest_sees_only_new_events(eh_hub: HubProcess, sender: Publisher,
                                          azure_python: Path) -> None:
    old = uuid.uuid4().hex[:8]
    new = uuid.uuid4().hex[:8]
    sender.send(old, 0)
    consumer = Consumer(azure_python, eh_hub, start="@latest", count=1, timeout=60)
    try:
        consumer.next("initialized")
        got: list[dict[str, Any]] = []
        n = 0
        while not got:  # the link attaches some time after initialize: send until it reads
            sender.send(new, n)
            n += 1
            try:
                got.append(consumer.next("event", timeout=1.0)["event"])
            except AssertionError:
                assert n < 60, "the @latest receiver never read anything"
    finally:
        consumer.close()
    assert got[0]["properties"]["tag"] == new


def test_from_an_enqueued_time(eh_hub: HubProcess, sender: Publisher,
                               azure_python: Path) -> None:
    early, late = uuid.uuid4().hex[:8], uuid.uuid4().hex[:8]
    sender.send(early, 0)
    time.sleep(0.05)
    cut = int(time.time() * 1000)
    time.sleep(0.05)
    sender.send(late, 0)
    sender.send(late, 1)
    consumer = Consumer(azure_python, eh_hub, start={"time_ms": cut}, count=2)
    try:
        events = consumer.events(2)
    finally:
        consumer.close()
    assert [e["properties"]["tag"] for e in events] == [late, late]
    assert [e["properties"]["n"] for e in events] == ["0", "1"]


@pytest.mark.parametrize("transport", ["websocket", "tls-uamqp"])
def test_other_transports(eh_hub: HubProcess, sender: Publisher, azure_python: Path,
                          transport: str) -> None:
    """AMQP over WebSocket on the HTTPS port (``/$servicebus/websocket``). azure-eventhub's
    pure-Python WebSocket transport needs websocket-client, which the Azure venv does not
    have; its uamqp transport (uamqp comes with azure-iot-hub) speaks WebSocket itself."""
    tag = uuid.uuid4().hex[:8]
    probe = Consumer(azure_python, eh_hub, properties=True, start="@latest", count=1, timeout=5)
    before = probe.next("properties")["properties"]["partition"]["last_enqueued_sequence_number"]
    probe.close()
    sender.send(tag, 0)
    sender.send(tag, 1)
    consumer = Consumer(azure_python, eh_hub, start={"sequence": before}, count=2,
                        websocket=transport == "websocket", uamqp=True, consumer_group="backend")
    try:
        events = consumer.events(2)
    finally:
        consumer.close()
    assert [e["properties"]["tag"] for e in events] == [tag, tag]
    assert events[0]["annotations"]["iothub-connection-device-id"] == "ehdev"
    assert events[0]["sequence_number"] == before + 1


def _policy_key(hub: HubProcess, name: str) -> str:
    cs = hub.cli("policy", "connection-string", name).stdout.strip()
    return dict(p.split("=", 1) for p in cs.split(";"))["SharedAccessKey"]


def _refusal(python: Path, hub: HubProcess, **options: Any) -> dict[str, str]:
    consumer = Consumer(python, hub, start="@latest", count=1, timeout=30, **options)
    try:
        return consumer.next("error", timeout=60)["error"]
    finally:
        consumer.close()


def test_refusals(eh_hub: HubProcess, azure_python: Path) -> None:
    host = eh_hub.host_name
    good = eh_hub.cli("events", "connection-string").stdout.strip()
    wrong_key = good.replace(_policy_key(eh_hub, "iothubowner"), "d3Jvbmcga2V5IHdyb25nIGtleSB3cm9uZyBrZXk=")
    error = _refusal(azure_python, eh_hub, connection_string=wrong_key)
    assert "401" in error["message"] and "bad signature" in error["message"], error

    expired = generate_sas_token(f"sb://{host}/testhub", _policy_key(eh_hub, "service"),
                                 int(time.time()) - 3600, "service")
    cs = f"Endpoint=sb://{host}/;SharedAccessSignature={expired};EntityPath=testhub"
    error = _refusal(azure_python, eh_hub, connection_string=cs)
    assert "401" in error["message"] and "expired" in error["message"], error

    read_only = good.replace("iothubowner", "registryRead").replace(
        _policy_key(eh_hub, "iothubowner"), _policy_key(eh_hub, "registryRead"))
    error = _refusal(azure_python, eh_hub, connection_string=read_only)
    # the client's $management request comes first and is refused (the client reports
    # amqp:unauthorized-access as ErrorCondition.UnauthorizedAccess); a link attach is refused
    # the same way (tests/amqp/test_engine.py attaches one directly)
    assert "UnauthorizedAccess" in error["message"], error
    assert "ServiceConnect" in error["message"], error

    error = _refusal(azure_python, eh_hub, consumer_group="nosuchgroup")
    assert "amqp:not-found" in error["message"] and "nosuchgroup" in error["message"], error

    # the client checks a receiver's partition against $management's list itself...
    error = _refusal(azure_python, eh_hub, partition="3")
    assert "Wrong partition id:3" in error["message"], error
    # ...and $management refuses to describe one that does not exist
    error = _refusal(azure_python, eh_hub, properties=True, properties_partition="3")
    assert "Status code: 400" in error["message"], error
    assert "The specified partition is invalid" in error["message"], error
