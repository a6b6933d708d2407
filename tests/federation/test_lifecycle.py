"""Lifecycle events of identities created and deleted at a leaf flow up: the site and the top
record ``deviceLifecycleEvents`` stamped with the gateway path (``monitor-events
--all-kinds``), the identity exists at the top as the gateway's child while it exists at the
leaf, and one created while the leaf's link is down arrives when the link returns."""

from __future__ import annotations

import json

from tests.federation.hierarchy import Hierarchy, show, status, wait
from tests.hubproc import HubProcess, create_device


def _lifecycle(hub: HubProcess, device_id: str) -> list[tuple[str, str | None]]:
    out = hub.cli("monitor-events", "--from-beginning", "--all-kinds", "--timeout", "2",
                  "--json", "--device", device_id).stdout
    events = [json.loads(line)["event"] for line in out.splitlines() if line.strip()]
    return [(e["properties"]["application"]["opType"],
             e["annotations"].get("iothub-gateway-path")) for e in events
            if e["annotations"].get("iothub-message-source") == "deviceLifecycleEvents"
            and e.get("origin") == device_id]


def test_lifecycle_at_the_leaf_visible_at_the_top(hierarchy: Hierarchy) -> None:
    h = hierarchy
    create_device(h.leaf, "local1")
    wait(lambda: show(h.top, "local1"), 15, "local1 at the top")
    wait(lambda: _lifecycle(h.top, "local1") == [("createDeviceIdentity", "leaf;site")], 10,
         "the created event at the top")
    assert _lifecycle(h.site, "local1") == [("createDeviceIdentity", "leaf")]
    assert show(h.top, "local1")["authentication"]["type"] == "none"  # type: ignore[index]
    h.leaf.cli("module", "create", "local1", "probe")
    wait(lambda: h.top.cli("module", "show", "local1", "probe", check=False).returncode == 0,
         15, "the module at the top")

    h.leaf.cli("device", "delete", "local1")
    wait(lambda: show(h.top, "local1") is None, 15, "local1 deleted at the top")
    events = wait(lambda: (e := _lifecycle(h.top, "local1"))
                  and ("deleteDeviceIdentity", "leaf;site") in e and e, 10,
                  "the deleted event at the top")
    assert events[0] == ("createDeviceIdentity", "leaf;site")
    assert all(path == "leaf;site" for _, path in events), events
    assert show(h.site, "local1") is None

    # an identity pushed down from the top is the top's: a leaf-local delete does not
    # travel up as a deletion, and no event without the path is recorded for it
    create_device(h.top, "fromtop", "--parent", "leaf")
    wait(lambda: show(h.leaf, "fromtop"), 15, "fromtop at the leaf")
    h.leaf.cli("device", "delete", "fromtop")
    create_device(h.leaf, "marker")
    wait(lambda: show(h.top, "marker"), 15, "marker at the top")
    assert show(h.top, "fromtop") is not None
    assert [op for op, _ in _lifecycle(h.top, "fromtop")] == ["createDeviceIdentity"]

    # created while the leaf's link is down: it reaches the top when the link returns
    h.site.stop()
    wait(lambda: status(h.leaf)["state"] != "connected", 30, "the leaf's link down")
    create_device(h.leaf, "offline1")
    h.site.start()
    wait(lambda: status(h.leaf)["state"] == "connected", 60, "the leaf linked again")
    wait(lambda: show(h.top, "offline1"), 30, "offline1 at the top")
    wait(lambda: _lifecycle(h.top, "offline1") == [("createDeviceIdentity", "leaf;site")], 10,
         "its created event at the top")
