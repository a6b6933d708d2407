"""The ``gateway`` command.

``gateway run`` serves in the foreground; ``gateway demo`` shows the whole flow on loopback;
the other subcommands speak to the running hub's service API, found through ``--data-dir``, in
the manner of ``az iot hub``. Errors print one line on stderr and exit non-zero.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from gateway.config import default_data_dir, load_config
from gateway.errors import GatewayError

log = logging.getLogger("gateway")

EXIT_ERROR = 1
EXIT_USAGE = 2


def _data_dir(args: argparse.Namespace) -> Path:
    return Path(args.data_dir) if args.data_dir else default_data_dir()


def _client(args: argparse.Namespace) -> Any:
    from gateway.hubclient import HubClient

    return HubClient(_data_dir(args))


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2))


def setup_logging(level: str) -> None:
    from gateway import logs

    logs.setup(level)  # the journal, with key=value context as fields, when run by systemd


# -- run, ca ---------------------------------------------------------------------------------

def cmd_run(args: argparse.Namespace) -> int:
    from gateway import app

    config = load_config(_data_dir(args), Path(args.config) if args.config else None)
    _run_loop(app.run(config))
    return 0


def _run_loop(coro: Any) -> Any:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.run(coro)
    return uvloop.run(coro)


def cmd_ca(args: argparse.Namespace) -> int:
    path = _data_dir(args) / "ca.pem"
    try:
        sys.stdout.write(path.read_text())
    except FileNotFoundError:
        raise GatewayError(f"no CA in {_data_dir(args)}: the hub creates it on first start") from None
    return 0


# -- identities ------------------------------------------------------------------------------

def _auth_body(args: argparse.Namespace) -> dict[str, Any]:
    if getattr(args, "x509_ca", False):
        return {"type": "certificateAuthority"}
    if getattr(args, "x509_cert", None):
        return {"type": "selfSigned"}  # the registry takes the thumbprint from the certificate
    if getattr(args, "x509_thumbprint", None):
        return {"type": "selfSigned", "x509Thumbprint": {"primaryThumbprint": args.x509_thumbprint}}
    return {"type": "sas"}


def _read_certificate(path: str) -> str:
    """The PEM text of ``--x509-cert PATH``; a missing or unreadable file is one error line."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise GatewayError(f"--x509-cert {path}: cannot read it: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        text = ""
    if "-----BEGIN CERTIFICATE-----" not in text:
        raise GatewayError(f"--x509-cert {path}: not a PEM certificate "
                           "(-----BEGIN CERTIFICATE-----)")
    return text


def cmd_device(args: argparse.Namespace) -> int:
    client = _client(args)
    path = f"/devices/{args.device_id}" if getattr(args, "device_id", None) else "/devices"
    if args.action == "create":
        body: dict[str, Any] = {"deviceId": args.device_id, "authentication": _auth_body(args),
                                "status": "disabled" if args.disabled else "enabled"}
        if args.x509_cert:  # our extension: the registry takes the thumbprint from it
            body["x509Certificate"] = _read_certificate(args.x509_cert)
        if args.edge:
            body["capabilities"] = {"iotEdge": True}
        if args.parent:
            parent = client.request("GET", f"/devices/{args.parent}")
            if not parent.get("deviceScope"):
                raise GatewayError(f"device {args.parent!r} has no device scope (create it with --edge)")
            body["parentScopes"] = [parent["deviceScope"]]
            body["deviceScope"] = parent["deviceScope"]
        _print_json(client.request("PUT", path, body))
        if args.x509_ca and not args.no_cert:
            _issue_x509_ca(args, args.device_id)
    elif args.action == "update":
        device = client.request("GET", path)
        if args.status:
            device["status"] = args.status
        if args.clear_sensor_key:
            device["sensorKey"] = None
        elif args.sensor_key:
            device["sensorKey"] = (sys.stdin.readline().strip() if args.sensor_key == "-"
                                   else args.sensor_key)
        _print_json(client.request("PUT", path, device, headers={"If-Match": f'"{device["etag"]}"'}))
    elif args.action == "show":
        _print_json(client.request("GET", path))
    elif args.action == "list":
        for device in client.request("GET", "/devices"):
            print(f"{device['deviceId']}\t{device['status']}\t{device['connectionState']}\t"
                  f"{device['authentication']['type']}")
    elif args.action == "delete":
        client.request("DELETE", path, headers={"If-Match": "*"})
    elif args.action == "connection-string":
        device = client.request("GET", path)
        print(_connection_string(client, device, args))
    return 0


