"""Configuration from the top: routing written in the leaf gateway's desired properties at
the top reaches the leaf (through the site, as a mirrored twin), is applied live, and what was
applied and refused comes back as the leaf's reported property at the top; the parent wins
for the names it lists, local items under other names stay. At the leaf the parent's items are
marked (``"owner": "parent"``, the CLI lists' last column) and a local change to one is
refused naming the owner, until the parent stops listing it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gateway.hubclient import HubClient
from tests.federation.hierarchy import NET, Hierarchy, start, wait


def _routing(hub: Any) -> dict[str, Any]:
    return HubClient(hub.data_dir).request("GET", "/routing")  # type: ignore[no-any-return]


def _names(doc: dict[str, Any], kind: str) -> set[str]:
    return {item["name"] for item in doc[kind]}


def _reported(h: Hierarchy) -> dict[str, Any] | None:
    twin = json.loads(h.top.cli("twin", "show", "leaf").stdout)
    return twin["properties"]["reported"].get("routing")  # type: ignore[no-any-return]


def test_routing_pushed_from_the_top(hierarchy: Hierarchy, tmp_path: Path) -> None:
    h = hierarchy
    HubClient(h.leaf.data_dir).request(  # a technician's own route at the leaf
        "PUT", "/routing/routes/mine",
        {"source": "DeviceMessages", "condition": "true", "endpointNames": ["events"]})
    archive = str(tmp_path / "archive")
    routing = {"endpoints": [{"name": "archive", "type": "file", "path": archive}],
               "routes": [{"name": "toArchive", "source": "DeviceMessages", "condition": "true",
                           "endpointNames": ["archive"], "priority": 2, "liveFirst": True},
                          {"name": "broken", "source": "DeviceMessages",
                           "endpointNames": ["nosuch"]}]}
    h.top.cli("twin", "update", "leaf", "--desired", json.dumps({"routing": routing}))
    wait(lambda: "toArchive" in _names(_routing(h.leaf), "routes"), 15, "the route at the leaf")
    doc = _routing(h.leaf)
    assert "archive" in _names(doc, "endpoints") and "mine" in _names(doc, "routes")
    assert "broken" not in _names(doc, "routes")
    report = wait(lambda: (r := _reported(h)) and r.get("applied", {}).get("routes") and r, 20,
                  "the leaf's report at the top")
    assert report["applied"]["routes"] == ["toArchive"]
    assert report["applied"]["endpoints"] == ["archive"]
    [refused] = report["refused"]
    assert refused["kind"] == "route" and refused["name"] == "broken"
    assert "nosuch" in refused["reason"]
    # parent-owned items are marked, and a local change to one is refused naming the owner
    doc = _routing(h.leaf)
    owners = {r["name"]: r.get("owner") for r in doc["routes"]}
    assert owners == {"mine": None, "toArchive": "parent"}, owners
    assert [e.get("owner") for e in doc["endpoints"] if e["name"] == "archive"] == ["parent"]
    listed = [line.split("\t") for line in h.leaf.cli("route", "list").stdout.splitlines()]
    assert {row[0]: row[3] for row in listed} == \
        {"mine": "local", "toArchive": "parent", "$fallback": "local"}
    assert h.leaf.cli("endpoint", "list").stdout.split("\n")[0].endswith("\tparent")
    shown = json.loads(h.leaf.cli("route", "show", "toArchive").stdout)
    assert shown["owner"] == "parent"
    assert (shown["priority"], shown["liveFirst"]) == (2, True)  # queue options travel too
    for args in (("route", "update", "toArchive", "--condition", "false"),
                 ("route", "delete", "toArchive"), ("endpoint", "delete", "archive")):
        out = h.leaf.cli(*args, check=False)
        assert out.returncode != 0, args
        assert "belongs to the parent hub site.local" in out.stderr, out.stderr
        assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert [r for r in _routing(h.leaf)["routes"] if r["name"] == "toArchive"][0][
        "condition"] == "true"  # nothing changed
    h.leaf.cli("route", "update", "mine", "--condition", "false")  # local ones stay changeable
    # the parent drops its route: removed at the leaf; the technician's stays
    routing["routes"] = []
    h.top.cli("twin", "update", "leaf", "--desired", json.dumps({"routing": routing}))
    wait(lambda: "toArchive" not in _names(_routing(h.leaf), "routes"), 15, "route removed")
    assert "mine" in _names(_routing(h.leaf), "routes")
    assert "archive" in _names(_routing(h.leaf), "endpoints")
    # what the parent no longer lists is no longer its own: local again
    routing["endpoints"] = []
    h.top.cli("twin", "update", "leaf", "--desired", json.dumps({"routing": routing}))
    wait(lambda: "archive" not in _names(_routing(h.leaf), "endpoints"), 15, "endpoint removed")
    h.leaf.cli("endpoint", "create", "archive", "--type", "file", "--path", archive)
    assert [e.get("owner") for e in _routing(h.leaf)["endpoints"]] == [None]


def _module_twin(hub: Any, module: str) -> dict[str, Any]:
    return json.loads(hub.cli("twin", "show", "leaf.local", "--module", module).stdout)  # type: ignore[no-any-return]


def _module_owner(hub: Any, module: str) -> str:
    rows = [line.split("\t") for line in hub.cli("module", "list", "leaf.local").stdout.splitlines()]
    return {row[0]: row[-1] for row in rows}[module]


def test_modules_pushed_from_the_top(tmp_path: Path) -> None:
    """``modules`` in the leaf gateway's desired properties at the top: a declared bridge
    (a real Modbus bridge process at the leaf) gets the document as its desired properties
    and runs it; an unknown module is refused with the reason; a local change to a listed
    module is refused naming the owner (as for routes), also after a restart; a key the
    parent drops goes; a module it stops listing is local again."""
    h = start(tmp_path, leaf_extra='[modules.modbus]\nbridge = "modbus"\nstatus_interval = 1.0\n')
    try:
        plc = {"tcp": {"host": f"{NET}.9", "port": 5020}, "timeout": 0.5}
        modules = {"modbus": {"buses": {"plc": plc, "spare": plc}, "devices": {}},
                   "ghost": {"x": 1}}
        h.top.cli("twin", "update", "leaf", "--desired", json.dumps({"modules": modules}))

        def report() -> dict[str, Any] | None:
            twin = json.loads(h.top.cli("twin", "show", "leaf").stdout)
            return twin["properties"]["reported"].get("modules")  # type: ignore[no-any-return]

        got = wait(lambda: (r := report()) and r.get("applied") and r, 30, "the report at the top")
        assert got["applied"] == ["modbus"]
        [refused] = got["refused"]
        assert refused["name"] == "ghost" and "no module 'ghost'" in refused["reason"]
        desired = _module_twin(h.leaf, "modbus")["properties"]["desired"]
        assert desired["buses"] == {"plc": plc, "spare": plc}

        def running(buses: set[str]) -> bool:
            twin = _module_twin(h.leaf, "modbus")
            config = twin["properties"]["reported"].get("config") or {}
            status_ = twin["properties"]["reported"].get("status") or {}
            return bool(config.get("applied")) and \
                config.get("version") == twin["properties"]["desired"]["$version"] and \
                set((status_.get("buses") or {})) == buses

        wait(lambda: running({"plc", "spare"}), 30, "the bridge running the pushed document")
        # the rule of routes holds for modules: a listed module's desired properties are the
        # parent's, a local write is refused naming the owner; `twin show` says who owns them
        twin = _module_twin(h.leaf, "modbus")
        assert twin["properties"]["desired"]["$metadata"]["$owner"] == "the parent hub site.local"
        out = h.leaf.cli("twin", "update", "leaf.local", "--module", "modbus", "--desired",
                         json.dumps({"buses": {"local": plc}}), check=False)
        assert out.returncode != 0
        assert "belong to the parent hub site.local (its configuration push sets them)" \
            in out.stderr, out.stderr
        assert len(out.stderr.strip().splitlines()) == 1, out.stderr
        assert _module_owner(h.leaf, "modbus") == "parent"  # `module list`'s last column
        h.leaf.cli("twin", "update", "leaf.local", "--module", "modbus", "--tags",
                   json.dumps({"room": "b2"}))  # tags stay local
        assert set(_module_twin(h.leaf, "modbus")["properties"]["desired"]["buses"]) == \
            {"plc", "spare"}
        h.leaf.stop()  # the rule survives a restart of the leaf
        h.leaf.start()
        out = h.leaf.cli("twin", "update", "leaf.local", "--module", "modbus", "--desired",
                         json.dumps({"buses": {"local": plc}}), check=False)
        assert out.returncode != 0 and "belong to the parent hub site.local" in out.stderr
        wait(lambda: running({"plc", "spare"}), 30, "the bridge running after the restart")
        # the parent drops a bus and the unknown module (a twin patch: null removes a key):
        # the bus goes at the leaf, live
        h.top.cli("twin", "update", "leaf", "--desired", json.dumps({"modules": {
            "modbus": {"buses": {"spare": None}}, "ghost": None}}))
        wait(lambda: running({"plc"}), 30, "the bridge running without the dropped bus")
        assert "spare" not in _module_twin(h.leaf, "modbus")["properties"]["desired"]["buses"]
        wait(lambda: (r := report()) and r["refused"] == [] and r, 20,
             f"the new report ({report()})")
        # the parent stops listing the module: it keeps its document and is local again
        h.top.cli("twin", "update", "leaf", "--desired", json.dumps({"modules": None}))
        wait(lambda: "$owner" not in _module_twin(h.leaf, "modbus")["properties"]["desired"][
            "$metadata"], 20, "the module local again")
        assert set(_module_twin(h.leaf, "modbus")["properties"]["desired"]["buses"]) == {"plc"}
        assert _module_owner(h.leaf, "modbus") == "local"
        h.leaf.cli("twin", "update", "leaf.local", "--module", "modbus", "--desired",
                   json.dumps({"buses": {"spare": plc}}))
        wait(lambda: running({"plc", "spare"}), 30, "the bridge running the local change")
    finally:
        h.stop()
