"""The README's command blocks run as written, in the order written, against one real hub.

Every ```sh block preceded by ``<!-- readme-test -->`` is run by bash, one after the other in
one working directory (files a block writes, such as ``hub-ca.pem``, are there for the next),
with ``gateway`` meaning this hub's CLI. Only where the hub is changes: ``gw-plant-7.local``
with ports 8883 and 443 becomes localhost with the hub's ephemeral ports, and the Modbus TCP
device ``192.0.2.10:502`` a pymodbus server here. A block that fails fails the test with its
output; the effects are checked at the end (telemetry stored, the register written).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

from gateway.hubclient import HubClient
from tests.hubproc import REPO, HubProcess
from tests.hw.modbus.peers import tcp_peer
from tests.waiting import eventually

MARK = "<!-- readme-test -->"
BLOCK = re.compile(re.escape(MARK) + r"\n```sh\n(.*?)\n```", re.S)


def readme_blocks() -> list[str]:
    return BLOCK.findall((REPO / "README.md").read_text())


def test_the_readme_marks_its_command_blocks() -> None:
    text = (REPO / "README.md").read_text()
    blocks = readme_blocks()
    assert len(blocks) == text.count(MARK) >= 11  # every mark sits on a sh block
    joined = "\n".join(blocks)
    for needed in ("gateway device create", "gateway module create", "gateway token device",
                   "gateway token policy", "mosquitto_pub", "curl", "gateway twin update",
                   "gateway c2d send", "write_register"):
        assert needed in joined, needed


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_every_marked_readme_block_runs_as_written(tmp_path: Path) -> None:
    for tool in ("mosquitto_pub", "curl", "openssl"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is required (dev.sh installs it)")
    tables = {"input": {0: [215]}, "holding": {10: [200]}}
    async with tcp_peer({1: tables}) as peer:
        hub = HubProcess(tmp_path / "data", host_name="gw-plant-7",
                         extra_config='[modules.modbus]\nbridge = "modbus"\n'
                                      'status_interval = 0.5\n')
        await asyncio.to_thread(hub.start)
        try:
            await run_blocks(hub, peer.port, tmp_path / "work")
            api = HubClient(hub.data_dir)
            events = await asyncio.to_thread(api.request, "GET", "/messages/events", query={
                "start": "earliest", "deviceId": "boiler-1", "kinds": "telemetry"})
            alerts = [e["event"]["properties"]["application"].get("alert") for e in events]
            assert alerts == ["high", "high"]  # mosquitto_pub's, then curl's
            assert await peer.get(1, "holding", 10) == [215]
            meter = await asyncio.to_thread(api.request, "GET", "/devices/meter-7")
            assert meter["authentication"]["type"] == "selfSigned"
        finally:
            await asyncio.to_thread(hub.stop)


def localise(block: str, hub: HubProcess, modbus_port: int) -> str:
    """The README's addresses -> this hub's and this Modbus server's."""
    return (block
            .replace("-h gw-plant-7.local -p 8883", f"-h localhost -p {hub.port('mqtt_tls_port')}")
            .replace("https://gw-plant-7.local/", f"https://localhost:{hub.port('api_port')}/")
            .replace('"host": "192.0.2.10", "port": 502',
                     f'"host": "127.0.0.1", "port": {modbus_port}'))


async def run_blocks(hub: HubProcess, modbus_port: int, work: Path) -> None:
    work.mkdir()
    api = HubClient(hub.data_dir)
    prelude = ('set -euo pipefail\n'
               f'gateway() {{ "{sys.executable}" -m gateway --data-dir "{hub.data_dir}" "$@"; }}\n')
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for number, block in enumerate(readme_blocks(), 1):
        if "write_register" in block:  # a technician writes once the bus is up
            await eventually(lambda: bus_up(api), 30, "the Modbus bus to come up",
                             interval=0.2, blocking=True)
        script = prelude + localise(block, hub, modbus_port)
        proc = await asyncio.create_subprocess_exec(
            "bash", "-c", script, cwd=work, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 120)
        assert proc.returncode == 0, (f"README block {number} failed ({proc.returncode}):\n"
                                      f"{block}\n--- stdout\n{out.decode()}\n--- stderr\n"
                                      f"{err.decode()}")


def bus_up(api: HubClient) -> bool:
    reported: dict[str, Any] = api.request("GET", "/twins/gw-plant-7/modules/modbus")[
        "properties"]["reported"]
    return bool(reported.get("status", {}).get("buses", {}).get("plc", {}).get("state") == "up")


def test_localise_touches_only_addresses() -> None:
    class FakeHub:
        def port(self, name: str) -> int:
            return {"mqtt_tls_port": 1, "api_port": 2}[name]

    text = localise('mosquitto_pub -h gw-plant-7.local -p 8883 x\ncurl https://gw-plant-7.local/d',
                    FakeHub(), 3)  # type: ignore[arg-type]
    assert text == "mosquitto_pub -h localhost -p 1 x\ncurl https://localhost:2/d"
    assert json.loads(localise('{"host": "192.0.2.10", "port": 502}', FakeHub(), 3)) == {  # type: ignore[arg-type]
        "host": "127.0.0.1", "port": 3}
