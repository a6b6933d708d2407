"""IoT Hub topic addresses: topic strings <-> typed addresses, for one connected identity.

Pure. Every device-side topic of IoT Hub ref §16.1 (except DPS) has a frozen dataclass here,
and every address knows its canonical topic (``.topic``), so templates live in one place.

Three directions:

* :func:`parse_publish_topic`: what a device or module may PUBLISH (telemetry, twin GET,
  twin reported patch, method response). Raises :class:`~gateway.errors.ForbiddenError`.
* :func:`parse_subscribe_filter`: the six SUBSCRIBE filters of ref §1.5, plus this gateway's
  ``$gateway/children/#`` for bridge modules (and nothing else:
  IoT Hub is not a general broker). Raises ForbiddenError.
* hub -> device topics: :func:`c2d_topic`, :func:`module_input_topic`,
  :func:`twin_response_topic`, :func:`desired_patch_topic`, :func:`method_request_topic`,
  and their inverse :func:`parse_delivery_topic` for our own device client (the upstream link,
  the hardware bridges). That one raises :class:`~gateway.errors.RemoteProtocolError`.

Identity matching (ref §1.2): ids are never parsed out of a topic. The connected identity is
given and matched as a prefix. Device and module ids may contain ``+ # ? $ % * ! ( ) , : = @
' -``... but never ``/``. The Python SDK percent-encodes the ids in every topic it builds
(``quote(id, safe="")`` in ``mqtt_topic_iothub._get_topic_base``), other clients send them raw,
so an id level matches when it equals the id, or when it percent-decodes to the id. The
topics built here always carry the encoded form (it is the only one that is a legal MQTT topic
name for ids with ``+`` or ``#``, and the Python SDK's ``is_c2d_topic`` looks for it).

Grammar of the publish topics (``{d}``/``{m}`` = the identity, as above)::

    telemetry   = base "/messages/events" [ "/" [ [ "?" ] bag ] [ "/" ] ]     ; ref §2.1
    base        = "devices/" {d}                     ; a device connection
                | "devices/" {d} "/modules/" {m}     ; a module connection
    bag         = property bag without "/" (gateway.hub.propbag)
    twin-get    = "$iothub/twin/GET/?" query          ; $rid required     (ref §4.1)
    twin-patch  = "$iothub/twin/PATCH/properties/reported/?" query  ; $rid, optional $version
    method-res  = "$iothub/methods/res/" status "/?" query          ; $rid  (ref §5.1)
    child-rep   = "$gateway/children/reported/" child-id       ; modules only (gateway.translation)
    query       = property bag: keys and values percent-decoded; unknown keys ignored;
                  duplicates: the first wins; $version = 1*DIGIT; status = [ "-" ] 1*DIGIT

A twin GET's body is not looked at here (the Python SDK sends a single space, pitfall 7).
Percent-decoding failures inside a query raise RemoteProtocolError (from propbag).
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.errors import ForbiddenError, LocalProtocolError, RemoteProtocolError
from gateway.hub.federated import DOWNLINK_FILTER, DownlinkFilter
from gateway.hub.propbag import decode_bag, decode_component, encode_component
from gateway.translation import (
    CHILDREN_FILTER,
    child_reported_topic,
    parse_child_reported_topic,
)

__all__ = [
    "C2DFilter",
    "C2DMessage",
    "ChildReportedPatch",
    "ChildrenFilter",
    "DeliveryAddress",
    "DesiredPatch",
    "DesiredPatchesFilter",
    "MethodRequest",
    "MethodRequestsFilter",
    "MethodResponse",
    "ModuleInput",
    "ModuleInputsFilter",
    "PublishAddress",
    "SubscribeAddress",
    "Telemetry",
    "TwinGet",
    "TwinReportedPatch",
    "TwinResponse",
    "TwinResponsesFilter",
    "c2d_topic",
    "desired_patch_topic",
    "method_request_topic",
    "module_input_topic",
    "parse_delivery_topic",
    "parse_publish_topic",
    "parse_subscribe_filter",
    "twin_response_topic",
]

_TWIN_GET = "$iothub/twin/GET/?"
_TWIN_PATCH = "$iothub/twin/PATCH/properties/reported/?"
_METHOD_RES = "$iothub/methods/res/"
_TWIN_RES = "$iothub/twin/res/"
_DESIRED = "$iothub/twin/PATCH/properties/desired/?"
_METHOD_POST = "$iothub/methods/POST/"
_EVENTS = "/messages/events"
_EVENTS_LEN = len(_EVENTS)
_DEVICEBOUND = "/messages/devicebound"


def _base(device_id: str, module_id: str | None) -> str:
    """The canonical (encoded) ``devices/{d}[/modules/{m}]`` prefix of ref §16.1."""
    if module_id is None:
        return "devices/" + encode_component(device_id)
    return "devices/" + encode_component(device_id) + "/modules/" + encode_component(module_id)


def _query(rid: str, version: int | None = None) -> str:
    text = "?$rid=" + encode_component(rid)
    return text if version is None else text + "&$version=" + str(version)


# -- device -> hub publishes ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Telemetry:
    """A device-to-cloud message (ref §2.1); ``bag`` is the raw, still encoded property bag
    (without a leading ``?``): decode it with :func:`gateway.hub.propbag.decode_bag`."""

    device_id: str
    module_id: str | None
    bag: str

    @property
    def topic(self) -> str:
        return _base(self.device_id, self.module_id) + _EVENTS + "/" + self.bag


@dataclass(frozen=True, slots=True)
class TwinGet:
    """``$iothub/twin/GET/?$rid={rid}`` (ref §4.1); answered on :func:`twin_response_topic`."""

    rid: str

    @property
    def topic(self) -> str:
        return "$iothub/twin/GET/" + _query(self.rid)


@dataclass(frozen=True, slots=True)
class TwinReportedPatch:
    """``$iothub/twin/PATCH/properties/reported/?$rid={rid}[&$version={v}]`` (ref §4.1)."""

    rid: str
    version: int | None = None

    @property
    def topic(self) -> str:
        return "$iothub/twin/PATCH/properties/reported/" + _query(self.rid, self.version)


@dataclass(frozen=True, slots=True)
class MethodResponse:
    """``$iothub/methods/res/{status}/?$rid={rid}`` (ref §5.1): the device's answer."""

    status: int
    rid: str

    @property
    def topic(self) -> str:
        return _METHOD_RES + str(self.status) + "/" + _query(self.rid)


