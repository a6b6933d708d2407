"""``gateway enrollment``: group enrollments of the hub's provisioning service (ref §12), in the
manner of ``az iot dps enrollment-group``."""

from __future__ import annotations

import argparse
from typing import Any


def cmd_enrollment(args: argparse.Namespace) -> int:
    from gateway.cli import _client, _json_arg, _print_json
    from gateway.hub.dps import derive_device_key

    client = _client(args)
    what = args.enrollment_command
    if what == "create":
        attestation: dict[str, Any] = (
            {"type": "x509", "x509": {"caReferences": {"primary": "$hub"}}} if args.x509_ca else
            {"type": "symmetricKey", "symmetricKey": {"primaryKey": args.primary_key,
                                                      "secondaryKey": args.secondary_key}})
        body: dict[str, Any] = {
            "enrollmentGroupId": args.group_id, "attestation": attestation,
            "provisioningStatus": "disabled" if args.disabled else "enabled",
            "capabilities": {"iotEdge": args.iot_edge}}
        if args.initial_twin:
            body["initialTwin"] = _json_arg(args.initial_twin, "--initial-twin")
        _print_json(client.request("PUT", f"/enrollmentGroups/{args.group_id}", body,
                                   headers={"If-None-Match": "*"}))
    elif what == "list":
        _print_json(client.request("POST", "/enrollmentGroups/query", {}))
    elif what == "show":
        _print_json(client.request("GET", f"/enrollmentGroups/{args.group_id}"))
    elif what == "delete":
        client.request("DELETE", f"/enrollmentGroups/{args.group_id}")
    elif what == "registrations":
        _print_json(client.request("POST", f"/registrations/{args.group_id}/query", {}))
    elif what == "id-scope":
        print(client.request("GET", "/provisioning")["idScope"])
    elif what == "derive-key":
        group = client.request("GET", f"/enrollmentGroups/{args.group_id}")
        key = (group["attestation"].get("symmetricKey") or {}).get("primaryKey")
        if not key:
            from gateway.errors import InvalidRequestError

            raise InvalidRequestError(f"enrollment group {args.group_id!r} has no symmetric key")
        print(derive_device_key(key, args.registration_id.lower()))
    return 0


def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    enrollment = sub.add_parser(
        "enrollment", help="provisioning: group enrollments for devices that register themselves"
    ).add_subparsers(dest="enrollment_command", required=True, metavar="COMMAND")
    p = enrollment.add_parser("create", parents=[common], help="create an enrollment group")
    p.add_argument("group_id")
    p.add_argument("--x509-ca", action="store_true",
                   help="devices prove membership with a certificate the hub CA issued "
                        "(CN = registration id); default: a key derived from the group key")
    p.add_argument("--primary-key", help="the group's primary key (base64; default: generated)")
    p.add_argument("--secondary-key", help="the group's secondary key (default: generated)")
    p.add_argument("--iot-edge", action="store_true", help="provisioned devices are gateways")
    p.add_argument("--disabled", action="store_true", help="create it disabled")
    p.add_argument("--initial-twin", help='JSON: {"tags": {...}, "properties": {"desired": {...}}}')
    for name, help_ in (("show", "print an enrollment group with its keys"),
                        ("delete", "delete an enrollment group"),
                        ("registrations", "list the devices an enrollment group provisioned")):
        enrollment.add_parser(name, parents=[common], help=help_).add_argument("group_id")
    enrollment.add_parser("list", parents=[common], help="list enrollment groups")
    enrollment.add_parser("id-scope", parents=[common], help="print the hub's ID scope")
    p = enrollment.add_parser("derive-key", parents=[common],
                              help="print the device key a registration id gets from a group")
    p.add_argument("group_id")
    p.add_argument("registration_id")
    for action in enrollment.choices.values():
        action.set_defaults(fn=cmd_enrollment)
