"""What an AMQP link address names, and Event Hubs' start-position filter. Pure.

Addresses (Event Hubs AMQP guide; IoT Hub ref §3.3, §9.4), matched case-insensitively, with
or without a leading ``amqps://host`` (uamqp sends the whole URL, azure-eventhub the path)::

    $cbs                                             claims-based security node
    $management                                      entity/partition properties
    {event hub}/ConsumerGroups/{group}/Partitions/{partition}    an Event Hubs receiver
    /messages/devicebound                            C2D sender (the service's side)
    /messages/servicebound/feedback                  C2D feedback receiver
    /messages/servicebound/filenotifications         file upload notifications

The start position is Event Hubs' ``apache.org:selector-filter:string`` filter, whose value
azure-eventhub writes as ``amqp.annotation.x-opt-offset > '123'`` (also ``>=``, and
``x-opt-sequence-number``, ``x-opt-enqueued-time`` in epoch ms; the offsets ``-1`` = from the
start, ``@latest`` = only new events).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final, Literal
from urllib.parse import unquote

from gateway.errors import InvalidRequestError

__all__ = [
    "CBS",
    "DEVICEBOUND",
    "FEEDBACK",
    "FILE_NOTIFICATIONS",
    "MANAGEMENT",
    "PartitionAddress",
    "StartPosition",
    "device_of_to",
    "node_of",
    "parse_partition",
    "parse_selector",
]

CBS: Final = "$cbs"
MANAGEMENT: Final = "$management"
DEVICEBOUND: Final = "/messages/devicebound"
FEEDBACK: Final = "/messages/servicebound/feedback"
FILE_NOTIFICATIONS: Final = "/messages/servicebound/filenotifications"

SELECTOR_FILTER: Final = "apache.org:selector-filter:string"
SELECTOR_CODE: Final = 0x0000468C00000004  # the same filter's numeric descriptor (uamqp)

_URL = re.compile(r"^(?:amqps?|sb|wss?)://[^/]*", re.IGNORECASE)
_PARTITION = re.compile(r"^/?([^/]+)/ConsumerGroups/([^/]+)/Partitions/([^/]+)/?$", re.IGNORECASE)
_SELECTOR = re.compile(
    r"^\s*amqp\.annotation\.(x-opt-offset|x-opt-sequence-number|x-opt-enqueued-time)"
    r"\s*(>=|>)\s*'([^']*)'\s*$", re.IGNORECASE)
_TO = re.compile(r"^/devices/([^/]+)/messages/devicebound$", re.IGNORECASE)


def node_of(address: str | None) -> str:
    """The path part of a link address, ``amqps://host`` removed; ``""`` for None."""
    if not address:
        return ""
    return _URL.sub("", address)


@dataclass(frozen=True, slots=True)
class PartitionAddress:
    event_hub: str
    consumer_group: str
    partition: str


def parse_partition(node: str) -> PartitionAddress | None:
    """``{hub}/ConsumerGroups/{g}/Partitions/{p}`` -> its parts (percent-decoded), or None."""
    match = _PARTITION.match(node)
    if match is None:
        return None
    hub, group, partition = (unquote(part) for part in match.groups())
    return PartitionAddress(hub, group, partition)


@dataclass(frozen=True, slots=True)
class StartPosition:
    """Where a receiver starts. ``kind`` ``offset`` and ``sequence`` carry a sequence number
    (our offsets are sequence numbers as text); ``time`` carries epoch ms; ``latest`` means
    only events enqueued after the link opened."""

    kind: Literal["offset", "sequence", "time", "latest"]
    value: int = 0
    inclusive: bool = False


def parse_selector(text: str) -> StartPosition:
    """Parse an Event Hubs selector-filter expression; :class:`InvalidRequestError` if it is
    not one azure-eventhub writes."""
    match = _SELECTOR.match(text)
    if match is None:
        raise InvalidRequestError(f"unsupported filter expression: {text[:200]!r}")
    name, op, value = match.group(1).lower(), match.group(2), match.group(3)
    inclusive = op == ">="
    if name == "x-opt-offset":
        if value == "@latest":
            return StartPosition("latest")
        if value == "-1":
            return StartPosition("offset", 0, inclusive=False)
        kind: Literal["offset", "sequence", "time"] = "offset"
    elif name == "x-opt-sequence-number":
        kind = "sequence"
    else:
        kind = "time"
    try:
        number = int(value)
    except ValueError:
        raise InvalidRequestError(f"{name} value is not an integer: {value!r}") from None
    if number < 0:
        if kind == "time":
            raise InvalidRequestError(f"{name} value must not be negative: {value!r}")
        return StartPosition(kind, 0, inclusive=False)  # before the first event
    return StartPosition(kind, number, inclusive=inclusive)


def device_of_to(to: str | None) -> str:
    """The device id in a C2D message's ``to`` (``/devices/{id}/messages/devicebound``)."""
    match = _TO.match(to or "")
    if match is None:
        raise InvalidRequestError(
            f"'to' must be /devices/{{deviceId}}/messages/devicebound, not {to!r}")
    return unquote(match.group(1))