def _issue_x509_ca(args: argparse.Namespace, common_name: str) -> None:
    """``--x509-ca``: issue the identity's certificate and key from the hub CA (CN = the id,
    IoT Hub ref §8) into ``--out`` (default: the current directory), both mode 0600."""
    import os

    from gateway import pki

    data_dir = _data_dir(args)
    certs = pki.HubCertificates(data_dir / "ca.pem", data_dir / "ca.key",
                                data_dir / "server.pem", data_dir / "server.key")
    try:
        cert, key = pki.issue_client_certificate(certs, common_name, Path(args.out))
    except OSError as exc:
        raise GatewayError(f"cannot write the certificate to {args.out}: {exc.strerror}") from None
    os.chmod(cert, 0o600)
    print(f"certificate: {cert}\nkey: {key}", file=sys.stderr)


def _connection_string(client: Any, identity: dict[str, Any], args: argparse.Namespace) -> str:
    from gateway.hub.connstr import ConnectionString

    auth = identity["authentication"]
    key = None
    if auth["type"] == "sas":
        key = auth["symmetricKey"]["secondaryKey" if args.secondary else "primaryKey"]
    return str(ConnectionString(
        host_name=client.host_name,
        device_id=identity["deviceId"],
        module_id=identity.get("moduleId"),
        shared_access_key=key,
        gateway_host_name=args.gateway_host,
        x509=auth["type"] != "sas",
    ))


def cmd_module(args: argparse.Namespace) -> int:
    client = _client(args)
    base = f"/devices/{args.device_id}/modules"
    path = f"{base}/{args.module_id}" if getattr(args, "module_id", None) else base
    if args.action == "create":
        body = {"deviceId": args.device_id, "moduleId": args.module_id,
                "authentication": _auth_body(args)}
        if args.x509_cert:
            body["x509Certificate"] = _read_certificate(args.x509_cert)
        _print_json(client.request("PUT", path, body))
        if args.x509_ca and not args.no_cert:
            _issue_x509_ca(args, f"{args.device_id}/{args.module_id}")
    elif args.action == "show":
        _print_json(client.request("GET", path))
    elif args.action == "list":
        for module in client.request("GET", base):
            print(f"{module['moduleId']}\t{module['connectionState']}\t"
                  f"{module['authentication']['type']}\t{module.get('owner', 'local')}")
    elif args.action == "delete":
        client.request("DELETE", path, headers={"If-Match": "*"})
    elif args.action == "connection-string":
        print(_connection_string(client, client.request("GET", path), args))
    return 0


def cmd_policy(args: argparse.Namespace) -> int:
    from gateway.hub.connstr import ConnectionString

    client = _client(args)
    policy = client.request("GET", f"/sharedAccessPolicies/{args.name}")
    key = policy["secondaryKey" if args.secondary else "primaryKey"]
    print(ConnectionString(host_name=client.host_name, shared_access_key_name=policy["keyName"],
                           shared_access_key=key))
    return 0


def _twin_path(args: argparse.Namespace) -> str:
    base = f"/twins/{args.device_id}"
    return f"{base}/modules/{args.module}" if args.module else base


