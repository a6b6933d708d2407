"""``gateway token``: print a SAS token, as ``az iot hub generate-sas-token`` does.

* ``gateway token device ID [--module M] [--ttl S]``: a device (or module) token, signed with
  the identity's primary key (``--secondary``: the secondary), ``sr`` =
  ``{host}/devices/{ID}[/modules/{M}]``: the MQTT password of the identity, or the
  ``Authorization`` header of the device HTTP API.
* ``gateway token policy NAME [--ttl S]``: a shared access policy token (``sr`` = the host
  name, ``skn`` = NAME): the ``Authorization`` header of the service API.

The token alone is printed on one line, so that ``SAS_TOKEN=$(gateway token device d1)``
works (IoT Hub ref §7.1, §7.2). ``--ttl`` is in seconds (default 3600).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

from gateway.errors import GatewayError

DEFAULT_TTL = 3600


def _ttl(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number of seconds, not {text!r}") \
            from None
    if value <= 0:
        raise argparse.ArgumentTypeError("must be at least 1 second")
    return value


def cmd_token(args: argparse.Namespace, client: Any) -> int:
    from gateway.hub.sas import generate_sas_token

    expiry = int(time.time()) + args.ttl
    slot = "secondaryKey" if args.secondary else "primaryKey"
    if args.action == "policy":
        policy = client.request("GET", f"/sharedAccessPolicies/{args.name}")
        print(generate_sas_token(client.host_name, policy[slot], expiry, policy["keyName"]))
        return 0
    resource = f"{client.host_name}/devices/{args.device_id}"
    path = f"/devices/{args.device_id}"
    what = f"device {args.device_id!r}"
    if args.module:
        resource += f"/modules/{args.module}"
        path += f"/modules/{args.module}"
        what = f"module {args.device_id}/{args.module}"
    auth = client.request("GET", path)["authentication"]
    key = (auth.get("symmetricKey") or {}).get(slot) if auth.get("type") == "sas" else None
    if not key:
        raise GatewayError(f"{what} has no shared access keys (authentication type "
                           f"{auth.get('type')!r}): it connects with its X.509 certificate, "
                           "not a SAS token")
    print(generate_sas_token(resource, key, expiry))
    return 0


def add_token_parser(sub: Any, common: argparse.ArgumentParser,
                     run: Callable[[argparse.Namespace], int]) -> None:
    """Register ``gateway token device|policy`` under ``sub``; ``run(args)`` is called."""
    token = sub.add_parser("token", help="print a SAS token (like az iot hub generate-sas-token)"
                           ).add_subparsers(dest="action", required=True, metavar="ACTION")
    p = token.add_parser("device", parents=[common],
                         help="a device or module token (MQTT password, device HTTP API)")
    p.add_argument("device_id")
    p.add_argument("--module", help="a module of the device")
    p = token.add_parser("policy", parents=[common],
                         help="a shared access policy token (the service API's Authorization)")
    p.add_argument("name", help="iothubowner, service, device, registryRead or registryReadWrite")
    for p in token.choices.values():
        p.add_argument("--ttl", type=_ttl, default=DEFAULT_TTL, metavar="S",
                       help=f"seconds until it expires (default {DEFAULT_TTL})")
        p.add_argument("--secondary", action="store_true", help="sign with the secondary key")
        p.set_defaults(fn=run)
