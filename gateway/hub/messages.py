"""The message model: body, system properties, application properties; their stamping,
size, storage form, and the ``monitor-events`` view.

Pure. References: IoT Hub ref §2.3 (system keys on the wire), §2.4 (size), §2.5 (what the
hub stamps), §3.1 and §6.1 (keys written to devices and modules), §10.5 (non-telemetry events).

Names. System properties are kept under the names Event Hubs readers see for IoT Hub
messages (``message-id``, ``content-type``, ``iothub-connection-device-id``, ...), which is
also what ``az iot hub monitor-events`` prints (as AMQP properties and annotations, see
:func:`to_monitor_json`). Application properties keep their wire names. A device can only
set the system properties of :data:`WIRE_TO_SYSTEM`; unknown ``$.`` keys are application
properties (as in edgeHub, ref §2.3), and ``to`` is dropped when a device sends it.

Stored form (:func:`props_json`): compact JSON ``{"system":{...},"application":{...}}`` with
keys in insertion order, so equal inputs give equal strings.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from gateway.errors import LocalProtocolError, MessageTooLargeError, StoreError

__all__ = [
    "DEVICE_SETTABLE",
    "MAX_TELEMETRY_BYTES",
    "SYSTEM_TO_WIRE",
    "TELEMETRY_SOURCE",
    "WIRE_TO_SYSTEM",
    "Message",
    "auth_method_json",
    "connection_state_event",
    "enriched",
    "format_time",
    "lifecycle_event",
    "message_from_stored",
    "message_size",
    "props_json",
    "split_properties",
    "stamp_telemetry",
    "to_monitor_json",
    "twin_change_event",
    "wire_pairs",
]

MAX_TELEMETRY_BYTES = 262144
"""256 KB per device-to-cloud message (ref §2.4; edgeHub ``MaxInboundMessageSize``)."""

TELEMETRY_SOURCE = "Telemetry"
"""``iothub-message-source`` of device messages (ref §2.5)."""

WIRE_TO_SYSTEM: dict[str, str] = {
    "$.mid": "message-id",
    "$.cid": "correlation-id",
    "$.uid": "user-id",
    "$.ct": "content-type",
    "$.ce": "content-encoding",
    "$.exp": "absolute-expiry-time",
    "$.on": "output-name",
    "$.ifid": "iothub-interface-id",
    "$.ctime": "creation-time",
    "$.sub": "dt-subject",
    "$.schema": "message-schema",
    "iothub-operation": "operation",
    "$.to": "to",
}
"""Decoded bag key sent by a device -> system property name (ref §2.3, edgeHub's incoming
map). Any other key, including unknown ``$.`` keys, is an application property."""

DEVICE_SETTABLE: frozenset[str] = frozenset(WIRE_TO_SYSTEM.values()) - {"to"}
"""System properties a device may set; everything else is the hub's (ref §2.5)."""

SYSTEM_TO_WIRE: dict[str, str] = {
    "message-id": "$.mid",
    "correlation-id": "$.cid",
    "user-id": "$.uid",
    "content-type": "$.ct",
    "content-encoding": "$.ce",
    "absolute-expiry-time": "$.exp",
    "to": "$.to",
    "ack": "iothub-ack",
    "message-schema": "$.schema",
    "operation": "iothub-operation",
    "creation-time": "$.ctime",
    "iothub-connection-device-id": "$.cdid",
    "iothub-connection-module-id": "$.cmid",
    "dt-subject": "$.sub",
}
"""System property -> bag key when the hub writes to a device (C2D, ref §3.1) or a module
input (edgeHub's outgoing keys, ref §6.1). System properties not listed are not sent."""

# System properties that ``az iot hub monitor-events`` shows as AMQP message properties
# (``properties.system``, snake_case); every other one is shown as an annotation.
_AMQP_PROPERTY: dict[str, str] = {
    "message-id": "message_id",
    "user-id": "user_id",
    "to": "to",
    "correlation-id": "correlation_id",
    "content-type": "content_type",
    "content-encoding": "content_encoding",
    "absolute-expiry-time": "absolute_expiry_time",
    "creation-time": "creation_time",
}
_COMPACT = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)  # configuration only
_STR = {str}
_STR_OR_NONE = {str, type(None)}
_TEXT_CODECS = {"utf-8": "utf-8", "utf8": "utf-8", "utf-16": "utf-16", "utf-32": "utf-32"}


