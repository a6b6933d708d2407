"""The unmodified ``azure-iot-hub`` registry manager at the top, unmodified Azure SDK devices at
the leaf, two gateways between: identity create (in the leaf's scope), a twin round trip,
methods (200, 504 from a silent device, 404 for an offline one, at once), disable, key
rotation and delete, each seen at the leaf."""

from __future__ import annotations

import base64
import json
import os
import time
from pathlib import Path

from gateway.mqtt.packets import Connack, Suback, Subscribe
from tests.federation.hierarchy import LEAF, show, start, wait
from tests.federation.test_identities import _connect
from tests.hubproc import device_token, username
from tests.interop.conftest import DeviceSession, service
from tests.mqttraw import RawClient


def test_registry_manager_at_the_top(tmp_path: Path, azure_python: Path) -> None:
    h = start(tmp_path, service_sdk=True)
    session = None
    silent = None
    try:
        scope = (show(h.top, "leaf") or {})["deviceScope"]
        created, offline, quiet = service(
            azure_python, h.top, {"op": "create_device", "device": "rm1", "scope": scope},
            {"op": "create_device", "device": "rm2", "scope": scope},
            {"op": "create_device", "device": "rm3", "scope": scope})
        assert "error" not in created, created
        wait(lambda: all(show(h.leaf, d) for d in ("rm1", "rm2", "rm3")), 15,
             "the identities at the leaf")
        assert (show(h.leaf, "rm1") or {})["authentication"]["symmetricKey"]["primaryKey"] \
            == created["primaryKey"]  # with the key the top made
        session = DeviceSession(azure_python,
                                h.leaf.connection_string("rm1", gateway_host=LEAF),
                                h.leaf.ca_file)
        # twin round trip: desired down to the device, reported up to the registry manager
        [twin] = service(azure_python, h.top, {"op": "update_twin", "device": "rm1",
                                               "patch": {"desired": {"rate": 5}}})
        assert twin["desired"]["rate"] == 5, twin
        assert session.expect("desired", timeout=15)["desired"]["rate"] == 5
        session.send(cmd="report", patch={"temp": 21})
        session.expect("reported_ok")

        def reported() -> object:
            [got] = service(azure_python, h.top, {"op": "get_twin", "device": "rm1"})
            return got.get("reported", {}).get("temp") == 21

        wait(reported, 20, "the report at the top", interval=0.5)
        # methods: 200 from the SDK device; 504 from a silent one; 404 at once when offline
        silent = RawClient(h.leaf.port("mqtt_local_port"), host=LEAF)
        ack = silent.connect("rm3", username(h.leaf, "rm3"),
                             device_token(h.leaf, "rm3", quiet["primaryKey"]), clean=True)
        assert isinstance(ack, Connack) and ack.return_code == 0
        silent.send(Subscribe(1, (("$iothub/methods/POST/#", 0),)))
        assert isinstance(silent.recv(), Suback)
        started = time.monotonic()
        ok, timed_out, not_online = service(
            azure_python, h.top,
            {"op": "invoke", "device": "rm1", "method": "reboot", "payload": {"delay": 2},
             "timeout": 10},
            {"op": "invoke", "device": "rm3", "method": "hang", "payload": None, "timeout": 5},
            {"op": "invoke", "device": "rm2", "method": "reboot", "payload": None,
             "timeout": 30})
        took = time.monotonic() - started
        assert ok == {"status": 200, "payload": {"echo": {"delay": 2}, "method": "reboot"}}, ok
        assert timed_out.get("status") == 504, timed_out
        assert not_online.get("status") == 404, not_online
        assert took < 5 + 20, took  # the 404 came at once, not after its 30 s
        # disable, rotate, delete at the top: each seen at the leaf
        [disabled] = service(azure_python, h.top, {
            "op": "update_device", "device": "rm2", "primary": offline["primaryKey"],
            "secondary": offline["primaryKey"], "status": "disabled", "scope": scope})
        assert disabled["status"] == "disabled", disabled
        wait(lambda: (show(h.leaf, "rm2") or {}).get("status") == "disabled", 10,
             "disabled at the leaf")
        assert _connect(h, "rm2", offline["primaryKey"]) != 0
        new_key = base64.b64encode(os.urandom(32)).decode()
        service(azure_python, h.top, {"op": "update_device", "device": "rm2", "primary": new_key,
                                      "secondary": new_key, "status": "enabled",
                                      "scope": scope})
        wait(lambda: _connect(h, "rm2", new_key) == 0, 10, "the rotated key at the leaf")
        assert _connect(h, "rm2", offline["primaryKey"]) != 0
        [deleted] = service(azure_python, h.top, {"op": "delete_device", "device": "rm2"})
        assert deleted == {"deleted": "rm2"}, deleted
        wait(lambda: show(h.leaf, "rm2") is None and show(h.site, "rm2") is None, 10,
             "deleted below")
        assert _connect(h, "rm2", new_key) != 0
        assert json.loads(h.top.cli("device", "show", "rm1").stdout)["connectionState"] \
            == "Connected"
    finally:
        if silent is not None:
            silent.sock.close()
        if session is not None:
            session.close()
        h.stop()
