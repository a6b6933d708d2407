"""A stored message as it goes up: the origin's telemetry topic with its property bag. Pure.

The bag carries what the device set (application properties; message id, correlation id,
content type and encoding, creation time, schema, subject: IoT Hub ref §2.3) and, towards a
parent that is this software, the child's stamp (:mod:`gateway.hub.onbehalf`): epoch,
sequence, and the gateway path so far. Every message gets a **stable** ``$.mid``: the device's
own, else ``{epoch}-{seq}``, the same on every resend, so consumers behind Azure can dedupe.

Towards our own parent the per-message parts come first, at a fixed position
(:func:`gateway.hub.onbehalf.split_stamp`): ``$.gws={seq}&[$.gwq={prev}&][$.mid={own id}&]``
then the rest of the bag, which is the same for every message of an origin with the same
properties, so the parent parses it once and caches it (the default ``{epoch}-{seq}`` id is
left out: the parent derives it). :class:`Encoder` caches that rest per stored property bag.
"""

from __future__ import annotations

import json
from typing import Any, NamedTuple

from gateway.hub import onbehalf
from gateway.hub.propbag import encode_bag, encode_component
from gateway.store.log import Entry
from gateway.upstream.policy import DEFAULT_ROUTE

_WIRE = {
    "message-id": "$.mid",
    "correlation-id": "$.cid",
    "user-id": "$.uid",
    "content-type": "$.ct",
    "content-encoding": "$.ce",
    "absolute-expiry-time": "$.exp",
    "creation-time": "$.ctime",
    "message-schema": "$.schema",
    "dt-subject": "$.sub",
}


class Origin(NamedTuple):
    """Whose message it is, as the parent knows it (a tuple: hashed in C, it keys every
    queue and is looked up several times per forwarded message)."""

    device_id: str
    module_id: str | None

    @property
    def client_id(self) -> str:
        return self.device_id if self.module_id is None else f"{self.device_id}/{self.module_id}"


def origin_of(entry: Entry, local_gateway: str, upstream_gateway: str) -> Origin:
    """The entry's origin; our own device (the hub's modules hang off it) is known upstream by
    the link's device id."""
    device = upstream_gateway if entry.device_id == local_gateway else entry.device_id
    return Origin(device, entry.module_id)


class Origins:
    """:func:`origin_of` with the origins made once (the scanner's per-message look-up)."""

    def __init__(self, local_gateway: str, upstream_gateway: str) -> None:
        self.local_gateway = local_gateway
        self.upstream_gateway = upstream_gateway
        self._known: dict[tuple[str, str | None], Origin] = {}

    def of(self, entry: Entry) -> Origin:
        key = (entry.device_id, entry.module_id)
        origin = self._known.get(key)
        if origin is None:
            if len(self._known) >= 65536:
                self._known.clear()
            origin = self._known[key] = origin_of(entry, self.local_gateway,
                                                  self.upstream_gateway)
        return origin


def base_topic(origin: Origin) -> str:
    topic = f"devices/{encode_component(origin.device_id)}/"
    if origin.module_id is not None:
        topic += f"modules/{encode_component(origin.module_id)}/"
    return topic + "messages/events/"


def encode(entry: Entry, origin: Origin, *, epoch: str, stamp: bool,
           route: str = DEFAULT_ROUTE) -> tuple[str, bytes]:
    """(topic, payload) of ``entry`` with every property in one bag (the slow, general form:
    towards Azure, or when ``stamp`` puts the dedupe stamp anywhere in the bag)."""
    data = json.loads(entry.props)
    mid = data.get("system", {}).get("message-id") or f"{epoch}-{entry.seq}"
    pairs = [("$.mid", mid), *_pairs(data, epoch if stamp else None, route, entry.seq)]
    return base_topic(origin) + encode_bag(pairs), entry.body


def _pairs(data: dict[str, Any], epoch: str | None, route: str,
           seq: int | None = None) -> list[tuple[str, str | None]]:
    """The bag of a stored message's properties but its message id: the system properties
    on the wire, then (``epoch`` given: towards a parent of ours) the stamp's epoch, ``seq``
    when it goes here rather than in front, route and gateway path, then the application
    properties."""
    system: dict[str, str] = data.get("system", {})
    pairs: list[tuple[str, str | None]] = [
        (key, system[name]) for name, key in _WIRE.items()
        if name != "message-id" and system.get(name) is not None]
    if epoch is not None:
        pairs.append((onbehalf.EPOCH_KEY, epoch))
        if seq is not None:
            pairs.append((onbehalf.SEQ_KEY, str(seq)))
        if route != DEFAULT_ROUTE:
            pairs.append((onbehalf.ROUTE_KEY, route))
        path = system.get(onbehalf.GATEWAY_PATH)
        if path:
            pairs.append((onbehalf.PATH_KEY, path))
    pairs.extend(data.get("application", {}).items())
    return pairs


class Encoder:
    """:func:`encode` towards a parent that is this software, with the per-message stamp in
    front and the rest of the bag cached per (stored properties, origin, route), with the
    origin's topic: a forwarded message then costs one dictionary look-up and a string
    join, not a JSON parse and a percent-encoding of every property. Bounded: the cache is
    emptied when it is full."""

    def __init__(self, epoch: str, max_entries: int = 4096) -> None:
        self.epoch = epoch
        self.max_entries = max_entries
        # (props, origin, route) -> (the origin's topic, the rest of the bag); not for a
        # message with an id of its own (its bag is made per message)
        self._rest: dict[tuple[str, Origin, str], tuple[str, str]] = {}

    def topic(self, entry: Entry, origin: Origin, route: str = DEFAULT_ROUTE,
              prev: int | None = None) -> str:
        """The stamped topic of ``entry``; ``prev``: the sequence of the message sent before
        it in its queue, when known (the parent's gap check, :mod:`gateway.store.dedupe`)."""
        cached = self._rest.get((entry.props, origin, route))
        if cached is not None:
            if prev is None:
                return f"{cached[0]}$.gws={entry.seq}&{cached[1]}"
            return f"{cached[0]}$.gws={entry.seq}&$.gwq={prev}&{cached[1]}"
        return base_topic(origin) + self.bag(entry, origin, route, prev)

    def bag(self, entry: Entry, origin: Origin, route: str = DEFAULT_ROUTE,
            prev: int | None = None) -> str:
        """:meth:`topic` without the origin's ``devices/.../messages/events/`` (a reading in
        a pack)."""
        head = f"$.gws={entry.seq}&" if prev is None else f"$.gws={entry.seq}&$.gwq={prev}&"
        key = (entry.props, origin, route)
        cached = self._rest.get(key)
        if cached is not None:
            return head + cached[1]
        data = json.loads(entry.props)
        own = data.get("system", {}).get("message-id")
        pairs = _pairs(data, self.epoch, route)
        tail = encode_bag(pairs)
        if own:  # a message id of the device's own: per message, so in front and not cached
            return head + "$.mid=" + encode_component(own) + "&" + tail
        if len(self._rest) >= self.max_entries:
            self._rest.clear()
        self._rest[key] = (base_topic(origin), tail)
        return head + tail


PACK_LIMIT = 4096  # IoT Hub bills per started 4 KB: a pack fills one unit
def pack_topic(origin: Origin, count: int, epoch: str) -> str:
    """The topic of a pack of ``count`` readings of ``origin`` (:func:`gateway.hub.onbehalf.
    split_pack` at the parent)."""
    return f"{base_topic(origin)}{onbehalf.PACK_HEAD}{count}&%24.gwe={encode_component(epoch)}"
