"""Federation with both links going through fault proxies that cut them (RST and FIN, stalls)
while the top invokes methods, writes desired properties and sends C2D, and the device at the
leaf reports: every call answers 200 or 404 (never a hang past its timeout), and once the
links are left alone everything has converged: the leaf device's desired equals the top's and
it saw each $version at most once and in increasing order, the top holds the device's last
report, and every C2D message reached the device exactly once and left the top's queue.
The same with identity changes and configuration pushes made during the cuts."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from gateway.hubclient import HubClient
from tests.faultproxy import FaultProxy
from tests.federation.hierarchy import (
    LEAF,
    SITE,
    SITE_PROXY,
    TOP,
    TOP_PROXY,
    invoke,
    leaf_device,
    show,
    start,
    status,
    wait,
)
from tests.interop.conftest import DeviceSession


class Proxies:
    """Two fault proxies on their own event loop thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.proxies: dict[str, FaultProxy] = {}

    def dial(self, address: str, port: int) -> tuple[str, int]:
        listen = {TOP: TOP_PROXY, SITE: SITE_PROXY}[address]
        proxy = asyncio.run_coroutine_threadsafe(
            FaultProxy((listen, 0), (address, port)).start(), self.loop).result(10)
        self.proxies[address] = proxy
        return listen, proxy.port

    def schedule(self, cuts: int, seed: int) -> Any:
        async def both() -> None:
            await asyncio.gather(*(p.run_schedule(cuts, seed=seed + i, gap=(0.3, 1.2),
                                                  stall=(0.3, 1.5))
                                   for i, p in enumerate(self.proxies.values())))
        return asyncio.run_coroutine_threadsafe(both(), self.loop)

    def stop(self) -> None:
        for proxy in self.proxies.values():
            asyncio.run_coroutine_threadsafe(proxy.stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def _twin(hub: Any, device_id: str) -> dict[str, Any]:
    return json.loads(hub.cli("twin", "show", device_id).stdout)["properties"]  # type: ignore[no-any-return]


@pytest.mark.slow
def test_everything_converges_through_link_cuts(tmp_path: Path, azure_python: Path) -> None:
    proxies = Proxies()
    h = start(tmp_path, dial=proxies.dial)
    session = None
    try:
        leaf_device(h, "dev6")
        session = DeviceSession(azure_python,
                                h.leaf.connection_string("dev6", gateway_host=LEAF),
                                h.leaf.ca_file)
        cuts = proxies.schedule(8, seed=11)
        statuses = []
        for n in range(1, 13):
            h.top.cli("twin", "update", "dev6", "--desired", json.dumps({"n": n}))
            session.send(cmd="report", patch={"k": n})  # (events stay queued: read at the end)
            if n % 4 == 0:
                h.top.cli("c2d", "send", "dev6", "--body", f"m{n}", "--message-id", f"m{n}")
            answer, err, took = invoke(h.top, "dev6", "ping", n, timeout=5)
            status_ = answer["status"] if answer else (404 if "HTTP 404" in err else err)
            assert status_ in (200, 404), err
            assert took < 20, took
            statuses.append(status_)
        cuts.result(120)
        for hub in (h.site, h.leaf):
            wait(lambda hub=hub: status(hub)["state"] == "connected", 30, "links back")
        # converged: desired, reported, C2D
        wait(lambda: _twin(h.leaf, "dev6")["desired"].get("n") == 12, 30, "desired at the leaf")
        assert _twin(h.leaf, "dev6")["desired"]["$version"] == _twin(h.top, "dev6")["desired"]["$version"]
        wait(lambda: _twin(h.top, "dev6")["reported"].get("k") == 12, 30, "reported at the top")
        wait(lambda: (show(h.top, "dev6") or {}).get("cloudToDeviceMessageCount") == 0, 60,
             "C2D completed at the top")
        answer, err, _ = invoke(h.top, "dev6", "ping", 0, timeout=10)
        assert answer is not None and answer["status"] == 200, err
        time.sleep(1)
        events = list(session.events.queue)
        versions = [e["desired"]["$version"] for e in events if "desired" in e]
        assert versions == sorted(set(versions)), versions  # once each, in order
        bodies = [e["c2d"]["body"] for e in events if "c2d" in e]
        assert sorted(bodies) == ["m12", "m4", "m8"], bodies  # exactly once each
        assert 200 in statuses, statuses
    finally:
        if session is not None:
            session.close()
        h.stop()
        proxies.stop()


def _routing(hub: Any) -> dict[str, Any]:
    return HubClient(hub.data_dir).request("GET", "/routing")  # type: ignore[no-any-return]


@pytest.mark.slow
def test_identities_and_configuration_converge_through_link_cuts(tmp_path: Path) -> None:
    """While both links are cut, stalled and restored: identities created, disabled, re-keyed
    and deleted at the top, and three configuration pushes. Once the links are left alone the
    leaf holds exactly the top's identities (status and keys), none of the deleted ones, and
    runs the last push (reported at the top with its version)."""
    proxies = Proxies()
    h = start(tmp_path, dial=proxies.dial)
    try:
        leaf_device(h, "fx0")
        cuts = proxies.schedule(8, seed=23)
        api = HubClient(h.top.data_dir)
        for n in range(1, 7):
            h.top.cli("device", "create", f"fx{n}", "--parent", "leaf")
            if n % 2 == 0:
                h.top.cli("device", "update", f"fx{n - 1}", "--status", "disabled")
            if n % 3 == 0:
                body = api.request("GET", f"/devices/fx{n - 2}")
                key = base64.b64encode(os.urandom(32)).decode()
                body["authentication"]["symmetricKey"]["primaryKey"] = key
                api.request("PUT", f"/devices/fx{n - 2}", body, headers={"If-Match": "*"})
            if n in (2, 4, 6):
                h.top.cli("twin", "update", "leaf", "--desired", json.dumps({"routing": {
                    "routes": [{"name": f"r{n}", "source": "DeviceMessages",
                                "condition": "true", "endpointNames": ["events"]}]}}))
            if n == 5:
                h.top.cli("device", "delete", "fx0")
            time.sleep(0.3)
        cuts.result(120)
        for hub in (h.site, h.leaf):
            wait(lambda hub=hub: status(hub)["state"] == "connected", 30, "links back")

        def identities(hub: Any) -> dict[str, tuple[str, str]]:
            out = {}
            for n in range(7):
                device = show(hub, f"fx{n}")
                if device is not None:
                    out[f"fx{n}"] = (device["status"],
                                     device["authentication"]["symmetricKey"]["primaryKey"])
            return out

        top = identities(h.top)
        assert "fx0" not in top and len(top) == 6, top
        wait(lambda: identities(h.leaf) == top, 30,
             f"the leaf's identities equal the top's ({identities(h.leaf)} vs {top})")
        assert {s for s, _ in top.values()} == {"enabled", "disabled"}
        wait(lambda: {r["name"] for r in _routing(h.leaf)["routes"]} == {"r6"}, 30,
             "the last push at the leaf")
        version = json.loads(h.top.cli("twin", "show", "leaf").stdout)["properties"][
            "desired"]["$version"]

        def reported() -> bool:
            twin = json.loads(h.top.cli("twin", "show", "leaf").stdout)
            routing = twin["properties"]["reported"].get("routing") or {}
            return bool(routing.get("desiredVersion") == version
                        and routing.get("applied", {}).get("routes") == ["r6"])

        wait(reported, 30, "the leaf's report of the last push at the top")
    finally:
        h.stop()
        proxies.stop()
