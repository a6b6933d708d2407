"""SIGKILL of the hub while a routed endpoint is down: nothing acknowledged is lost to that
endpoint (issue 9), through the whole path: routing on publish, the durable log with the
matched routes, the endpoint's cursor."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import paho.mqtt.client as paho
import pytest

from gateway.mqtt.packets import Puback, Publish
from tests.hubproc import HubProcess, create_device, device_token, username
from tests.mqttraw import RawClient
from tests.routing_peers import HOST, Mosquitto, wait_for

pytestmark = pytest.mark.slow


def test_kill_while_the_endpoint_is_down_loses_nothing(tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path / "mosquitto")
    broker.start()
    received: list[bytes] = []
    sub = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"k-{uuid.uuid4().hex[:6]}",
                      clean_session=False)
    sub.on_connect = lambda c, *_: c.subscribe("plant/#", qos=1)
    sub.on_message = lambda _c, _u, m: received.append(bytes(m.payload))
    sub.reconnect_delay_set(0.05, 0.5)
    sub.connect_async(HOST, broker.port, keepalive=30)
    sub.loop_start()
    hub = HubProcess(tmp_path / "data").start()
    try:
        hub.cli("endpoint", "create", "plant", "--type", "mqtt", "--url",
                f"mqtt://{HOST}:{broker.port}", "--topic", "plant/{deviceId}", "--envelope", "json")
        hub.cli("route", "create", "odd", "--endpoint", "plant",
                "--condition", "$body.n % 2 = 1")
        key = create_device(hub, "k1")["authentication"]["symmetricKey"]["primaryKey"]
        c = RawClient(hub.port("mqtt_tls_port"), ca_file=hub.ca_file)
        assert c.connect("k1", username(hub, "k1"), device_token(hub, "k1", key)).return_code == 0  # type: ignore[union-attr]

        def send(n: int) -> None:
            c.send(Publish(topic="devices/k1/messages/events/%24.ct=application%2Fjson&%24.ce=utf-8",
                           payload=json.dumps({"n": n}).encode(), qos=1, packet_id=n + 1))
            assert c.recv() == Puback(n + 1)

        for n in range(10):
            send(n)
        wait_for(lambda: len(received) >= 5, 30, "the first odd messages")
        broker.stop()
        for n in range(10, 40):  # acknowledged by the hub while the endpoint is down
            send(n)
        c.close()
        hub.kill()
        broker.start()
        hub.start()
        wait_for(lambda: len({json.loads(p)["body"]["n"] for p in received}) >= 20, 60,
                 "every odd message after the restart")
        seen = [json.loads(p)["body"]["n"] for p in received]
        assert sorted(set(seen)) == list(range(1, 40, 2))
        firsts = list(dict.fromkeys(seen))
        assert firsts == sorted(firsts)  # in order (at least once: repeats allowed)
    finally:
        hub.stop()
        sub.disconnect()
        sub.loop_stop()
        broker.stop()
