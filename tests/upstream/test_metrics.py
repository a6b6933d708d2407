"""GET /metrics: Prometheus text for the whole hub (connections, messages in and out, commit
latency histogram, upstream backlog and drops), behind a service policy token."""

from __future__ import annotations

import asyncio
import base64
import os
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.hubclient import ApiError, HubClient
from tests.hubproc import create_device
from tests.upstream.federation import CHILD_ADDRESS, PARENT_ADDRESS, child_hub, free_port
from tests.upstream.load import Device, run_device


def test_metrics(tmp_path) -> None:  # type: ignore[no-untyped-def]
    hub = child_hub(tmp_path).start()
    try:
        key = base64.b64encode(os.urandom(32)).decode()
        hub.cli("upstream", "set", "--connection-string",
                f"HostName=parent.local;DeviceId=gw;SharedAccessKey={key}",
                "--host", PARENT_ADDRESS, "--port", str(free_port(PARENT_ADDRESS)))
        info = create_device(hub, "m1")
        dev = Device("m1", info["authentication"]["symmetricKey"]["primaryKey"])

        async def load() -> None:
            await run_device(dev, hub.host_name, CHILD_ADDRESS,
                             lambda: hub.port("mqtt_local_port"), asyncio.Event(), count=50)

        asyncio.run(load())
        client = HubClient(hub.data_dir)

        def scrape() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
            with client._open("GET", "/metrics") as response:
                assert response.headers["Content-Type"].startswith("text/plain")
                text = response.read().decode()
            return {(s.name, tuple(sorted(s.labels.items()))): s.value
                    for f in text_string_to_metric_families(text) for s in f.samples}

        deadline = time.monotonic() + 10  # the forwarder reads the log asynchronously
        while True:
            samples = scrape()
            key = ("gateway_upstream_backlog_messages", (("route", "$upstream"),))
            if samples.get(key) == 50 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert samples[("gateway_messages_in_total", ())] >= 50
        assert samples[("gateway_store_commit_seconds_count", ())] > 0
        assert samples[("gateway_upstream_backlog_messages", (("route", "$upstream"),))] == 50
        assert samples[("gateway_upstream_state", (("state", "connected"),))] == 0
        assert ("gateway_connections", (("state", "open"),)) in samples
        assert samples[("gateway_messages_out_total", (("endpoint", "$upstream"),))] == 0
        client._policy = "device"  # not signed for that policy: refused like every API call
        with pytest.raises(ApiError):
            client._open("GET", "/metrics")
    finally:
        hub.stop()
