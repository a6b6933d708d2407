"""Where the Modbus tools (``gateway modbus probe|scan``) reach a bus: ``--tcp``, ``--serial``,
or ``--bus NAME``, a bus the running gateway's bridge owns. That one goes through the bridge's
direct methods (``read_registers``, ``scan``), so the bridge keeps the port and polling goes
on in between (see :mod:`hw.modbus.bridge`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from gateway.errors import DeviceError
from hw.modbus.config import TcpLink


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--tcp | --serial | --bus`` (one required), and for ``--bus`` ``--data-dir``,
    ``--module`` and ``--device``: where the running bridge is."""
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--tcp", metavar="HOST:PORT", help="Modbus TCP endpoint or gateway")
    where.add_argument("--serial", metavar="DEVICE",
                       help="serial port, e.g. /dev/serial/by-id/usb-FTDI_...")
    where.add_argument("--bus", metavar="NAME",
                       help="a bus of the running gateway's Modbus bridge (it keeps the port)")
    parser.add_argument("--data-dir", help="the running hub's data directory (with --bus)")
    parser.add_argument("--module", default="modbus", help="the bridge's module (modbus)")
    parser.add_argument("--device", help="the gateway device (default: the hub's own)")


def invoke(args: argparse.Namespace, method: str, payload: dict[str, Any],
           timeout: int) -> dict[str, Any]:
    """Call ``method`` on the bridge; its answer on 200, else DeviceError with its error."""
    from gateway.config import default_data_dir
    from gateway.hubclient import HubClient

    client = HubClient(Path(args.data_dir) if args.data_dir else default_data_dir())
    device = args.device or client.info.get("device_id") or client.host_name
    result = client.request(
        "POST", f"/twins/{device}/modules/{args.module}/methods",
        {"methodName": method, "payload": payload, "responseTimeoutInSeconds": timeout},
        timeout=timeout + 10)
    status, answer = int(result.get("status", 500)), result.get("payload") or {}
    if status != 200:
        error = answer.get("error") if isinstance(answer, dict) else answer
        raise DeviceError(f"the bridge answered {status}: {error}")
    return answer


def tcp_link(text: str) -> TcpLink:
    """``HOST:PORT`` (IPv6 in brackets) -> TcpLink; ValueError otherwise."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError("--tcp takes HOST:PORT")
    return TcpLink(host=host.strip("[]"), port=int(port))
