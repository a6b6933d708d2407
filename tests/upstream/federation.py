"""Helpers for tests with a parent and a child hub on their own loopback addresses."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path
from typing import Any

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