@dataclass(frozen=True, slots=True)
class Message:
    """One message as the hub stores and routes it (ref §2.3, §2.5).

    ``system`` holds the names of :data:`WIRE_TO_SYSTEM` plus the hub's own
    (``iothub-connection-device-id``, ``iothub-connection-module-id``,
    ``iothub-connection-auth-method``, ``iothub-connection-auth-generation-id``,
    ``iothub-enqueuedtime``, ``iothub-message-source``, ``dt-dataschema``). Application
    values are None for bag keys sent without ``=``. Treat the mappings as read-only.
    """

    body: bytes
    system: Mapping[str, str]
    application: Mapping[str, str | None]


def split_properties(
    pairs: Iterable[tuple[str, str | None]],
) -> tuple[dict[str, str], dict[str, str | None]]:
    """Split decoded bag pairs into (system by name, application) (ref §2.3).

    For duplicate keys the first wins. A system key without a value (``$.ct`` alone) is
    ignored. Nothing is dropped for being spoofable here: see :func:`stamp_telemetry`.
    """
    system: dict[str, str] = {}
    application: dict[str, str | None] = {}
    for key, value in pairs:
        name = WIRE_TO_SYSTEM.get(key)
        if name is None:
            if key not in application:
                application[key] = value
        elif value is not None and name not in system:
            system[name] = value
    return system, application


def wire_pairs(
    system: Mapping[str, str], application: Mapping[str, str | None]
) -> list[tuple[str, str | None]]:
    """Bag pairs for a message the hub writes to a device or module: system keys first
    (``%24.``-style once encoded, which both the Python and C SDKs read, ref §3.1), then
    the application properties in order. Feed the result to ``encode_bag``."""
    pairs: list[tuple[str, str | None]] = []
    for name, value in system.items():
        key = SYSTEM_TO_WIRE.get(name)
        if key is not None:
            pairs.append((key, value))
    pairs.extend(application.items())
    return pairs


