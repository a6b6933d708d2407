"""Cloud-to-device through two gateways: a message sent at the top while the device is
offline moves into the leaf's durable queue; the device gets it at the leaf although the
leaf's link is down by then; the completion travels up when the links return, and only then
is the message gone at the top, with its feedback there."""

from __future__ import annotations

import json
import time
from pathlib import Path

from gateway.mqtt.packets import Connack, Puback, Publish, Suback, Subscribe
from tests.federation.hierarchy import LEAF, Hierarchy, leaf_device, show, status, wait
from tests.hubproc import device_token, username
from tests.interop.conftest import DeviceSession
from tests.mqttraw import RawClient


def _pending(h_hub, device_id: str) -> int:  # type: ignore[no-untyped-def]
    device = show(h_hub, device_id)
    assert device is not None
    return int(device["cloudToDeviceMessageCount"])


def test_c2d_to_an_offline_device_behind_two_gateways(hierarchy: Hierarchy,
                                                      azure_python: Path) -> None:
    h = hierarchy
    leaf_device(h, "dev4")
    sent = json.loads(h.top.cli("c2d", "send", "dev4", "--body", "hello", "--ack", "full",
                                "--message-id", "m-1", "--prop", "color=red").stdout)
    assert sent["messageId"] == "m-1"
    wait(lambda: _pending(h.leaf, "dev4") == 1, 10, "the message in the leaf's queue")
    assert _pending(h.top, "dev4") == 1  # still the top's until the device completes it
    h.site.stop()  # the leaf's link is down at delivery
    session = DeviceSession(azure_python, h.leaf.connection_string("dev4", gateway_host=LEAF),
                            h.leaf.ca_file)
    try:
        got = session.expect("c2d", timeout=45)["c2d"]  # (20 s once missed under load 15)
        assert got["body"] == "hello" and got["message_id"] == "m-1"
        assert got["props"].get("color") == "red"
        wait(lambda: _pending(h.leaf, "dev4") == 0, 10, "completed at the leaf")
        assert _pending(h.top, "dev4") == 1  # the completion waits for the link
        h.site.start()
        for hub in (h.site, h.leaf):
            wait(lambda hub=hub: status(hub)["state"] == "connected", 30, "links back")
        wait(lambda: _pending(h.top, "dev4") == 0, 20, "completed at the top")
        feedback = h.top.cli("c2d", "feedback", "--wait", "5").stdout
        records = [json.loads(line) for line in feedback.splitlines() if line.strip()]
        assert [r["originalMessageId"] for r in records] == ["m-1"], records
        assert records[0]["statusCode"] == "Success" and records[0]["deviceId"] == "dev4"
        # linked now: a second message is delivered live, once
        h.top.cli("c2d", "send", "dev4", "--body", "again", "--message-id", "m-2")
        assert session.expect("c2d", timeout=20)["c2d"]["body"] == "again"
        wait(lambda: _pending(h.top, "dev4") == 0, 20, "the second completed at the top")
        assert all("c2d" not in e for e in list(session.events.queue))  # nothing twice
    finally:
        session.close()


def test_c2d_sent_while_a_link_further_down_is_down(hierarchy: Hierarchy) -> None:
    """The top hands the message to the site while the site's link to the leaf is down (the
    site cannot pass it on). When the leaf links again, the message is handed down again at
    once (a resync from the site releases the top's lock), not after the top's 60 s lock
    period: the window in which this flaked under load was the leaf's link coming up."""
    h = hierarchy
    device = leaf_device(h, "dev9")
    key = device["authentication"]["symmetricKey"]["primaryKey"]
    h.leaf.stop()
    h.top.cli("c2d", "send", "dev9", "--body", "while-down", "--message-id", "w-1")
    time.sleep(1.0)  # handed to the site, which has no leaf to pass it to
    h.leaf.start()
    wait(lambda: status(h.leaf)["state"] == "connected", 30, "the leaf linked again")
    started = time.monotonic()
    wait(lambda: _pending(h.leaf, "dev9") == 1, 20, "the message in the leaf's queue")
    assert time.monotonic() - started < 20  # far inside the top's lock period
    client = RawClient(h.leaf.port("mqtt_local_port"), host=LEAF)
    try:
        ack = client.connect("dev9", username(h.leaf, "dev9"),
                             device_token(h.leaf, "dev9", key), clean=True)
        assert isinstance(ack, Connack) and ack.return_code == 0
        client.send(Subscribe(1, (("devices/dev9/messages/devicebound/#", 1),)))
        assert isinstance(client.recv(), Suback)
        got = client.recv()
        assert isinstance(got, Publish) and got.payload == b"while-down"
        assert got.packet_id is not None
        client.send(Puback(got.packet_id))
        wait(lambda: _pending(h.top, "dev9") == 0, 20, "completed at the top")
    finally:
        client.sock.close()