@dataclass(frozen=True, slots=True)
class ChildReportedPatch:
    """``$gateway/children/reported/{deviceId}``: a bridge module's reported-properties patch
    on behalf of its child device (:mod:`gateway.translation`; modules only)."""

    device_id: str

    @property
    def topic(self) -> str:
        return child_reported_topic(self.device_id)


PublishAddress = Telemetry | TwinGet | TwinReportedPatch | MethodResponse | ChildReportedPatch

# -- subscription filters (ref §1.5) ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class C2DFilter:
    """``devices/{d}/messages/devicebound/#``: cloud-to-device messages (devices only)."""

    device_id: str

    @property
    def topic(self) -> str:
        return _base(self.device_id, None) + _DEVICEBOUND + "/#"


@dataclass(frozen=True, slots=True)
class ModuleInputsFilter:
    """``devices/{d}/modules/{m}/inputs/#`` (Python SDK) or ``devices/{d}/modules/{m}/#``
    (C SDK): the module's inputs (modules only). ``.topic`` is the Python SDK form."""

    device_id: str
    module_id: str

    @property
    def topic(self) -> str:
        return _base(self.device_id, self.module_id) + "/inputs/#"


@dataclass(frozen=True, slots=True)
class TwinResponsesFilter:
    """``$iothub/twin/res/#``: answers to twin GET and reported patches."""

    @property
    def topic(self) -> str:
        return "$iothub/twin/res/#"


@dataclass(frozen=True, slots=True)
class DesiredPatchesFilter:
    """``$iothub/twin/PATCH/properties/desired/#``: desired-property patches."""

    @property
    def topic(self) -> str:
        return "$iothub/twin/PATCH/properties/desired/#"


@dataclass(frozen=True, slots=True)
class MethodRequestsFilter:
    """``$iothub/methods/POST/#``: direct method requests."""

    @property
    def topic(self) -> str:
        return "$iothub/methods/POST/#"