def _utf8_len(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8"))


def message_size(
    body: bytes, system: Mapping[str, str], application: Mapping[str, str | None]
) -> int:
    """The size IoT Hub counts against the 256 KB limit (ref §2.4): body bytes, plus the
    UTF-8 bytes of system property *values*, plus names and values of application
    properties (a None value counts 0)."""
    size = len(body)
    for value in system.values():
        size += _utf8_len(value)
    for key, app_value in application.items():
        size += _utf8_len(key)
        if app_value is not None:
            size += _utf8_len(app_value)
    return size


def enriched(message: Message, enrichments: Mapping[str, str], *,
             limit: int = MAX_TELEMETRY_BYTES) -> Message:
    """``message`` on its way to an endpoint with that endpoint's enrichments (ref §10.4):
    added as application properties, an enrichment replacing a property of the same name.

    IoT Hub drops, for that endpoint only, a message its enrichments push over 256 KB (ref
    §10.4), sized as at ingress (:func:`message_size`, ref §2.4: body, system property values,
    application property names and values; what an endpoint adds besides, such as a derived
    message id, does not count). So a message whose enriched size is over ``limit`` raises
    :class:`MessageTooLargeError` (``size``, ``limit``); exactly ``limit`` bytes passes. The
    docs say nothing of a message that is already over the limit without enrichments (a hub
    configured with a higher ``mqtt.max_message_bytes``): without enrichments nothing is
    checked, the message went in under the hub's own limit, and callers pass that limit."""
    if not enrichments:
        return message
    application = {**message.application, **enrichments}
    size = message_size(message.body, message.system, application)
    if size > limit:
        raise MessageTooLargeError(
            f"enriched message of {size} bytes is over the {limit}-byte limit",
            size=size, limit=limit)
    return Message(message.body, message.system, application)


def format_time(epoch_seconds: float) -> str:
    """UTC ISO 8601 with seven fractional digits and ``Z``, as IoT Hub writes
    ``operationTimestamp`` (``2022-06-01T18:43:04.5561024Z``, ref §10.5). Fixed width, so
    strings compare in time order."""
    micros = round(epoch_seconds * 1_000_000)
    seconds, micro = divmod(micros, 1_000_000)
    stamp = datetime.fromtimestamp(seconds, tz=UTC)
    return f"{stamp:%Y-%m-%dT%H:%M:%S}.{micro:06d}0Z"


def auth_method_json(
    *, scope: Literal["device", "module", "hub"], method: Literal["sas", "x509"]
) -> str:
    """The ``iothub-connection-auth-method`` value (ref §2.5), byte-for-byte as IoT Hub
    writes it: ``{"scope":"device","type":"sas","issuer":"iothub","acceptingIpFilterRule":null}``;
    X.509 gives ``"type":"x509Certificate","issuer":"external"``."""
    kind, issuer = ("sas", "iothub") if method == "sas" else ("x509Certificate", "external")
    return (
        f'{{"scope":"{scope}","type":"{kind}","issuer":"{issuer}",'
        '"acceptingIpFilterRule":null}'
    )


def stamp_telemetry(
    system: Mapping[str, str],
    *,
    device_id: str,
    module_id: str | None,
    auth_method: str,
    generation_id: str,
    model_id: str | None = None,
    enqueued_time: float | None = None,
) -> dict[str, str]:
    """The system properties of a device message as stored: the device's own
    (:data:`DEVICE_SETTABLE` only, so ``to`` and any hub name are dropped) plus what the
    hub stamps from the *authenticated* identity (ref §2.5): connection device/module id,
    auth method (see :func:`auth_method_json`), generation id, ``iothub-message-source`` =
    ``Telemetry``, ``dt-dataschema`` from CONNECT's ``model-id``, and
    ``iothub-enqueuedtime`` (:func:`format_time`) when ``enqueued_time`` is given."""
    stamped = {name: value for name, value in system.items() if name in DEVICE_SETTABLE}
    stamped["iothub-connection-device-id"] = device_id
    if module_id is not None:
        stamped["iothub-connection-module-id"] = module_id
    stamped["iothub-connection-auth-method"] = auth_method
    stamped["iothub-connection-auth-generation-id"] = generation_id
    stamped["iothub-message-source"] = TELEMETRY_SOURCE
    if model_id:
        stamped["dt-dataschema"] = model_id
    if enqueued_time is not None:
        stamped["iothub-enqueuedtime"] = format_time(enqueued_time)
    return stamped


# -- stored form ------------------------------------------------------------------------------


def props_json(system: Mapping[str, str], application: Mapping[str, str | None]) -> str:
    """The stored properties of one message: compact JSON, keys in insertion order."""
    return _COMPACT.encode(
        {
            "system": system if type(system) is dict else dict(system),
            "application": application if type(application) is dict else dict(application),
        }
    )


def message_from_stored(props: str, body: bytes) -> Message:
    """Rebuild a Message from :func:`props_json` output and the body. Raises StoreError
    if ``props`` is not that shape (a corrupt row)."""
    try:
        data = json.loads(props)
    except ValueError as exc:
        raise StoreError(f"stored message properties are not JSON: {exc}") from None
    system = data.get("system") if isinstance(data, dict) else None
    application = data.get("application") if isinstance(data, dict) else None
    if (
        not isinstance(system, dict)
        or not isinstance(application, dict)
        or not set(map(type, system.values())) <= _STR
        or not set(map(type, application.values())) <= _STR_OR_NONE
    ):
        raise StoreError(f"stored message properties have the wrong shape: {props[:200]!r}")
    return Message(body, system, application)


# -- monitor-events view ----------------------------------------------------------------------


def _epoch_ms(text: str) -> int | None:
    """``iothub-enqueuedtime`` as az shows it (ms since the epoch), from an ISO string."""
    head, dot, frac = text.rstrip("Z").partition(".")
    try:
        stamp = datetime.fromisoformat(head).replace(tzinfo=UTC)
    except ValueError:
        return None
    millis = int((frac + "000")[:3]) if dot and frac[:3].isdigit() else 0
    return int(stamp.timestamp()) * 1000 + millis


def _is_json_type(content_type: str) -> bool:
    media = content_type.partition(";")[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


def _payload(body: bytes, system: Mapping[str, str], content_type: str | None) -> tuple[Any, bool]:
    """(payload, is_base64) following az: JSON when the content type says so; we also parse
    a body with no content type if it is a JSON object or array; else text; else base64."""
    codec = _TEXT_CODECS.get(system.get("content-encoding", "utf-8").strip().lower(), "utf-8")
    try:
        text = body.decode(codec)
    except UnicodeDecodeError:
        return base64.b64encode(body).decode("ascii"), True
    ctype = content_type if content_type is not None else system.get("content-type")
    if ctype is None:
        looks_json = text.lstrip()[:1] in ("{", "[")
    else:
        looks_json = _is_json_type(ctype)
    if looks_json:
        try:
            return json.loads(text), False
        except ValueError:
            pass
    return text, False


def to_monitor_json(
    message: Message,
    *,
    device_id: str,
    module_id: str | None,
    enqueued_time_ms: int | None = None,
    content_type: str | None = None,
) -> dict[str, Any]:
    """One message as ``gateway monitor-events --json`` prints it, modelled on
    ``az iot hub monitor-events --props all --output json`` (shape from the IoT Hub docs'
    captures)::

        {"event": {
            "origin": "<device id>",
            "module": "<module id or ''>",
            "interface": "<iothub-interface-id or ''>",
            "component": "<dt-subject or ''>",
            "properties": {
                "system": {<AMQP message properties, az's snake_case names: message_id,
                            correlation_id, user_id, to, content_type, content_encoding,
                            absolute_expiry_time, creation_time>},
                "application": {<application properties as sent; null for bare keys>}},
            "annotations": {<every other system property under its own name, e.g.
                             iothub-connection-device-id, iothub-connection-auth-method,
                             iothub-message-source; iothub-enqueuedtime as ms since the
                             epoch (an int), as az shows it>},
            "payload": <see below>}}

    ``payload``: decoded JSON when the content type (or the ``content_type`` hint, like az's
    ``--content-type``) is ``application/json`` or ``*+json``, or when there is no content
    type and the body is a JSON object or array; otherwise the text (``content-encoding``
    utf-8/utf-16/utf-32, default utf-8); a body that is not text is base64 and the event
    gets ``"payload_encoding": "base64"`` (the only time that key appears). Keys are stable.
    """
    system = message.system
    amqp: dict[str, str] = {}
    annotations: dict[str, Any] = {}
    for name, value in system.items():
        prop = _AMQP_PROPERTY.get(name)
        if prop is not None:
            amqp[prop] = value
        else:
            annotations[name] = value
    if enqueued_time_ms is not None:
        annotations["iothub-enqueuedtime"] = enqueued_time_ms
    elif "iothub-enqueuedtime" in annotations:
        millis = _epoch_ms(annotations["iothub-enqueuedtime"])
        if millis is not None:
            annotations["iothub-enqueuedtime"] = millis
    payload, is_base64 = _payload(message.body, system, content_type)
    event: dict[str, Any] = {
        "origin": device_id,
        "module": module_id or "",
        "interface": system.get("iothub-interface-id", ""),
        "component": system.get("dt-subject", ""),
        "properties": {"system": amqp, "application": dict(message.application)},
        "annotations": annotations,
        "payload": payload,
    }
    if is_base64:
        event["payload_encoding"] = "base64"
    return {"event": event}


# -- non-telemetry events (ref §10.5) ---------------------------------------------------------

Event = tuple[dict[str, str], dict[str, str | None], bytes]
"""(system, application, body) of a hub-generated event, ready for :func:`props_json`."""


def _notification(
    *,
    source: str,
    schema: str,
    op_type: str,
    hub_name: str,
    device_id: str,
    module_id: str | None,
    correlation_id: str,
    now: float,
    body: bytes,
) -> Event:
    when = format_time(now)
    system = {
        "content-type": "application/json",
        "content-encoding": "utf-8",
        "correlation-id": correlation_id,
        "user-id": hub_name,
        "iothub-connection-device-id": device_id,
    }
    if module_id is not None:
        system["iothub-connection-module-id"] = module_id
    system["iothub-enqueuedtime"] = when
    system["iothub-message-source"] = source
    application: dict[str, str | None] = {"hubName": hub_name, "deviceId": device_id}
    if module_id is not None:
        application["moduleId"] = module_id
    application["operationTimestamp"] = when
    application["opType"] = op_type
    application["iothub-message-schema"] = schema
    return system, application, body


def file_upload_event(*, hub_name: str, device_id: str, notification: Mapping[str, object],
                      correlation_id: str, now: float) -> Event:
    """A stored file's notification as a message of its own kind (``fileUploadNotifications``),
    the body as IoT Hub's service-bound notification (ref §11), so routes and readers see it."""
    return _notification(
        source="fileUploadNotifications", schema="fileUploadNotification",
        op_type="fileUploaded", hub_name=hub_name, device_id=device_id, module_id=None,
        correlation_id=correlation_id, now=now, body=_json_body(notification))


def _json_body(document: Mapping[str, object]) -> bytes:
    return _COMPACT.encode(document).encode("utf-8")


def connection_state_event(
    *,
    hub_name: str,
    device_id: str,
    module_id: str | None = None,
    connected: bool,
    sequence_number: str,
    correlation_id: str,
    now: float,
) -> Event:
    """A ``deviceConnectionStateEvents`` message (ref §10.5): opType ``deviceConnected`` or
    ``deviceDisconnected``, body ``{"sequenceNumber":"<64 hex digits>"}``. The caller keeps
    the sequence strictly increasing; it must be 64 hex digits (upper-cased here, so string
    order is numeric order). Raises LocalProtocolError otherwise."""
    if len(sequence_number) != 64 or not _is_hex(sequence_number):
        raise LocalProtocolError(f"sequenceNumber must be 64 hex digits: {sequence_number!r}")
    return _notification(
        source="deviceConnectionStateEvents",
        schema="deviceConnectionStateNotification",
        op_type="deviceConnected" if connected else "deviceDisconnected",
        hub_name=hub_name,
        device_id=device_id,
        module_id=module_id,
        correlation_id=correlation_id,
        now=now,
        body=b'{"sequenceNumber":"' + sequence_number.upper().encode("ascii") + b'"}',
    )


_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")


def _is_hex(text: str) -> bool:
    return all(c in _HEX_DIGITS for c in text)


def lifecycle_event(
    *,
    hub_name: str,
    device_id: str,
    module_id: str | None = None,
    created: bool,
    twin: Mapping[str, object],
    correlation_id: str,
    now: float,
) -> Event:
    """A ``deviceLifecycleEvents`` message (ref §10.5): opType ``createDeviceIdentity`` or
    ``deleteDeviceIdentity``; the body is the twin the caller gives (deviceId, moduleId,
    etag, version, tags, properties with ``$metadata``/``$version``)."""
    return _notification(
        source="deviceLifecycleEvents",
        schema="deviceLifecycleNotification",
        op_type="createDeviceIdentity" if created else "deleteDeviceIdentity",
        hub_name=hub_name,
        device_id=device_id,
        module_id=module_id,
        correlation_id=correlation_id,
        now=now,
        body=_json_body(twin),
    )


def twin_change_event(
    *,
    hub_name: str,
    device_id: str,
    module_id: str | None = None,
    replaced: bool,
    body: Mapping[str, object],
    correlation_id: str,
    now: float,
) -> Event:
    """A ``twinChangeEvents`` message (ref §10.5): opType ``updateTwin`` (body: version and
    the changed tags/properties with ``$metadata``) or ``replaceTwin`` (body: the full twin)."""
    return _notification(
        source="twinChangeEvents",
        schema="twinChangeNotification",
        op_type="replaceTwin" if replaced else "updateTwin",
        hub_name=hub_name,
        device_id=device_id,
        module_id=module_id,
        correlation_id=correlation_id,
        now=now,
        body=_json_body(body),
    )