def _json_arg(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise GatewayError(f"{what} is not valid JSON: {exc}") from None


def cmd_twin(args: argparse.Namespace) -> int:
    client = _client(args)
    if args.action == "show":
        _print_json(client.request("GET", _twin_path(args)))
        return 0
    body: dict[str, Any] = {}
    if args.desired:
        body.setdefault("properties", {})["desired"] = _json_arg(args.desired, "--desired")
    if args.tags:
        body["tags"] = _json_arg(args.tags, "--tags")
    if not body:
        raise GatewayError("nothing to update: give --desired JSON and/or --tags JSON")
    _print_json(client.request("PATCH", _twin_path(args), body,
                               headers={"If-Match": args.etag or "*"}))
    return 0


def cmd_method(args: argparse.Namespace) -> int:
    client = _client(args)
    body = {"methodName": args.name, "payload": _json_arg(args.payload, "--payload"),
            "responseTimeoutInSeconds": args.timeout,
            "connectTimeoutInSeconds": args.connect_timeout}
    result = client.request("POST", _twin_path(args) + "/methods", body,
                            timeout=args.timeout + args.connect_timeout + 10)
    _print_json(result)
    return 0 if 200 <= int(result.get("status", 500)) < 300 else 3


def cmd_c2d(args: argparse.Namespace) -> int:
    client = _client(args)
    if args.action == "send":
        props: dict[str, str] = {}
        for item in args.prop:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise GatewayError(f"--prop takes KEY=VALUE, not {item!r}")
            props[key] = value
        for flag, key in (("message_id", "messageId"), ("correlation_id", "correlationId"),
                          ("content_type", "contentType"), ("content_encoding", "contentEncoding"),
                          ("ack", "ack")):
            if getattr(args, flag):
                props[key] = getattr(args, flag)
        if args.ttl:
            props["expiryTimeUtc"] = time.strftime(
                "%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + args.ttl))
        _print_json(client.request("POST", f"/devices/{args.device_id}/messages/deviceBound",
                                   {"body": args.body, "properties": props}))
    elif args.action == "purge":
        _print_json(client.request("DELETE", f"/devices/{args.device_id}/commands"))
    elif args.action == "feedback":
        deadline = time.monotonic() + args.wait
        while True:
            wait = max(0.0, min(30.0, deadline - time.monotonic()))
            response = client.raw("GET", "/messages/serviceBound/feedback",
                                  query={"waitSeconds": f"{wait:g}"})
            if response is None:
                if time.monotonic() >= deadline:
                    break
                continue
            records, lock = response
            for record in records:
                print(json.dumps(record), flush=True)
            client.request("DELETE", f"/messages/serviceBound/feedback/{lock}")
    return 0


MODBUS_TOOLS = {"probe": "hw.modbus.probe", "scan": "hw.modbus.scan"}
MODBUS_TOOL_HELP = (
    ("probe", "read a register block and print every type and byte/word-order reading of it",
     ("gateway modbus probe (--tcp HOST:PORT | --serial DEVICE [--baud N]) --unit N "
      "--address N --count N [--input]")),
    ("scan", "find the unit ids that answer on a bus (and the baud rate and parity)",
     ("gateway modbus scan (--tcp HOST:PORT | --serial DEVICE [--baud N,N] [--parity E,N,O]) "
      "[--units 1-247] [--address N] [--input]")),
)


def modbus_tool(name: str, argv: list[str]) -> int:
    """The Modbus tools parse their own options (argparse REMAINDER cannot take a leading
    option like --tcp), so ``gateway modbus TOOL ...`` hands them the rest of the line."""
    import importlib

    setup_logging("warning")
    return int(importlib.import_module(MODBUS_TOOLS[name]).main(argv))


def cmd_modbus_tool(args: argparse.Namespace) -> int:  # reached only for --help listings
    return modbus_tool(args.action, args.tool_args)


def _modbus_tool_argv(argv: list[str]) -> tuple[str, list[str]] | None:
    """``[--data-dir D] [--log-level L] modbus TOOL ARGS`` -> (TOOL, ARGS with the data dir)."""
    head: list[str] = []
    i = 0
    while i + 1 < len(argv) and argv[i] in ("--data-dir", "--log-level"):
        if argv[i] == "--data-dir":
            head = ["--data-dir", argv[i + 1]]
        i += 2
    if argv[i:i + 1] == ["modbus"] and argv[i + 1:i + 2] and argv[i + 1] in MODBUS_TOOLS:
        return argv[i + 1], [*head, *argv[i + 2:]]
    return None


def cmd_monitor_events(args: argparse.Namespace) -> int:
    client = _client(args)
    query = {"consumerGroup": args.consumer_group,
             "start": "earliest" if args.from_beginning else "latest"}
    if args.device:
        query["deviceId"] = args.device
    if not args.all_kinds:
        query["kinds"] = "telemetry"
    if not args.json:
        print("Starting event monitor, use ctrl-c to stop...", file=sys.stderr)
    timeout = args.timeout if args.timeout and args.timeout > 0 else None
    try:
        for event in client.stream("/messages/events", query, idle_timeout=timeout):
            event.pop("kind", None)
            event.pop("seq", None)
            if args.json:
                print(json.dumps(event), flush=True)
            else:
                print(json.dumps(event, indent=4), flush=True)
    except KeyboardInterrupt:
        pass
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from gateway.demo import run_demo

    _run_loop(run_demo(Path(args.data_dir) if args.data_dir else None, duration=args.duration,
                       cut_every=args.cut_every, cut_for=args.cut_for))
    return 0


# -- parser ----------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    help_dir = f"the hub's data directory (default: {default_data_dir()})"
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data-dir", default=argparse.SUPPRESS, help=help_dir)
    parser = argparse.ArgumentParser(
        prog="gateway", description="Edge gateway: a local IoT hub with Azure IoT Hub's device protocol.",
    )
    parser.add_argument("--data-dir", default=None, help=help_dir)
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", parents=[common], help="serve the hub in the foreground")
    p.add_argument("--config", help="TOML config file (default: DATA_DIR/gateway.toml if present)")
    p.set_defaults(fn=cmd_run)

    p = sub.add_parser("demo", parents=[common], help="run a hub with simulated devices, live")
    p.add_argument("--duration", type=float, default=None, help="stop after this many seconds")
    p.add_argument("--cut-every", type=float, default=60.0, help="cut the upstream link every S s")
    p.add_argument("--cut-for", type=float, default=15.0, help="... for S s")
    p.set_defaults(fn=cmd_demo)

    p = sub.add_parser("ca", parents=[common], help="print the hub's root CA certificate (PEM)")
    p.set_defaults(fn=cmd_ca)

    def auth_options(p: argparse.ArgumentParser) -> None:
        g = p.add_mutually_exclusive_group()
        g.add_argument("--x509-ca", action="store_true", help="X.509, signed by the hub CA (CN = id)")
        g.add_argument("--x509-thumbprint", metavar="HEX", help="X.509 self-signed, by thumbprint")
        g.add_argument("--x509-cert", metavar="PEM", help="X.509 self-signed, by certificate file")
        p.add_argument("--out", default=".", metavar="DIR",
                       help="with --x509-ca: where to write ID.cert.pem and ID.key.pem "
                            "(default: the current directory)")
        p.add_argument("--no-cert", action="store_true",
                       help="with --x509-ca: register only (the certificate comes from your "
                            "own CA, see gateway ca-cert)")

    def cs_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--gateway-host", help="add GatewayHostName= (a transparent-gateway name)")
        p.add_argument("--secondary", action="store_true", help="use the secondary key")

    device = sub.add_parser("device", help="manage device identities").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    p = device.add_parser("create", parents=[common], help="create a device")
    p.add_argument("device_id")
    p.add_argument("--disabled", action="store_true")
    p.add_argument("--edge", action="store_true", help="a gateway device (has a device scope)")
    p.add_argument("--parent", help="parent gateway device id")
    auth_options(p)
    p = device.add_parser("update", parents=[common], help="change a device")
    p.add_argument("device_id")
    p.add_argument("--status", choices=["enabled", "disabled"])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--sensor-key", metavar="HEX",
                   help="a child sensor's key, e.g. a BTHome bindkey (32 hex digits; - reads "
                        "it from standard input, keeping it out of the shell history)")
    g.add_argument("--clear-sensor-key", action="store_true", help="remove the sensor key")
    for name in ("show", "delete"):
        device.add_parser(name, parents=[common], help=f"{name} a device").add_argument("device_id")
    device.add_parser("list", parents=[common], help="list devices")
    p = device.add_parser("connection-string", parents=[common], help="print a device connection string")
    p.add_argument("device_id")
    cs_options(p)
    for p in device.choices.values():
        p.set_defaults(fn=cmd_device)

    module = sub.add_parser("module", help="manage module identities").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    for name in ("create", "show", "delete", "connection-string"):
        p = module.add_parser(name, parents=[common], help=f"{name} a module")
        p.add_argument("device_id")
        p.add_argument("module_id")
        if name == "create":
            auth_options(p)
        if name == "connection-string":
            cs_options(p)
    module.add_parser("list", parents=[common], help="list a device's modules").add_argument("device_id")
    for p in module.choices.values():
        p.set_defaults(fn=cmd_module)

    policy = sub.add_parser("policy", help="shared access policies").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    p = policy.add_parser("connection-string", parents=[common], help="print a policy connection string")
    p.add_argument("name", help="iothubowner, service, device, registryRead or registryReadWrite")
    p.add_argument("--secondary", action="store_true")
    p.set_defaults(fn=cmd_policy)

    from gateway.cli_token import add_token_parser, cmd_token

    add_token_parser(sub, common, lambda args: cmd_token(args, _client(args)))

    twin = sub.add_parser("twin", help="device and module twins").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    p = twin.add_parser("show", parents=[common], help="print a twin")
    p.add_argument("device_id")
    p.add_argument("--module")
    p = twin.add_parser("update", parents=[common], help="patch desired properties and tags")
    p.add_argument("device_id")
    p.add_argument("--module")
    p.add_argument("--desired", metavar="JSON", help='e.g. \'{"interval": 30}\' (null deletes)')
    p.add_argument("--tags", metavar="JSON")
    p.add_argument("--etag", help="only if the twin still has this etag")
    for p in twin.choices.values():
        p.set_defaults(fn=cmd_twin)

    method = sub.add_parser("method", help="direct methods").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    p = method.add_parser("invoke", parents=[common], help="invoke a method, print its answer")
    p.add_argument("device_id")
    p.add_argument("name")
    p.add_argument("--payload", default="null", help="JSON (default null)")
    p.add_argument("--module")
    p.add_argument("--timeout", type=int, default=30, help="response timeout, 5-300 s")
    p.add_argument("--connect-timeout", type=int, default=0,
                   help="wait this long for the device to come online, 0-300 s")
    p.set_defaults(fn=cmd_method)

    c2d = sub.add_parser("c2d", help="cloud-to-device messages").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    p = c2d.add_parser("send", parents=[common], help="queue a message for a device")
    p.add_argument("device_id")
    p.add_argument("--body", default="", help="the message body (text)")
    p.add_argument("--prop", action="append", default=[], metavar="KEY=VALUE",
                   help="an application property (repeatable)")
    p.add_argument("--ack", choices=["none", "positive", "negative", "full"],
                   help="ask for delivery feedback")
    p.add_argument("--ttl", type=int, help="seconds until it expires (default 1 h, max 48 h)")
    p.add_argument("--message-id")
    p.add_argument("--correlation-id")
    p.add_argument("--content-type")
    p.add_argument("--content-encoding")
    p = c2d.add_parser("purge", parents=[common], help="drop a device's queued messages")
    p.add_argument("device_id")
    p = c2d.add_parser("feedback", parents=[common],
                       help="print delivery feedback records (and consume them)")
    p.add_argument("--wait", type=float, default=0, help="wait this long for records")
    for p in c2d.choices.values():
        p.set_defaults(fn=cmd_c2d)

    modbus = sub.add_parser("modbus", help="Modbus tools for technicians").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    for name, help_, usage in MODBUS_TOOL_HELP:
        p = modbus.add_parser(name, add_help=False, help=help_, usage=usage)
        p.add_argument("tool_args", nargs=argparse.REMAINDER)
        p.set_defaults(fn=cmd_modbus_tool)

    from gateway import cli_cacert, cli_upstream
    from gateway.cli_doctor import add_parsers as add_doctor_parsers
    from gateway.cli_enrollment import add_parsers as add_enrollment_parsers
    from gateway.cli_files import add_parsers as add_files_parsers

    cli_cacert.add_parser(sub, common, lambda a: cli_cacert.cmd_ca_cert(a, _client(a), _print_json))
    cli_upstream.add_parser(sub, common)
    add_doctor_parsers(sub, common)
    add_enrollment_parsers(sub, common)
    add_files_parsers(sub, common)
    from gateway import cli_admin

    cli_admin.add_parser(sub, common)

    p = sub.add_parser("monitor-events", parents=[common],
                       help="print messages routed to the built-in endpoint events")
    p.add_argument("--device", help="only this device's messages")
    p.add_argument("--consumer-group", default="$Default")
    p.add_argument("--from-beginning", action="store_true", help="start at the oldest retained message")
    p.add_argument("--timeout", type=float, default=0, help="stop after this many seconds without a message (0: never)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--all-kinds", action="store_true",
                   help="also connection-state and lifecycle events")
    p.set_defaults(fn=cmd_monitor_events)

    from gateway.cli_routing import add_parsers as add_routing_parsers

    add_routing_parsers(sub, common)  # route, endpoint, enrichment
    from gateway.cli_events import add_events_parser

    add_events_parser(sub, common, _client)
    return parser


def _check_ids(args: argparse.Namespace) -> None:
    """Device and module ids are checked before any request: an id the hub's paths cannot
    carry (``a/b``) would otherwise come back as the router's "404: Not Found"."""
    from gateway.hub.registry import validate_id

    for attr, what in (("device_id", "device id"), ("module_id", "module id"),
                       ("module", "module id"), ("parent", "device id")):
        value = getattr(args, attr, None)
        if not isinstance(value, str):
            continue
        try:
            validate_id(value, what)
        except GatewayError as exc:
            bad = sorted({c for c in value if not _legal_char(c)})
            why = (f"{', '.join(repr(c) for c in bad)} not allowed" if bad
                   else "empty" if not value else f"{len(value)} characters, at most 128")
            raise GatewayError(f"invalid {what} {value!r}: {why}; {str(exc).split(': ', 1)[-1]}"
                               ) from None


def _legal_char(c: str) -> bool:
    from gateway.hub.registry import validate_id

    try:
        validate_id(c)
    except GatewayError:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    tool = _modbus_tool_argv(argv)
    if tool is not None:
        return modbus_tool(*tool)
    args = build_parser().parse_args(argv)  # the parser goes (`run` keeps running in here)
    # `run` logs at --log-level (default info); every other command stays quiet unless asked.
    quiet = args.command != "run" and args.log_level == "info"
    setup_logging("warning" if quiet else args.log_level)
    try:
        _check_ids(args)
        return int(args.fn(args))
    except GatewayError as exc:
        print(f"gateway: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
