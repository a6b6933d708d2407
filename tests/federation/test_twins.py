"""Twins through two gateways: a desired patch at the top reaches an unmodified Azure SDK
device at the leaf within a second; patches made while links are down arrive once the links
return, reconciled by $version (each version at most once, in order, none lost); a local
desired write at the leaf is refused naming the owner; tags stay local."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from tests.federation.hierarchy import LEAF, Hierarchy, leaf_device, status, wait
from tests.hubproc import HubProcess
from tests.interop.conftest import DeviceSession


def _desired(hub: HubProcess, device_id: str) -> dict[str, Any]:
    twin = json.loads(hub.cli("twin", "show", device_id).stdout)
    return twin["properties"]["desired"]  # type: ignore[no-any-return]


def _reported(hub: HubProcess, device_id: str) -> dict[str, Any]:
    twin = json.loads(hub.cli("twin", "show", device_id).stdout)
    return twin["properties"]["reported"]  # type: ignore[no-any-return]


def _strip(doc: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in doc.items() if not k.startswith("$")}


def test_desired_patches_reach_the_leaf_and_reconcile(hierarchy: Hierarchy,
                                                       azure_python: Path) -> None:
    h = hierarchy
    leaf_device(h, "dev1")
    session = DeviceSession(azure_python, h.leaf.connection_string("dev1", gateway_host=LEAF),
                            h.leaf.ca_file)
    try:
        start = time.monotonic()
        h.top.cli("twin", "update", "dev1", "--desired", '{"rate": 5, "mode": "fast"}')
        patch = session.expect("desired", timeout=10)["desired"]
        took = time.monotonic() - start
        assert patch["rate"] == 5 and patch["$version"] == 2, patch
        assert took < 3, took  # CLI start-up included; the hop itself is milliseconds
        # the leaf's mirror keeps the owner's $version and names the owner
        desired = _desired(h.leaf, "dev1")
        assert desired["$version"] == 2 and _strip(desired) == {"rate": 5, "mode": "fast"}
        assert desired["$metadata"]["$owner"] == "the parent hub site.local"
        refused = h.leaf.cli("twin", "update", "dev1", "--desired", '{"rate": 1}', check=False)
        assert refused.returncode != 0 and "belong to the parent hub site.local" in refused.stderr
        h.leaf.cli("twin", "update", "dev1", "--tags", '{"rack": "b7"}')  # tags stay local
        # reported properties go up while linked
        session.send(cmd="report", patch={"temp": 20, "fw": "1.0"})
        session.expect("reported_ok")
        wait(lambda: _reported(h.top, "dev1").get("temp") == 20, 10, "reported at the top")
        before = _reported(h.top, "dev1")["$version"]
        # both links down (the site stops): three patches at the top meanwhile, and three
        # reports at the leaf, coalesced into one patch for the top
        h.site.stop()
        for body in ('{"rate": 6}', '{"mode": "eco"}', '{"rate": null, "led": true}'):
            h.top.cli("twin", "update", "dev1", "--desired", body)
        for patch in ({"temp": 21}, {"temp": 22, "hum": 5}, {"fw": None}):
            session.send(cmd="report", patch=patch)
            session.expect("reported_ok")
        h.leaf.kill()  # queued durably before the device's 204: survives kill -9
        h.leaf.start()
        session.send(cmd="connect")  # the SDK (connection_retry off) dials the leaf again
        session.expect("connected", timeout=30)
        top = _desired(h.top, "dev1")
        assert top["$version"] == 5
        h.site.start()
        for hub in (h.site, h.leaf):
            wait(lambda hub=hub: status(hub)["state"] == "connected", 30, "links back")
        catch_up = session.expect("desired", timeout=15)["desired"]
        assert catch_up["$version"] == 5, catch_up  # one patch with the difference
        assert catch_up["mode"] == "eco" and catch_up["led"] is True and catch_up["rate"] is None
        wait(lambda: _desired(h.leaf, "dev1")["$version"] == 5, 10, "the leaf's mirror")
        up = wait(lambda: (r := _reported(h.top, "dev1")).get("temp") == 22 and r, 15,
                  "offline reports at the top")
        assert {k: v for k, v in up.items() if not k.startswith("$")} == {"temp": 22, "hum": 5}
        assert up["$version"] == before + 1  # one coalesced patch
        assert _strip(_desired(h.leaf, "dev1")) == _strip(top) == {"mode": "eco", "led": True}
        # linked again: the next patch is live, once, with the next version
        h.top.cli("twin", "update", "dev1", "--desired", '{"rate": 7}')
        nxt = session.expect("desired", timeout=10)["desired"]
        assert nxt == {"rate": 7, "$version": 6}, nxt
        twin = json.loads(h.leaf.cli("twin", "show", "dev1").stdout)
        assert twin["tags"] == {"rack": "b7"}
        time.sleep(1.0)  # nothing repeated (a resync resends state; versions already had)
        assert session.events.empty() or all("desired" not in e for e in list(session.events.queue))
    finally:
        session.close()