@dataclass(frozen=True, slots=True)
class ChildrenFilter:
    """``$gateway/children/#``: the children document of a bridge module
    (:mod:`gateway.translation`; modules only)."""

    @property
    def topic(self) -> str:
        return CHILDREN_FILTER


SubscribeAddress = (
    C2DFilter | ModuleInputsFilter | TwinResponsesFilter | DesiredPatchesFilter
    | MethodRequestsFilter | ChildrenFilter | DownlinkFilter
)
_FIXED_FILTERS: dict[str, SubscribeAddress] = {
    "$iothub/twin/res/#": TwinResponsesFilter(),
    "$iothub/twin/PATCH/properties/desired/#": DesiredPatchesFilter(),
    "$iothub/methods/POST/#": MethodRequestsFilter(),
}

# -- hub -> device publishes ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class C2DMessage:
    """``devices/{d}/messages/devicebound/{bag}`` (ref §3.1); ``bag`` is encoded."""

    device_id: str
    bag: str

    @property
    def topic(self) -> str:
        return _base(self.device_id, None) + _DEVICEBOUND + "/" + _checked_bag(self.bag)


@dataclass(frozen=True, slots=True)
class ModuleInput:
    """``devices/{d}/modules/{m}/inputs/{input}/{bag}`` (ref §6.1); ``bag`` is encoded."""

    device_id: str
    module_id: str
    input_name: str
    bag: str

    @property
    def topic(self) -> str:
        if not self.input_name:
            raise LocalProtocolError("an input name may not be empty")
        return (
            _base(self.device_id, self.module_id) + "/inputs/"
            + encode_component(self.input_name) + "/" + _checked_bag(self.bag)
        )


@dataclass(frozen=True, slots=True)
class TwinResponse:
    """``$iothub/twin/res/{status}/?$rid={rid}[&$version={v}]`` (ref §4.1)."""

    status: int
    rid: str
    version: int | None = None

    @property
    def topic(self) -> str:
        return _TWIN_RES + str(self.status) + "/" + _query(self.rid, self.version)


@dataclass(frozen=True, slots=True)
class DesiredPatch:
    """``$iothub/twin/PATCH/properties/desired/?$version={v}`` (ref §4.1)."""

    version: int

    @property
    def topic(self) -> str:
        return _DESIRED + "$version=" + str(self.version)


@dataclass(frozen=True, slots=True)
class MethodRequest:
    """``$iothub/methods/POST/{name}/?$rid={rid}`` (ref §5.1); the name is encoded."""

    name: str
    rid: str

    @property
    def topic(self) -> str:
        if not self.name:
            raise LocalProtocolError("a method name may not be empty")
        return _METHOD_POST + encode_component(self.name) + "/" + _query(self.rid)


DeliveryAddress = C2DMessage | ModuleInput | TwinResponse | DesiredPatch | MethodRequest


def _checked_bag(bag: str) -> str:
    # Pitfall 10: the Python SDK takes one "/"-level as the bag; "+"/"#" are illegal in names.
    if "/" in bag or "+" in bag or "#" in bag:
        raise LocalProtocolError(f"bag must be percent-encoded (no '/', '+', '#'): {bag!r}")
    return bag


def c2d_topic(device_id: str, bag: str) -> str:
    """The topic of a C2D message to ``device_id`` (ref §3.1); ``bag`` from ``encode_bag``."""
    return C2DMessage(device_id, bag).topic


def module_input_topic(device_id: str, module_id: str, input_name: str, bag: str) -> str:
    """The topic of a message routed to a module input (ref §6.1)."""
    return ModuleInput(device_id, module_id, input_name, bag).topic


def twin_response_topic(status: int, rid: str, version: int | None = None) -> str:
    """The answer to a twin GET or reported patch; ``version`` after a patch (ref §4.1).
    Every parameter has ``=value`` (pitfall 8)."""
    return TwinResponse(status, rid, version).topic


def desired_patch_topic(version: int) -> str:
    """The topic of a desired-properties patch (ref §4.1)."""
    return DesiredPatch(version).topic


def method_request_topic(name: str, rid: str) -> str:
    """The topic of a direct method request (ref §5.1)."""
    return MethodRequest(name, rid).topic


# -- parsing ----------------------------------------------------------------------------------


