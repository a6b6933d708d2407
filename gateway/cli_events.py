"""``gateway events``: the built-in endpoint as back ends see it.

``gateway events connection-string [--policy-name NAME] [--key-type primary|secondary]``
prints the Event Hubs-compatible connection string, as ``az iot hub connection-string show
--default-eventhub`` does (default policy ``iothubowner``, like az)::

    Endpoint=sb://HOST/;SharedAccessKeyName=iothubowner;SharedAccessKey=...;EntityPath=NAME
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

__all__ = ["add_events_parser", "eventhub_connection_string"]


def eventhub_connection_string(*, host_name: str, policy: str, key: str, entity: str) -> str:
    return (f"Endpoint=sb://{host_name}/;SharedAccessKeyName={policy};"
            f"SharedAccessKey={key};EntityPath={entity}")


def cmd_events(args: argparse.Namespace, client_of: Callable[[argparse.Namespace], Any]) -> int:
    client = client_of(args)
    if not client.info.get("event_hub_name"):
        from gateway.errors import GatewayError

        raise GatewayError("this hub serves no AMQP endpoint (amqp.enabled = false)")
    policy = client.request("GET", f"/sharedAccessPolicies/{args.policy_name}")
    key = policy["secondaryKey" if args.key_type == "secondary" else "primaryKey"]
    print(eventhub_connection_string(host_name=client.host_name, policy=policy["keyName"],
                                     key=key, entity=client.info["event_hub_name"]))
    return 0


def add_events_parser(sub: Any, common: argparse.ArgumentParser,
                      client_of: Callable[[argparse.Namespace], Any]) -> None:
    events = sub.add_parser("events", help="the built-in endpoint for back ends").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    p = events.add_parser("connection-string", parents=[common],
                          help="print the Event Hubs-compatible connection string")
    p.add_argument("--policy-name", default="iothubowner",
                   help="a policy with ServiceConnect (default: iothubowner)")
    p.add_argument("--key-type", choices=["primary", "secondary"], default="primary")
    p.set_defaults(fn=lambda args: cmd_events(args, client_of))
