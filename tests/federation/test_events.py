"""Connection-state events of a device behind two gateways are visible at the top
(``monitor-events --all-kinds``), marked with the gateway path, and the top's registry shows
the device connected; module identities and module twins flow down as devices' do."""

from __future__ import annotations

import json
from pathlib import Path

from tests.federation.hierarchy import LEAF, Hierarchy, leaf_device, show, wait
from tests.interop.conftest import DeviceSession


def _states(h: Hierarchy, device_id: str) -> list[dict]:  # type: ignore[type-arg]
    out = h.top.cli("monitor-events", "--from-beginning", "--all-kinds", "--timeout", "2",
                    "--json", "--device", device_id).stdout
    events = [json.loads(line)["event"] for line in out.splitlines() if line.strip()]
    return [e for e in events if e.get("origin") == device_id
            and e["annotations"].get("iothub-message-source") == "deviceConnectionStateEvents"]


def test_connection_state_visible_at_the_top(hierarchy: Hierarchy, azure_python: Path) -> None:
    h = hierarchy
    leaf_device(h, "dev5")
    session = DeviceSession(azure_python, h.leaf.connection_string("dev5", gateway_host=LEAF),
                            h.leaf.ca_file)
    try:
        wait(lambda: (show(h.top, "dev5") or {}).get("connectionState") == "Connected", 10,
             "dev5 connected at the top")
        session.send(cmd="disconnect")
        session.expect("disconnected")
        wait(lambda: (show(h.top, "dev5") or {}).get("connectionState") == "Disconnected", 10,
             "dev5 disconnected at the top")
        states = wait(lambda: (s := _states(h, "dev5")) and len(s) >= 2 and s, 10, "events")
        assert [e["annotations"]["iothub-gateway-path"] for e in states[-2:]] == \
            ["leaf;site", "leaf;site"], states
        assert [e["properties"]["application"]["opType"] for e in states[-2:]] == \
            ["deviceConnected", "deviceDisconnected"]
    finally:
        session.close()


def test_module_identity_and_twin_flow_down(hierarchy: Hierarchy) -> None:
    h = hierarchy
    leaf_device(h, "dev7")
    h.top.cli("module", "create", "dev7", "sensor")
    wait(lambda: h.leaf.cli("module", "show", "dev7", "sensor", check=False).returncode == 0,
         15, "the module at the leaf")
    top_key = json.loads(h.top.cli("module", "show", "dev7", "sensor").stdout)
    leaf_key = json.loads(h.leaf.cli("module", "show", "dev7", "sensor").stdout)
    assert top_key["authentication"] == leaf_key["authentication"]
    h.top.cli("twin", "update", "dev7", "--module", "sensor", "--desired", '{"rate": 3}')

    def mirrored() -> bool:
        twin = json.loads(h.leaf.cli("twin", "show", "dev7", "--module", "sensor").stdout)
        return twin["properties"]["desired"].get("rate") == 3 and \
            twin["properties"]["desired"]["$version"] == 2

    wait(mirrored, 15, "the module's desired at the leaf")