def _who(device_id: str, module_id: str | None) -> str:
    return device_id if module_id is None else device_id + "/" + module_id


def _forbidden(topic: str, device_id: str, module_id: str | None, why: str = "") -> ForbiddenError:
    tail = f" ({why})" if why else ""
    return ForbiddenError(f"topic not allowed for {_who(device_id, module_id)}: {topic!r}{tail}")


def _is_id(level: str, identity: str) -> bool:
    if level == identity:
        return True
    if "%" not in level:
        return False
    try:
        return decode_component(level) == identity
    except RemoteProtocolError:
        return False


def _after_base(topic: str, device_id: str, module_id: str | None) -> str | None:
    """The rest of ``topic`` after ``devices/{d}[/modules/{m}]``, or None if the topic does
    not start with this identity's base (raw, or any percent-encoding of the ids)."""
    # Fast path: the ids as they are (the common case: ids of unreserved characters only).
    if module_id is None:
        prefix = "devices/" + device_id
    else:
        prefix = "devices/" + device_id + "/modules/" + module_id
    if topic.startswith(prefix):
        rest = topic[len(prefix):]
        if not rest or rest[0] == "/":
            return rest
    # Slow path: one id level at a time, percent-decoded.
    levels = topic.split("/", 4 if module_id is not None else 2)
    if len(levels) < 2 or levels[0] != "devices" or not _is_id(levels[1], device_id):
        return None
    if module_id is None:
        return "/" + levels[2] if len(levels) > 2 else ""
    if len(levels) < 4 or levels[2] != "modules" or not _is_id(levels[3], module_id):
        return None
    return "/" + levels[4] if len(levels) > 4 else ""


def _params(query: str) -> dict[str, str | None]:
    params: dict[str, str | None] = {}
    for key, value in decode_bag(query):
        params.setdefault(key, value)
    return params


def _rid(params: dict[str, str | None]) -> str | None:
    rid = params.get("$rid")
    return rid or None


def _int(text: str | None, *, signed: bool = False) -> int | None:
    if text is None:
        return None
    digits = text[1:] if signed and text[:1] == "-" else text
    if not digits or not digits.isascii() or not digits.isdigit():
        return None
    return int(text)


def parse_publish_topic(
    topic: str, *, device_id: str, module_id: str | None
) -> PublishAddress:
    """Parse a PUBLISH topic from the connected ``device_id``/``module_id`` (ref §16.1).

    Raises ForbiddenError naming the topic when it is another identity's, or not one of the
    forms in the module docstring; RemoteProtocolError when a twin/method query has a
    malformed percent escape. The telemetry bag is returned raw (decode it separately).
    """
    if topic[:1] != "$":
        # Hot path: telemetry with the ids as they are; one concatenation, one startswith.
        if module_id is None:
            prefix = "devices/" + device_id + "/messages/events"
        else:
            prefix = "devices/" + device_id + "/modules/" + module_id + "/messages/events"
        if topic.startswith(prefix):
            tail = topic[len(prefix):]
        else:
            rest = _after_base(topic, device_id, module_id)
            if rest is None or not rest.startswith(_EVENTS):
                raise _forbidden(topic, device_id, module_id)
            tail = rest[_EVENTS_LEN:]
        if not tail:
            return Telemetry(device_id, module_id, "")
        if tail[0] == "/":
            bag = tail[1:]
            if "/" in bag:  # only a trailing "/" is allowed
                bag = bag[:-1]
                if "/" in bag or tail[-1] != "/":
                    raise _forbidden(topic, device_id, module_id)
            if bag[:1] == "?":
                bag = bag[1:]
            return Telemetry(device_id, module_id, bag)
        raise _forbidden(topic, device_id, module_id)
    if topic.startswith(_TWIN_GET):
        rid = _rid(_params(topic[len(_TWIN_GET):]))
        if rid is not None:
            return TwinGet(rid)
        raise _forbidden(topic, device_id, module_id, "$rid missing")
    if topic.startswith(_TWIN_PATCH):
        params = _params(topic[len(_TWIN_PATCH):])
        rid = _rid(params)
        if rid is None:
            raise _forbidden(topic, device_id, module_id, "$rid missing")
        raw_version = params.get("$version")
        version = _int(raw_version)
        if raw_version is not None and version is None:
            raise _forbidden(topic, device_id, module_id, "$version is not an integer")
        return TwinReportedPatch(rid, version)
    if topic.startswith(_METHOD_RES):
        status_text, sep, query = topic[len(_METHOD_RES):].partition("/?")
        status = _int(decode_component(status_text), signed=True) if sep else None
        if status is None:
            raise _forbidden(topic, device_id, module_id, "status is not an integer")
        rid = _rid(_params(query))
        if rid is None:
            raise _forbidden(topic, device_id, module_id, "$rid missing")
        return MethodResponse(status, rid)
    if module_id is not None:
        child_id = parse_child_reported_topic(topic)
        if child_id is not None:
            return ChildReportedPatch(child_id)
    raise _forbidden(topic, device_id, module_id)


