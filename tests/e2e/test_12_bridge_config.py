"""A bridge runs exactly its twin's desired document, and says so: after a refused patch the
next good one is applied whole (not merged into the last accepted document), ``config`` in the
reported properties tells which version runs, and a removed bus or device leaves the reported
status. The hub's supervisor runs the real Modbus bridge, polling a pymodbus server."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from gateway.hubclient import HubClient
from tests.hubproc import HubProcess
from tests.hw.modbus.peers import tcp_peer
from tests.waiting import eventually

GW = "testhub.local"
PLAIN = {"holding": {0: list(range(100, 120))}}


async def test_the_bridge_runs_its_twin_whole_and_reports_exactly_that(tmp_path: Path) -> None:
    async with tcp_peer({1: PLAIN, 2: PLAIN}) as plc, tcp_peer({3: PLAIN}) as old:
        hub = HubProcess(tmp_path / "data", host_name=GW,
                         extra_config='[modules.modbus]\nbridge = "modbus"\n'
                                      'status_interval = 0.5\n')
        await asyncio.to_thread(hub.start)
        try:
            await scenario(HubClient(hub.data_dir), plc.port, old.port)
            assert hub.log_text().count("module started module=modbus") == 1
        finally:
            await asyncio.to_thread(hub.stop)


async def scenario(api: HubClient, plc_port: int, old_port: int) -> None:
    path = f"/twins/{GW}/modules/modbus"

    async def patch(desired: dict[str, Any]) -> int:
        twin = await asyncio.to_thread(api.request, "PATCH", path,
                                       {"properties": {"desired": desired}})
        return int(twin["properties"]["desired"]["$version"])

    def reported() -> dict[str, Any]:
        return api.request("GET", path)["properties"]["reported"]  # type: ignore[no-any-return]

    async def until(check: Any, what: str) -> dict[str, Any]:
        """The reported properties, once ``check`` holds for them."""
        def ready() -> dict[str, Any] | None:
            r = reported()
            return r if check(r) else None

        return await eventually(ready, 30, what, interval=0.2, blocking=True)  # type: ignore[no-any-return]

    def bus(port: int) -> dict[str, Any]:
        return {"tcp": {"host": "127.0.0.1", "port": port}, "timeout": 0.5}

    def meter(bus: str, unit: int, interval: float) -> dict[str, Any]:
        return {"bus": bus, "unit": unit, "interval": interval,
                "registers": {"r0": {"address": 0}}}

    v1 = await patch({"buses": {"plc": bus(plc_port), "old": bus(old_port)},
                      "devices": {"m1": meter("plc", 1, 10), "m2": meter("plc", 2, 10),
                                  "m3": meter("old", 3, 10)}})
    r = await until(lambda r: set(r.get("status", {}).get("devices", {})) == {"m1", "m2", "m3"}
                    and r["status"]["buses"].get("old", {}).get("state") == "up",
                    "the first document to run")
    assert r["config"]["applied"] is True and r["config"]["desiredVersion"] == v1
    assert "error" not in r["config"]

    # a refused patch: the error is shown, and not beside "applied": true
    v2 = await patch({"devices": {"m1": {"interval": 2, "bogus": 1}}})
    r = await until(lambda r: r["config"].get("error"), "the refusal")
    assert "devices.m1.bogus" in r["config"]["error"]
    assert r["config"]["applied"] is False
    assert r["config"]["version"] == v1 and r["config"]["desiredVersion"] == v2
    assert r["status"]["devices"]["m1"]["interval"] == 10  # the last accepted one runs

    # the next patch makes the twin's document valid: that whole document runs (interval 2,
    # from the refused patch), not the last accepted one merged with this patch (interval 10)
    v3 = await patch({"devices": {"m1": {"bogus": None}}})
    r = await until(lambda r: r["status"]["devices"]["m1"]["interval"] == 2,
                    "the twin's document")
    assert r["config"]["applied"] is True and r["config"]["desiredVersion"] == v3
    assert "error" not in r["config"]

    # a removed bus and a removed device disappear from the reported status
    v4 = await patch({"buses": {"old": None}, "devices": {"m2": None, "m3": None}})
    r = await until(lambda r: "old" not in r["status"]["buses"]
                    and set(r["status"]["devices"]) == {"m1"}, "the removed bus and devices")
    assert set(r["status"]["buses"]) == {"plc"}
    assert r["config"]["applied"] is True
