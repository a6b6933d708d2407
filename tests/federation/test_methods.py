"""Direct methods at the top reach a device behind two gateways (leaf -> site -> top):
an unmodified Azure SDK device at the leaf answers 200; offline targets and links down on the
way answer 404 DeviceNotOnline at once; the caller's timeout holds end to end (504 from the
hop nearest the device, having been passed what was left)."""

from __future__ import annotations

from pathlib import Path

from gateway.mqtt.packets import Connack, Suback, Subscribe
from tests.federation.hierarchy import LEAF, Hierarchy, invoke, leaf_device, wait
from tests.hubproc import device_token, username
from tests.interop.conftest import DeviceSession
from tests.mqttraw import RawClient


def _sdk_device(h: Hierarchy, azure_python: Path, device_id: str) -> DeviceSession:
    cs = h.leaf.connection_string(device_id, gateway_host=LEAF)
    return DeviceSession(azure_python, cs, h.leaf.ca_file)


def test_method_through_two_gateways(hierarchy: Hierarchy, azure_python: Path) -> None:
    h = hierarchy
    leaf_device(h, "dev1")
    # offline at the leaf: 404 at once, named by the hop that knows
    answer, err, took = invoke(h.top, "dev1", "reboot", {"delay": 1})
    assert answer is None and "HTTP 404" in err and "dev1" in err, err
    assert took < 5, took
    session = _sdk_device(h, azure_python, "dev1")
    try:
        answer, err, took = invoke(h.top, "dev1", "reboot", {"delay": 3})
        assert answer == {"status": 200, "payload": {"echo": {"delay": 3}, "method": "reboot"}}, err
        assert session.expect("method")["payload"] == {"delay": 3}
        answer, err, _ = invoke(h.top, "dev1", "fail", [1, 2])  # the device's own status
        assert answer == {"status": 500, "payload": {"echo": [1, 2], "method": "fail"}}, err
        answer, _, _ = invoke(h.site, "dev1", "ping", 7)  # the site reaches it too (one hop)
        assert answer is not None and answer["status"] == 200, answer
        # the site <-> leaf link down: 404 at once from the top, not after the timeout
        h.leaf.stop()
        answer, err, took = invoke(h.top, "dev1", "reboot", None, timeout=30)
        assert answer is None and "HTTP 404" in err and "leaf" in err, err
        assert took < 5, took
        # and the top <-> site link down
        h.site.stop()
        answer, err, took = invoke(h.top, "dev1", "reboot", None, timeout=30)
        assert answer is None and "HTTP 404" in err and "site" in err, err
        assert took < 5, took
    finally:
        session.close()


def test_timeout_holds_end_to_end(hierarchy: Hierarchy) -> None:
    """A device that subscribes and never answers: the leaf times out first (it was passed
    the time left minus a margin per hop) and its 504 reaches the top in time."""
    h = hierarchy
    leaf_device(h, "silent")
    key = h.leaf.cli("device", "show", "silent").stdout
    import json
    primary = json.loads(key)["authentication"]["symmetricKey"]["primaryKey"]
    client = RawClient(h.leaf.port("mqtt_local_port"), host=LEAF)
    ack = client.connect("silent", username(h.leaf, "silent"),
                         device_token(h.leaf, "silent", primary), clean=True)
    assert isinstance(ack, Connack) and ack.return_code == 0
    client.send(Subscribe(1, (("$iothub/methods/POST/#", 0),)))
    assert isinstance(client.recv(), Suback)
    try:
        answer, err, took = invoke(h.top, "silent", "hang", None, timeout=5)
        assert answer is None and "HTTP 504" in err, err
        assert "4.5 s" in err, err  # the leaf's own wait: 5 s less two hops' margins
        assert 4.0 < took < 9, took
        # the request did reach the device
        wait(lambda: client.recv(timeout=1) is not None, 5, "the method request at the device")
    finally:
        client.sock.close()