def parse_subscribe_filter(
    topic_filter: str, *, device_id: str, module_id: str | None
) -> SubscribeAddress:
    """Parse a SUBSCRIBE filter from the connected identity against ref §1.5's table.

    C2D is for devices only, module inputs for modules only. Anything else (another
    identity's filter, a generic wildcard, a DPS filter) raises ForbiddenError: IoT Hub
    closes the connection rather than answering 0x80.
    """
    fixed = _FIXED_FILTERS.get(topic_filter)
    if fixed is not None:
        return fixed
    if topic_filter == DOWNLINK_FILTER and module_id is None:  # a child gateway's link
        return DownlinkFilter()
    rest = _after_base(topic_filter, device_id, module_id)
    if module_id is None:
        if rest == _DEVICEBOUND + "/#":
            return C2DFilter(device_id)
    else:
        if rest == "/inputs/#" or rest == "/#":
            return ModuleInputsFilter(device_id, module_id)
        if topic_filter == CHILDREN_FILTER:
            return ChildrenFilter()
        if _after_base(topic_filter, device_id, None) == _DEVICEBOUND + "/#":
            raise _forbidden(topic_filter, device_id, module_id, "C2D is for devices only")
    raise _forbidden(topic_filter, device_id, module_id)


def _bad_delivery(topic: str, why: str = "") -> RemoteProtocolError:
    tail = f" ({why})" if why else ""
    return RemoteProtocolError(f"unexpected topic from the hub: {topic!r}{tail}")


def parse_delivery_topic(
    topic: str, *, device_id: str, module_id: str | None
) -> DeliveryAddress:
    """Parse a topic the hub publishes to the client ``device_id``/``module_id``: the inverse
    of the builders above, for our own device client. Raises RemoteProtocolError."""
    if topic.startswith(_TWIN_RES):
        status_text, sep, query = topic[len(_TWIN_RES):].partition("/?")
        status = _int(decode_component(status_text), signed=True) if sep else None
        params = _params(query)
        rid = _rid(params)
        version = _int(params.get("$version"))
        if status is None or rid is None or (version is None and "$version" in params):
            raise _bad_delivery(topic)
        return TwinResponse(status, rid, version)
    if topic.startswith(_DESIRED):
        version = _int(_params(topic[len(_DESIRED):]).get("$version"))
        if version is None:
            raise _bad_delivery(topic, "$version missing")
        return DesiredPatch(version)
    if topic.startswith(_METHOD_POST):
        name_text, sep, query = topic[len(_METHOD_POST):].partition("/?")
        name = decode_component(name_text) if sep and "/" not in name_text else ""
        rid = _rid(_params(query))
        if not name or rid is None:
            raise _bad_delivery(topic)
        return MethodRequest(name, rid)
    rest = _after_base(topic, device_id, module_id)
    if rest is None:
        raise _bad_delivery(topic, f"not for {_who(device_id, module_id)}")
    if module_id is None and rest.startswith(_DEVICEBOUND):
        tail = rest[len(_DEVICEBOUND):]
        if not tail or (tail[0] == "/" and "/" not in tail[1:]):
            return C2DMessage(device_id, tail[1:])
    elif module_id is not None and rest.startswith("/inputs/"):
        name_text, _, bag = rest[len("/inputs/"):].partition("/")
        if name_text and "/" not in bag:
            return ModuleInput(device_id, module_id, decode_component(name_text), bag)
    raise _bad_delivery(topic)
