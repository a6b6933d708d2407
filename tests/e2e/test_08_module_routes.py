"""A route from one module's output to another module's input, durable while the target is
offline (IoT Hub ref §6)."""

from __future__ import annotations

import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.mqtt.packets import Puback, Publish, Suback, Subscribe
from tests.hubproc import HubProcess, create_device, device_token, username
from tests.mqttraw import RawClient

ROUTES = """[routes]
sensorToFilter = 'FROM /messages/modules/sensor/outputs/raw INTO BrokeredEndpoint("/modules/filter/inputs/in1")'
"""


@pytest.fixture
def routed_hub(tmp_path: Path) -> Iterator[HubProcess]:
    hub = HubProcess(tmp_path / "data", extra_config=ROUTES).start()
    yield hub
    hub.stop()


def module(hub: HubProcess, device_id: str, module_id: str) -> tuple[str, str, str]:
    import json

    info = json.loads(hub.cli("module", "create", device_id, module_id).stdout)
    return device_id, module_id, info["authentication"]["symmetricKey"]["primaryKey"]


def connect(hub: HubProcess, ident: tuple[str, str, str]) -> RawClient:
    d, m, key = ident
    c = RawClient(hub.port("mqtt_tls_port"), ca_file=hub.ca_file)
    ack = c.connect(f"{d}/{m}", username(hub, d, m), device_token(hub, d, key, module_id=m))
    assert ack.return_code == 0  # type: ignore[union-attr]
    return c


def test_module_output_reaches_other_module_input(routed_hub: HubProcess) -> None:
    hub = routed_hub
    create_device(hub, "edge1")
    sensor, filt = module(hub, "edge1", "sensor"), module(hub, "edge1", "filter")
    s = connect(hub, sensor)
    # sent while the filter module is offline: kept for it
    for i in range(3):
        s.send(Publish(topic=f"devices/edge1/modules/sensor/messages/events/%24.on=raw&n={i}",
                       payload=f"r{i}".encode(), qos=1, packet_id=i + 1))
        assert s.recv() == Puback(i + 1)
    s.send(Publish(topic="devices/edge1/modules/sensor/messages/events/%24.on=other",
                   payload=b"not routed", qos=1, packet_id=9))
    assert s.recv() == Puback(9)
    f = connect(hub, filt)
    f.send(Subscribe(packet_id=1, topics=(("devices/edge1/modules/filter/inputs/#", 1),)))
    assert f.recv() == Suback(1, (1,))
    got = []
    for _ in range(3):
        msg = f.recv()
        assert isinstance(msg, Publish)
        assert msg.topic.startswith("devices/edge1/modules/filter/inputs/in1/")
        bag = dict(urllib.parse.parse_qsl(msg.topic.split("/", 6)[6]))
        assert bag["$.cdid"] == "edge1" and bag["$.cmid"] == "sensor"
        got.append((msg.payload, bag["n"]))
        f.send(Puback(msg.packet_id))  # type: ignore[arg-type]
    assert got == [(b"r0", "0"), (b"r1", "1"), (b"r2", "2")]
    with pytest.raises(TimeoutError):
        f.recv(timeout=1.0)  # the unrouted output is not delivered
    # live delivery, and acknowledged messages are not delivered again after a reconnect
    s.send(Publish(topic="devices/edge1/modules/sensor/messages/events/%24.on=raw&n=3",
                   payload=b"r3", qos=1, packet_id=10))
    live = f.recv()
    assert isinstance(live, Publish) and live.payload == b"r3"
    f.send(Puback(live.packet_id))  # type: ignore[arg-type]
    f.close()
    f2 = connect(hub, filt)
    with pytest.raises(TimeoutError):
        f2.recv(timeout=1.5)


@pytest.mark.parametrize("route,fragment", [
    ("FROM /messages INTO nowhere", "endpoint 'nowhere' does not exist"),
    ("FROM /messages WHERE a = = 1 INTO $upstream", "unexpected '=' at column 26 of the route"),
])
def test_bad_route_is_a_clear_config_error(tmp_path: Path, route: str, fragment: str) -> None:
    hub = HubProcess(tmp_path / "data", extra_config=f"[routes]\nbad = '{route}'\n")
    with pytest.raises(RuntimeError) as err:
        hub.start(timeout=15)
    assert "route 'bad'" in str(err.value) and fragment in str(err.value)
    assert len(str(err.value).strip().splitlines()) == 2  # "hub exited" + one error line
