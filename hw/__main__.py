"""``python -m hw BRIDGE``: run one bridge as a module of the local hub.

The hub's module supervisor starts bridges this way and hands over the module identity in the
environment: ``GATEWAY_CONNECTION_STRING`` (the module's connection string) and either
``GATEWAY_UNIX_SOCKET`` (the hub's local MQTT socket) or ``GATEWAY_MQTT_PORT`` with
``GATEWAY_CA_FILE`` (TLS). The same variables, or the options below, let a technician run a
bridge by hand.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import sys

from gateway import logs
from gateway.client import ClientSettings
from gateway.errors import GatewayError
from hw.bridge import Bridge
from hw.runtime import ModuleRuntime

BRIDGES = {
    "modbus": ("hw.modbus.bridge", "ModbusBridge"),
    "serial": ("hw.serial.bridge", "SerialBridge"),
    "ble": ("hw.ble.bridge", "BleBridge"),
}


def create_bridge(name: str) -> Bridge:
    try:
        module_name, class_name = BRIDGES[name]
    except KeyError:
        raise GatewayError(f"unknown bridge {name!r} (known: {', '.join(BRIDGES)})") from None
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls()  # type: ignore[no-any-return]


def main(argv: list[str] | None = None) -> int:
    env = os.environ
    parser = argparse.ArgumentParser(prog="python -m hw", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bridge", choices=sorted(BRIDGES))
    parser.add_argument("--connection-string", default=env.get("GATEWAY_CONNECTION_STRING"))
    parser.add_argument("--unix-socket", default=env.get("GATEWAY_UNIX_SOCKET"))
    parser.add_argument("--port", type=int, default=int(env.get("GATEWAY_MQTT_PORT", "8883")))
    parser.add_argument("--ca-file", default=env.get("GATEWAY_CA_FILE"))
    parser.add_argument("--status-interval", type=float,
                        default=float(env.get("GATEWAY_STATUS_INTERVAL", "30")))
    parser.add_argument("--log-level", default=env.get("GATEWAY_LOG_LEVEL", "info"))
    args = parser.parse_args(argv)
    logs.setup(args.log_level, identifier=f"hw-{args.bridge}")
    try:
        if not args.connection_string:
            raise GatewayError("no module connection string (--connection-string or "
                               "GATEWAY_CONNECTION_STRING)")
        settings = ClientSettings.from_string(args.connection_string, port=args.port,
                                              ca_file=args.ca_file, unix_socket=args.unix_socket)
        if settings.connection.module_id is None:
            raise GatewayError("the connection string must name a module (ModuleId=...)")
        runtime = ModuleRuntime(create_bridge(args.bridge), settings,
                                status_interval=args.status_interval)
        try:
            import uvloop

            uvloop.run(runtime.run())
        except ImportError:  # pragma: no cover
            asyncio.run(runtime.run())
    except GatewayError as exc:
        print(f"python -m hw: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
