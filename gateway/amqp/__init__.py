"""AMQP 1.0 for back ends: the built-in endpoint as an Event Hub, and service-side C2D.

Back ends written for Azure IoT Hub read telemetry with Event Hubs clients
(``azure-eventhub``'s ``EventHubConsumerClient``, Functions' IoT Hub trigger) and send C2D
with ``azure-iot-hub``'s registry manager, both over AMQP 1.0 with claims-based security
(IoT Hub ref §3.3, §7.2, §9.4, §10.1). This package serves them unmodified.

Why Apache Qpid Proton (``python-qpid-proton``) and not a codec of our own: AMQP 1.0 is a
large protocol (a type system with described types, frames, SASL, sessions with windows,
links with credit, settlement modes, multi-frame transfers), and Proton is the reference
implementation, maintained by the Apache Qpid project, used by Qpid's brokers and routers and
tested against Azure Service Bus and Event Hubs. Its ``Transport``/``Connection`` engine does
no I/O (bytes in, bytes out, events), which is the sans-I/O shape the rest of this code base
uses: :mod:`gateway.amqp.engine` is the thin asyncio shell around it. uamqp (Microsoft's C
binding) is deprecated, and azure-eventhub's pure-Python ``_pyamqp`` is a client, not a
server, and private to that package.

Layout: :mod:`.addresses` and :mod:`.convert` are pure (addresses and filters; message
mapping); :mod:`.engine` drives one connection; :mod:`.links` holds what each node does;
:mod:`.server` has the TLS listener and the WebSocket route.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import time
from collections.abc import Callable

from gateway.amqp.services import BuiltinEndpoint, FileNotifications, Services
from gateway.config import AmqpConfig
from gateway.hub.auth import Authenticator
from gateway.hub.c2dsvc import C2DService
from gateway.store.log import MessageLog

if importlib.util.find_spec("proton") is None:  # loaded with the first connection; needed then
    raise ImportError("No module named 'proton'")

__all__ = ["event_hub_name", "make_services"]


def event_hub_name(config: AmqpConfig, host_name: str) -> str:
    """The Event Hubs-compatible name: ``amqp.event_hub_name``, else the host name's first
    label (IoT Hub shows the hub's name)."""
    if config.event_hub_name:
        return config.event_hub_name
    try:
        ipaddress.ip_address(host_name)
        return host_name  # a hub named by its address: no label to take
    except ValueError:
        return host_name.split(".", 1)[0]


def make_services(config: AmqpConfig, *, host_name: str, log: MessageLog,
                  authenticator: Authenticator, c2d: C2DService,
                  files: FileNotifications | None = None,
                  events: BuiltinEndpoint | None = None,
                  clock: Callable[[], float] = time.time) -> Services:
    """The AMQP nodes' view of the hub; consumer groups compare case-insensitively.
    ``events`` (routing) says what the event hub holds: what went to the built-in endpoint,
    with its enrichments, as the REST stream shows it."""
    groups = frozenset({"$default", *(g.lower() for g in config.consumer_groups)})
    return Services(host_name=host_name, event_hub=event_hub_name(config, host_name),
                    consumer_groups=groups, log=log, authenticator=authenticator, c2d=c2d,
                    config=config, created_ms=int(clock() * 1000), clock=clock, files=files,
                    events=events)
