"""The Upstream screen: set the parent's connection string, test the link step by step, and
watch the backlog grow while the link is cut (tests/faultproxy.py between the hubs) and drain
when it is back."""

from __future__ import annotations

import asyncio
import ssl
import threading
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import paho.mqtt.client as mqtt
import pytest

from gateway.hub.sas import generate_sas_token
from tests.faultproxy import FaultProxy
from tests.hubproc import HubProcess, create_device
from tests.ui.conftest import ADDRESS, base_url, start_hub
from tests.ui.ui import by_id, console_errors, login, shots, until

PARENT = "127.0.25.71"
T = TypeVar("T")
CHILD_CONFIG = ("[upstream]\nreconnect_min = 0.05\nreconnect_max = 0.5\nkeepalive = 5\n"
                "ack_timeout = 5.0\nstatus_interval = 1.0\n")


class Loop:
    """An event loop on a thread, for the async peers of a synchronous browser test."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(60)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def loop() -> Iterator[Loop]:
    lp = Loop()
    yield lp
    lp.close()


def publisher(hub: HubProcess, device_id: str, key: str, stop: threading.Event) -> threading.Thread:
    """A device sending a QoS 1 message every 50 ms until ``stop``."""
    def run() -> None:
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=device_id,
                             protocol=mqtt.MQTTv311)
        token = generate_sas_token(f"{hub.host_name}/devices/{device_id}", key,
                                   int(time.time()) + 3600)
        client.username_pw_set(f"{hub.host_name}/{device_id}/?api-version=2021-04-12", token)
        ctx = ssl.create_default_context(cafile=hub.ca_file)
        ctx.check_hostname = False
        client.tls_set_context(ctx)
        client.connect(ADDRESS, hub.info["mqtt_tls_port"])
        client.loop_start()
        n = 0
        while not stop.is_set():
            n += 1
            client.publish(f"devices/{device_id}/messages/events/", f'{{"n": {n}}}', qos=1)
            time.sleep(0.05)
        client.loop_stop()
        client.disconnect()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def number(text: str) -> int:
    return int(text.split()[0]) if text and text[0].isdigit() else -1


@pytest.mark.slow
def test_upstream_set_test_and_backlog_while_cut(tmp_path: Path, browser: Any, artifacts: Path,
                                                 loop: Loop) -> None:
    parent = HubProcess(tmp_path / "parent", host_name="parent.local", address=PARENT,
                        log_level="info").start()
    child = start_hub(tmp_path, CHILD_CONFIG)
    target = (PARENT, parent.info["mqtt_tls_port"])
    proxy = loop.run(FaultProxy((PARENT, 0), target).start())
    stop = threading.Event()
    try:
        create_device(parent, "child-gw", "--edge")
        cs = parent.connection_string("child-gw")
        url = base_url(child)
        login(browser, url)
        until(lambda: by_id(browser, "uptime").text not in ("", "…"), what="overview")
        browser.get(url + "/ui/upstream")
        until(lambda: by_id(browser, "up-state").text == "not set", what="not set")
        by_id(browser, "up-connstr").send_keys(cs)
        by_id(browser, "up-host").send_keys(PARENT)
        by_id(browser, "up-port").send_keys(str(proxy.port))
        by_id(browser, "up-ca").send_keys(parent.ca_file)
        by_id(browser, "upstream-form").submit()
        until(lambda: by_id(browser, "up-state").text == "connected", 60, "connected")
        assert "child-gw" in by_id(browser, "up-target").text
        by_id(browser, "up-test").click()
        steps = until(lambda: [s.text for s in browser.find_elements("css selector", "#up-steps li")
                               if "testing" not in s.text], 60, "probe steps")
        assert len(steps) >= 3 and all(s.startswith("OK") for s in steps), steps
        shots(browser, artifacts, "upstream-connected")
        dev = create_device(child, "sensor-1")
        publisher(child, "sensor-1", dev["authentication"]["symmetricKey"]["primaryKey"], stop)
        # Cut the link: the backlog grows, the oldest message ages, nothing drains.
        loop.run(proxy.stop())
        until(lambda: by_id(browser, "up-state").text != "connected", 60, "link down")
        until(lambda: number(by_id(browser, "up-backlog").text) >= 40, 60, "backlog growing")
        until(lambda: by_id(browser, "up-drain").text == "not draining", 30, "not draining")
        assert by_id(browser, "up-oldest").text not in ("0 s", "–")
        browser.get(url + "/")
        until(lambda: number(by_id(browser, "backlog").text) >= 40, 30, "overview backlog")
        shots(browser, artifacts, "overview-link-cut")
        browser.get(url + "/ui/upstream")
        shots(browser, artifacts, "upstream-link-cut")
        stop.set()
        # The link is back: the backlog drains to zero.
        proxy2 = loop.run(FaultProxy((PARENT, proxy.port), target).start())
        try:
            until(lambda: by_id(browser, "up-state").text == "connected", 60, "reconnected")
            until(lambda: number(by_id(browser, "up-backlog").text) == 0, 90, "drained")
        finally:
            loop.run(proxy2.stop())
        assert console_errors(browser) == []
        assert "PUT /upstream" in child.log_text()
    finally:
        stop.set()
        child.stop()
        parent.stop()
