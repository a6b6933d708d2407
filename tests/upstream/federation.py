"""Helpers for tests with a parent and a child hub on their own loopback addresses."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from pathlib import Path
from typing import Any

from gateway.hubclient import HubClient
from tests.hubproc import HubProcess, create_device
from tests.upstream.load import Device, run_device

PARENT_ADDRESS = "127.0.6.1"
CHILD_ADDRESS = "127.0.6.2"
PROXY_ADDRESS = "127.0.6.3"


def make_devices(child: HubProcess, n: int, prefix: str = "dev") -> list[Device]:
    """``n`` devices created at ``child`` (``{prefix}0`` ...), with their keys."""
    out = []
    for i in range(n):
        info = create_device(child, f"{prefix}{i}")
        out.append(Device(info["deviceId"], info["authentication"]["symmetricKey"]["primaryKey"]))
    return out


def free_port(address: str) -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return int(s.getsockname()[1])


def parent_hub(tmp: Path, extra_config: str = "", **kw: Any) -> HubProcess:
    return HubProcess(tmp / "parent", host_name="parent.local", address=PARENT_ADDRESS,
                      log_level="info", extra_config=extra_config, **kw)


def child_hub(tmp: Path, extra_config: str = "", **kw: Any) -> HubProcess:
    upstream = ("[upstream]\nreconnect_min = 0.05\nreconnect_max = 0.5\nkeepalive = 5\n"
                "ack_timeout = 5.0\nstatus_interval = 1.0\n")
    return HubProcess(tmp / "child", host_name="child.local", address=CHILD_ADDRESS,
                      log_level="info", extra_config=upstream + extra_config, **kw)


def link(parent: HubProcess, child: HubProcess, gateway: str = "child-gw", *,
         host: str = PARENT_ADDRESS, port: int | None = None) -> dict[str, Any]:
    """Create ``gateway`` (--edge) at the parent and point the child's upstream at it."""
    create_device(parent, gateway, "--edge")
    cs = parent.connection_string(gateway)
    out = child.cli("upstream", "set", "--connection-string", cs, "--ca-file", parent.ca_file,
                    "--host", host, "--port", str(port or parent.port("mqtt_tls_port"))).stdout
    return json.loads(out)


def azure_stand_in(tmp: Path, **kw: Any) -> HubProcess:
    """A parent hub without the on-behalf-of feature, standing in for Azure IoT Hub (identity
    mode's tests); not started."""
    parent = parent_hub(tmp, **kw)
    parent.config_file.write_text(parent.config_file.read_text().replace(
        "[hub]\n", "[hub]\non_behalf = false\n"))
    return parent


def link_identity_mode(parent: HubProcess, child: HubProcess, devices: list[Device]) -> None:
    """Point the child's upstream at ``parent`` as a gateway identity, and create each of
    ``devices`` at the parent with the child's keys ("in Azure"), as identity mode needs."""
    create_device(parent, "child-gw")  # names the parent; identity mode connects per device
    child.cli("upstream", "set", "--connection-string", parent.connection_string("child-gw"),
              "--ca-file", parent.ca_file, "--host", PARENT_ADDRESS,
              "--port", str(parent.port("mqtt_tls_port")))
    for d in devices:
        keys = json.loads(child.cli("device", "show", d.device_id).stdout)[
            "authentication"]["symmetricKey"]
        HubClient(parent.data_dir).request("PUT", f"/devices/{d.device_id}", {
            "deviceId": d.device_id, "authentication": {"type": "sas", "symmetricKey": keys}})


def status(hub: HubProcess) -> dict[str, Any]:
    return json.loads(hub.cli("upstream", "status", "--json").stdout)


def parent_events(parent: HubProcess, timeout: float = 2.0) -> list[dict[str, Any]]:
    out = parent.cli("monitor-events", "--from-beginning", "--timeout", str(timeout),
                     "--json").stdout
    return [json.loads(line)["event"] for line in out.splitlines() if line.strip()]


def send_from(child: HubProcess, devices: list[Device], count: int, **kw: Any) -> None:
    """``count`` QoS 1 messages from each of ``devices`` into ``child``, acknowledged."""
    async def go() -> None:
        stop = asyncio.Event()
        await asyncio.wait_for(asyncio.gather(*(
            run_device(d, child.host_name, CHILD_ADDRESS, lambda: child.port("mqtt_local_port"),
                       stop, count=count, **kw) for d in devices)), 120)
    asyncio.run(go())


def telemetry_by_origin(parent: HubProcess) -> dict[str, list[int]]:
    """The sequence numbers of the telemetry at ``parent``, per origin (``device/module``), in
    the order the built-in endpoint holds them."""
    out: dict[str, list[int]] = {}
    for e in parent_events(parent):
        if e["annotations"].get("iothub-message-source") != "Telemetry":
            continue
        origin = e["origin"] + (f"/{e['module']}" if e["module"] else "")
        out.setdefault(origin, []).append(e["payload"]["n"])
    return out


def timed_drain(parent: HubProcess, child: HubProcess, devices: list[Device], count: int,
                **kw: Any) -> tuple[int, float]:
    """With ``parent`` stopped, ``count`` messages from each of ``devices`` into ``child``;
    then ``parent`` starts again on the same TLS port. Returns the backlog's bytes and the
    seconds from that start until the child's backlog is empty (at most 60)."""
    port = parent.port("mqtt_tls_port")
    parent.stop()
    send_from(child, devices, count, **kw)
    backlog_bytes = int(status(child)["backlogBytes"])
    parent.config_file.write_text(parent.config_file.read_text().replace(
        "tls_port = 0", f"tls_port = {port}"))
    parent.start()
    t0 = time.monotonic()
    while time.monotonic() - t0 < 60 and status(child)["backlog"]:
        time.sleep(0.2)
    took = time.monotonic() - t0
    assert status(child)["backlog"] == 0, "the backlog did not drain in 60 s"
    return backlog_bytes, took
