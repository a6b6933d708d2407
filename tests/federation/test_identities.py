"""Identities created at the top in a gateway's scope flow down (recursively: leaf -> site
-> top) with their keys: a device authenticates at the leaf, also while the leaf is offline;
disabled, rotated or deleted at the top, it is refused at the leaf at once when linked, and
after the links return (the full refresh) when it happened while they were down."""

from __future__ import annotations

import base64
import os

from gateway.hubclient import HubClient
from gateway.mqtt.packets import Connack
from tests.federation.hierarchy import LEAF, Hierarchy, leaf_device, show, status, wait
from tests.hubproc import device_token, username
from tests.mqttraw import Closed, RawClient


def _connect(h: Hierarchy, device_id: str, key: str) -> int:
    """CONNACK return code of a device connecting to the leaf with ``key``."""
    client = RawClient(h.leaf.port("mqtt_local_port"), host=LEAF)
    try:
        ack = client.connect(device_id, username(h.leaf, device_id),
                             device_token(h.leaf, device_id, key), clean=True)
        assert isinstance(ack, Connack)
        return ack.return_code
    except Closed:
        return -1
    finally:
        client.sock.close()


def _key(device: dict) -> str:  # type: ignore[type-arg]
    return device["authentication"]["symmetricKey"]["primaryKey"]  # type: ignore[no-any-return]


def test_identities_flow_down(hierarchy: Hierarchy) -> None:
    h = hierarchy
    dev = leaf_device(h, "dev2")
    at_site, at_leaf = show(h.site, "dev2"), show(h.leaf, "dev2")
    assert at_site is not None and at_leaf is not None
    assert _key(at_leaf) == _key(at_site) == _key(dev)
    site_leaf = show(h.site, "leaf")
    assert site_leaf is not None and at_site["parentScopes"] == [site_leaf["deviceScope"]]
    assert at_leaf["parentScopes"] == []  # the leaf's own device
    assert _connect(h, "dev2", _key(dev)) == 0
    # the leaf offline (both links down): the device still authenticates there
    h.site.stop()
    assert _connect(h, "dev2", _key(dev)) == 0
    h.site.start()
    for hub in (h.site, h.leaf):
        wait(lambda hub=hub: status(hub)["state"] == "connected", 30, "links back")
    # disabled at the top: refused at the leaf at once (a live connection is closed too)
    live = RawClient(h.leaf.port("mqtt_local_port"), host=LEAF)
    assert live.connect("dev2", username(h.leaf, "dev2"),
                        device_token(h.leaf, "dev2", _key(dev)), clean=True).return_code == 0  # type: ignore[attr-defined]
    h.top.cli("device", "update", "dev2", "--status", "disabled")
    wait(lambda: (show(h.leaf, "dev2") or {}).get("status") == "disabled", 5, "disabled at the leaf")
    try:
        live.recv(timeout=5)
        raise AssertionError("the live connection stayed open")
    except Closed:
        pass
    assert _connect(h, "dev2", _key(dev)) != 0
    h.top.cli("device", "update", "dev2", "--status", "enabled")
    wait(lambda: _connect(h, "dev2", _key(dev)) == 0, 5, "enabled again at the leaf")
    # key rotation at the top: the new key works at the leaf, the old one no longer
    api = HubClient(h.top.data_dir)
    body = api.request("GET", "/devices/dev2")
    new_key = base64.b64encode(os.urandom(32)).decode()
    body["authentication"]["symmetricKey"]["primaryKey"] = new_key
    api.request("PUT", "/devices/dev2", body, headers={"If-Match": "*"})
    wait(lambda: _connect(h, "dev2", new_key) == 0, 5, "the rotated key at the leaf")
    assert _connect(h, "dev2", _key(dev)) != 0
    # deleted at the top while linked: gone at the leaf at once
    h.top.cli("device", "delete", "dev2")
    wait(lambda: show(h.leaf, "dev2") is None and show(h.site, "dev2") is None, 5,
         "deleted below")
    assert _connect(h, "dev2", new_key) != 0
    # deleted while the links are down: gone once they return (the full refresh's sync)
    leaf_device(h, "dev3")
    h.site.stop()
    h.top.cli("device", "delete", "dev3")
    assert show(h.leaf, "dev3") is not None  # offline: the leaf cannot know yet
    h.site.start()
    wait(lambda: show(h.leaf, "dev3") is None, 30, "dev3 deleted at the leaf after the outage")
    # a device the leaf created itself is never touched by the refresh
    h.leaf.cli("device", "create", "local-only")
    h.site.cli("upstream", "status")
    assert show(h.leaf, "local-only") is not None
