"""Messages between the hub's shapes and AMQP 1.0 messages. Pure (Proton's codec only).

* An event read from the built-in endpoint becomes the AMQP message IoT Hub's Event
  Hubs-compatible endpoint delivers (IoT Hub ref §2.5, §10.1): the body as one data section;
  ``message-id``, ``correlation-id``, ``user-id``, ``to``, ``content-type``,
  ``content-encoding``, ``absolute-expiry-time``, ``creation-time`` as AMQP properties; every
  other system property (``iothub-connection-device-id``, ``iothub-connection-auth-method``,
  ``iothub-message-source``...) as a message annotation, ``iothub-enqueuedtime`` as a
  timestamp; plus Event Hubs' own ``x-opt-sequence-number`` (long), ``x-opt-offset``
  (string) and ``x-opt-enqueued-time`` (timestamp); application properties as sent.
* A message on ``/messages/devicebound`` becomes the property map the C2D service takes from
  REST as well (ref §9.4): ``messageId``, ``correlationId``, ``userId``, ``contentType``,
  ``contentEncoding``, ``expiryTimeUtc``; application properties (``iothub-ack``...) as they are.
* A feedback batch becomes one message whose body is the JSON array (ref §3.3).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Final, cast

from proton import Message, symbol, timestamp

from gateway.errors import InvalidRequestError
from gateway.hub.c2d import Feedback
from gateway.hub.messages import Message as HubMessage

__all__ = ["FEEDBACK_CONTENT_TYPE", "PROPERTY_FIELDS", "c2d_properties", "event_message",
           "feedback_message", "property_value", "time_ms"]

FEEDBACK_CONTENT_TYPE: Final = "application/vnd.microsoft.iothub.feedback.json"

PROPERTY_FIELDS: Final[Mapping[str, int]] = {
    "message-id": 0, "user-id": 1, "to": 2, "correlation-id": 5, "content-type": 6,
    "content-encoding": 7, "absolute-expiry-time": 8, "creation-time": 9,
}
"""System properties carried as AMQP properties -> their place in the properties list
(part 3 §3.2.4); every other system property is a message annotation."""


def time_ms(text: str) -> int | None:
    """An ISO 8601 time (the hub's seven fractional digits too) -> epoch ms; None if not one."""
    try:
        moment = datetime.fromisoformat(_trim_fraction(text))
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


def _trim_fraction(text: str) -> str:
    """``...T10:00:00.1234567Z`` -> ``...T10:00:00.123456+00:00`` (fromisoformat takes 6)."""
    text = text.strip()
    if text.endswith("Z"):
        text = text[:-1] + "+00:00"
    head, dot, rest = text.partition(".")
    if not dot:
        return text
    digits = ""
    while rest and rest[0].isdigit():
        digits, rest = digits + rest[0], rest[1:]
    return f"{head}.{(digits + '000000')[:6]}{rest}"


def property_value(name: str, value: str) -> tuple[str, object]:
    """(AMQP type, value) of a system property carried in the properties section:
    ``string``, ``symbol``, ``binary`` (user-id) or ``timestamp`` (epoch ms, None if the
    stored time does not parse)."""
    if name == "user-id":
        return "binary", value.encode("utf-8")
    if name in ("content-type", "content-encoding"):
        return "symbol", value
    if name in ("absolute-expiry-time", "creation-time"):
        return "timestamp", time_ms(value)
    return "string", value


def event_message(message: HubMessage, *, seq: int, enqueued_ms: int) -> Message:
    """The AMQP message for one built-in endpoint entry (``message`` as
    :func:`gateway.api.events.entry_message` gives it), as a Proton message; the read path
    writes the same bytes faster with :func:`gateway.amqp.wire.encode_event`."""
    out = Message(body=bytes(message.body), inferred=True)
    annotations: dict[Any, Any] = {}
    for name, value in message.system.items():
        if name in PROPERTY_FIELDS:
            kind, converted = property_value(name, value)
            if converted is None:
                continue
            if kind == "timestamp":
                setattr(out, "creation_time" if name == "creation-time" else "expiry_time",
                        int(converted) / 1000)  # type: ignore[call-overload]
            elif kind == "symbol":
                setattr(out, name.replace("-", "_"), symbol(str(converted)))
            else:
                attribute = {"message-id": "id", "to": "address"}.get(name, name.replace("-", "_"))
                setattr(out, attribute, converted)
        else:
            annotations[symbol(name)] = value
    # the entry's enqueued time, as the REST stream and monitor-events show it
    annotations[symbol("iothub-enqueuedtime")] = timestamp(enqueued_ms)
    annotations[symbol("x-opt-sequence-number")] = seq
    annotations[symbol("x-opt-offset")] = str(seq)
    annotations[symbol("x-opt-enqueued-time")] = timestamp(enqueued_ms)
    out.annotations = annotations
    if message.application:
        out.properties = cast(Any, dict(message.application))
    return out


def _text(value: Any, what: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bytes | bytearray | memoryview):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidRequestError(f"{what} is not UTF-8") from None
    if isinstance(value, uuid.UUID | int | float | bool):
        return str(value).lower() if isinstance(value, bool) else str(value)
    raise InvalidRequestError(f"{what} has an unsupported type {type(value).__name__}")


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat().replace("+00:00", "Z")


def c2d_properties(message: Message) -> tuple[str, bytes, dict[str, str | None]]:
    """(device id, body, the C2D service's property map) of a ``/messages/devicebound``
    message; :class:`InvalidRequestError` when it cannot be one."""
    from gateway.amqp.addresses import device_of_to

    device_id = device_of_to(message.address)
    body = message.body
    if body is None:
        data = b""
    elif isinstance(body, bytes | bytearray | memoryview):
        data = bytes(body)
    elif isinstance(body, str):
        data = body.encode("utf-8")
    else:
        raise InvalidRequestError("the body must be binary data or a string")
    props: dict[str, str | None] = {}
    if message.id is not None:
        props["messageId"] = _text(message.id, "message-id")
    if message.correlation_id is not None:
        props["correlationId"] = _text(message.correlation_id, "correlation-id")
    if message.user_id:
        props["userId"] = _text(message.user_id, "user-id")
    for name, value in (("contentType", message.content_type),
                        ("contentEncoding", message.content_encoding)):
        # Proton reads an absent symbol property back as the text "None"
        if value is not None and str(value) not in ("", "None"):
            props[name] = str(value)
    if message.expiry_time:
        props["expiryTimeUtc"] = _iso(float(message.expiry_time))
    application: dict[Any, Any] = dict(message.properties or {})
    for key, value in application.items():
        name = _text(key, "an application property name")
        if name in ("messageId", "correlationId", "userId", "contentType", "contentEncoding",
                    "expiryTimeUtc", "to"):
            raise InvalidRequestError(f"application property {name!r} is reserved")
        props[name] = None if value is None else _text(value, f"application property {name!r}")
    return device_id, data, props


def feedback_message(records: Sequence[Feedback], *, host_name: str, lock: str) -> Message:
    """One feedback batch as IoT Hub sends it on ``/messages/servicebound/feedback``."""
    body = json.dumps([record.to_json() for record in records]).encode()
    out = Message(body=body, inferred=True)
    out.id = lock
    out.content_type = symbol(FEEDBACK_CONTENT_TYPE)
    out.content_encoding = symbol("utf-8")
    out.user_id = host_name.split(".", 1)[0].encode()
    return out

