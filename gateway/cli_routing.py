"""``gateway route|endpoint|enrichment``: message routing, mirroring ``az iot hub route``,
``az iot hub routing-endpoint`` and ``az iot hub message-enrichment`` (IoT Hub ref §10).

Every command speaks to the running hub's ``/routing`` API; changes apply at once and are
kept across restarts. Errors are one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.parse
from typing import Any

from gateway.errors import GatewayError


def _client(args: argparse.Namespace) -> Any:
    from gateway.cli import _client as client

    return client(args)


def _print(data: Any) -> None:
    print(json.dumps(data, indent=2))


def _json_arg(text: str, flag: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise GatewayError(f"{flag} is not valid JSON: {exc}") from None


def _pairs(text: str | None, flag: str) -> dict[str, str]:
    """``'k=v&k2=v2'`` (values may be %-encoded) -> dict."""
    out: dict[str, str] = {}
    for item in (text or "").split("&"):
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise GatewayError(f"{flag} takes 'key=value&key=value', not {item!r}")
        out[urllib.parse.unquote(key)] = urllib.parse.unquote(value)
    return out


# -- route -----------------------------------------------------------------------------------


def _route_body(args: argparse.Namespace, *, partial: bool) -> dict[str, Any]:
    body: dict[str, Any] = {}
    if args.route is not None:
        if any(getattr(args, k) is not None for k in ("source", "endpoint", "condition")):
            raise GatewayError("give either --route or --source/--endpoint/--condition, not both")
        body["route"] = args.route
    else:
        if args.source is not None:
            body["source"] = args.source
        if args.endpoint is not None:
            body["endpointNames"] = [args.endpoint]
        if args.condition is not None:
            body["condition"] = args.condition
        if not partial and "endpointNames" not in body:
            raise GatewayError("give --endpoint NAME (and --source, default DeviceMessages), "
                               "or --route 'FROM ... INTO ...'")
    if args.priority is not None:
        body["priority"] = args.priority
    if args.ttl is not None:
        body["timeToLiveSecs"] = args.ttl
    if args.live_first is not None:
        body["liveFirst"] = args.live_first
    if args.disabled:
        body["isEnabled"] = False
    if getattr(args, "enabled", False):
        body["isEnabled"] = True
    return body


def _route_line(route: dict[str, Any]) -> str:
    state = "enabled" if route["isEnabled"] else "disabled"
    return f"{route['name']}\t{state}\t{route['route']}\t{route.get('owner', 'local')}"


UPSTREAM_NOTE = ("note: $upstream forwards only while an upstream is set "
                 "(gateway upstream set); until then its messages wait in the store")


def _note_upstream(routes: list[dict[str, Any]], client: Any) -> None:
    if any("$upstream" in r.get("endpointNames", []) for r in routes):
        if client.request("GET", "/upstream") is None:
            print(UPSTREAM_NOTE, file=sys.stderr)


def cmd_route(args: argparse.Namespace) -> int:
    client = _client(args)
    path = f"/routing/routes/{args.name}" if getattr(args, "name", None) else "/routing/routes"
    if args.action == "create":
        route = client.request("PUT", path, _route_body(args, partial=False),
                               headers={"If-None-Match": "*"})
        _print(route)
        _note_upstream([route], client)
    elif args.action == "update":
        body = _route_body(args, partial=True)
        if not body:
            raise GatewayError("nothing to update: give --condition, --endpoint, --source, "
                               "--route, --priority, --ttl, --live-first, --enabled or "
                               "--disabled")
        route = client.request("PATCH", path, body)
        _print(route)
        _note_upstream([route], client)
    elif args.action == "show":
        route = client.request("GET", path)
        _print(route)
        _note_upstream([route], client)
    elif args.action == "list":
        state = client.request("GET", "/routing")
        for route in state["routes"]:
            print(_route_line(route))
        _note_upstream(state["routes"], client)
        fallback = state["fallbackRoute"]
        print(f"$fallback\t{'enabled' if fallback['isEnabled'] else 'disabled'}\t"
              "FROM DeviceMessages (matching no route) INTO events\tlocal")
    elif args.action == "delete":
        client.request("DELETE", path)
    elif args.action == "fallback":
        _print(client.request("PUT", "/routing/fallback", {"isEnabled": bool(args.enable)}))
    elif args.action == "test":
        return _route_test(client, args)
    return 0


def _route_test(client: Any, args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"body": args.body,
                            "appProperties": _pairs(args.app_props, "--app-props"),
                            "systemProperties": _pairs(args.system_props, "--system-props")}
    if args.device:
        body["deviceId"] = args.device
    if args.module:
        body["moduleId"] = args.module
    if args.twin:
        body["twin"] = _json_arg(args.twin, "--twin")
    result = client.request("POST", "/routing/test", body)
    if args.json:
        _print(result)
        return 0
    for row in result["routes"]:
        if row["matched"]:
            print(f"match\t{row['name']}\t-> {row['endpoint']}")
    for row in result["routes"]:
        if not row["matched"]:
            print(f"no\t{row['name']}\t{row['reason']}")
    if result["fallback"]:
        print("match\t$fallback\t-> events (no route matched)")
    print("endpoints: " + (", ".join(result["endpoints"]) or "none (the message is dropped)"))
    return 0


# -- endpoint --------------------------------------------------------------------------------

_TYPE_FLAGS = {
    "mqtt": ("url", "topic", "qos", "envelope", "ca_file", "username", "password_file"),
    "http": ("url", "header", "ca_file", "batch"),
    "file": ("path", "format", "roll_seconds", "roll_bytes"),
}
_ALL_FLAGS = {f for flags in _TYPE_FLAGS.values() for f in flags}
_KEYS = {"ca_file": "caFile", "password_file": "passwordFile", "roll_seconds": "rollSeconds",
         "roll_bytes": "rollBytes"}


def _endpoint_body(args: argparse.Namespace) -> dict[str, Any]:
    from gateway.endpoints.spec import parse_header

    allowed = _TYPE_FLAGS[args.type]
    for flag in sorted(_ALL_FLAGS - set(allowed)):
        value = getattr(args, flag)
        if value not in (None, []):
            raise GatewayError(f"--{flag.replace('_', '-')} is not an option of {args.type} endpoints")
    body: dict[str, Any] = {"type": args.type}
    for flag in allowed:
        value = getattr(args, flag)
        if value in (None, []):
            continue
        if flag == "header":
            try:
                body["headers"] = dict(parse_header(h) for h in value)
            except GatewayError as exc:
                raise GatewayError(f"--header: {exc}") from None
        elif flag in ("ca_file", "password_file", "path"):
            body[_KEYS.get(flag, flag)] = os.path.abspath(value)
        else:
            body[_KEYS.get(flag, flag)] = value
    return body


def cmd_endpoint(args: argparse.Namespace) -> int:
    client = _client(args)
    if args.action == "create":
        _print(client.request("PUT", f"/routing/endpoints/{args.name}", _endpoint_body(args),
                              headers={"If-None-Match": "*"}))
    elif args.action == "list":
        for spec in client.request("GET", "/routing/endpoints"):
            where = spec.get("url") or spec.get("path")
            print(f"{spec['name']}\t{spec['type']}\t{where}\t{spec.get('owner', 'local')}")
    elif args.action == "show":
        _print(client.request("GET", f"/routing/endpoints/{args.name}"))
    elif args.action == "delete":
        client.request("DELETE", f"/routing/endpoints/{args.name}")
    elif args.action == "health":
        rows = client.request("GET", "/routing/health")
        if args.name:
            rows = [r for r in rows if r["endpointId"] == args.name]
            if not rows:
                raise GatewayError(f"endpoint {args.name!r} not found")
        if args.json:
            _print(rows if not args.name else rows[0])
            return 0
        for r in rows:
            counters = ""
            if "delivered" in r:
                counters = (f"\tdelivered={r['delivered']} backlog={r['backlog']} "
                            f"retries={r['retries']} deadLettered={r['deadLettered']}")
            elif r.get("deadLettered"):  # events, a module input: enriched over the limit
                counters = f"\tdeadLettered={r['deadLettered']}"
            error = f"\tlastError={r['lastError']}" if r.get("lastError") else ""
            print(f"{r['endpointId']}\t{r['healthStatus']}{counters}{error}")
    return 0


# -- enrichment ------------------------------------------------------------------------------


def cmd_enrichment(args: argparse.Namespace) -> int:
    client = _client(args)
    if args.action == "create":
        endpoints = [e.strip() for e in args.endpoint.split(",") if e.strip()]
        _print(client.request("PUT", f"/routing/enrichments/{args.key}",
                              {"value": args.value, "endpointNames": endpoints},
                              headers={"If-None-Match": "*"}))
    elif args.action == "list":
        for item in client.request("GET", "/routing/enrichments"):
            print(f"{item['key']}\t{item['value']}\t{','.join(item['endpointNames'])}\t"
                  f"{item.get('owner', 'local')}")
    elif args.action == "delete":
        client.request("DELETE", f"/routing/enrichments/{args.key}")
    return 0


# -- parser ----------------------------------------------------------------------------------


def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    route = sub.add_parser("route", help="message routes (as az iot hub route)").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    for name in ("create", "update"):
        p = route.add_parser(name, parents=[common], help=f"{name} a route")
        p.add_argument("name")
        p.add_argument("--source", help="DeviceMessages (default), TwinChangeEvents, "
                       "DeviceLifecycleEvents, DeviceConnectionStateEvents, "
                       "FileUploadNotifications, or an edgeHub path such as "
                       "/messages/modules/m/outputs/o")
        p.add_argument("--endpoint", help='events, $upstream, BrokeredEndpoint("/modules/m/inputs/i") '
                       "or a custom endpoint's name")
        p.add_argument("--condition", help="e.g. \"$body.temp > 30 AND alert = 'high'\"")
        p.add_argument("--route", help="edgeHub's form: 'FROM /messages/* WHERE ... INTO ...'")
        p.add_argument("--priority", type=int, help="0-9, 0 highest (for store-and-forward)")
        p.add_argument("--ttl", type=int, help="timeToLiveSecs (for store-and-forward)")
        p.add_argument("--live-first", action=argparse.BooleanOptionalAction, default=None,
                       help="liveFirst (for store-and-forward): after an outage, new messages "
                       "go up ahead of the backlog, which drains behind them oldest first")
        p.add_argument("--disabled", action="store_true")
        if name == "update":
            p.add_argument("--enabled", action="store_true")
    for name in ("show", "delete"):
        route.add_parser(name, parents=[common], help=f"{name} a route").add_argument("name")
    route.add_parser("list", parents=[common], help="list routes (and the fallback route)")
    p = route.add_parser("fallback", parents=[common], help="enable or disable the fallback route")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--enable", action="store_true")
    g.add_argument("--disable", action="store_true")
    p = route.add_parser("test", parents=[common],
                         help="which routes a made-up device message matches, and why not")
    p.add_argument("--body", default="", help="the message body (JSON)")
    p.add_argument("--app-props", help="application properties: 'k=v&k2=v2'")
    p.add_argument("--system-props", help="system properties: '$contentType=application/json&"
                   "$contentEncoding=utf-8' (these two are the defaults)")
    p.add_argument("--device", help="the sending device (its twin is used unless --twin)")
    p.add_argument("--module", help="the sending module")
    p.add_argument("--twin", help='the twin to use: {"tags": {...}, "properties": {"desired": '
                   '{...}, "reported": {...}}}')
    p.add_argument("--json", action="store_true", help="the whole answer as JSON")
    for p in route.choices.values():
        p.set_defaults(fn=cmd_route)

    endpoint = sub.add_parser("endpoint", help="custom routing endpoints: mqtt, http, file"
                              ).add_subparsers(dest="action", required=True, metavar="ACTION")
    p = endpoint.add_parser("create", parents=[common], help="create a custom endpoint")
    p.add_argument("name")
    p.add_argument("--type", required=True, choices=["mqtt", "http", "file"])
    p.add_argument("--url", help="mqtt://HOST:PORT, mqtts://HOST:PORT, or the http(s) URL")
    p.add_argument("--topic", help="mqtt: topic template with {deviceId} and {moduleId}")
    p.add_argument("--qos", type=int, choices=[0, 1], help="mqtt: 0 or 1 (default 1)")
    p.add_argument("--envelope", choices=["body", "json"], help="mqtt: body (default) or json")
    p.add_argument("--ca-file", help="mqtts/https: the CA to trust")
    p.add_argument("--username", help="mqtt: user name")
    p.add_argument("--password-file", help="mqtt: file holding the password")
    p.add_argument("--header", action="append", default=[], metavar="'K: V'",
                   help="http: an extra header (repeatable)")
    p.add_argument("--batch", type=int, help="http: up to N messages per POST (a JSON array)")
    p.add_argument("--path", help="file: the directory")
    p.add_argument("--format", choices=["jsonl", "avro"], help="file: jsonl (default) or avro")
    p.add_argument("--roll-seconds", type=float, help="file: start a new file after S seconds")
    p.add_argument("--roll-bytes", type=int, help="file: start a new file after B bytes")
    for name in ("show", "delete"):
        endpoint.add_parser(name, parents=[common], help=f"{name} an endpoint").add_argument("name")
    endpoint.add_parser("list", parents=[common], help="list custom endpoints")
    p = endpoint.add_parser("health", parents=[common], help="endpoint health (as IoT Hub)")
    p.add_argument("name", nargs="?")
    p.add_argument("--json", action="store_true")
    for p in endpoint.choices.values():
        p.set_defaults(fn=cmd_endpoint)

    enrichment = sub.add_parser("enrichment", help="message enrichments (as az iot hub "
                                "message-enrichment)").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    p = enrichment.add_parser("create", parents=[common], help="add an enrichment")
    p.add_argument("key")
    p.add_argument("--value", required=True,
                   help="a string, $iothubname, or $twin.tags.x / $twin.properties.desired.x / "
                        "$twin.properties.reported.x")
    p.add_argument("--endpoint", required=True, help="NAME[,NAME...]")
    enrichment.add_parser("list", parents=[common], help="list enrichments")
    enrichment.add_parser("delete", parents=[common], help="delete an enrichment").add_argument("key")
    for p in enrichment.choices.values():
        p.set_defaults(fn=cmd_enrichment)
