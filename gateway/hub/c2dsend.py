"""What a C2D send means (IoT Hub ref §3.2, §9.4): the service's properties checked and turned
into the message's system and application properties, its ``iothub-ack`` and its expiry. Pure."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from gateway.errors import InvalidRequestError
from gateway.hub.c2dmodel import (
    ACK_KEYS,
    ACK_VALUES,
    MAX_MESSAGE_ID,
    SERVICE_SYSTEM,
    Ack,
    C2DMessageTooLargeError,
    devicebound_address,
)
from gateway.hub.messages import format_time, message_size

def _parse_expiry(text: str) -> float:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidRequestError(f"expiryTimeUtc is not an ISO 8601 time: {text!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


@dataclass(frozen=True, slots=True)
class ParsedSend:
    message_id: str
    system: dict[str, str]
    application: dict[str, str | None]
    ack: str
    expiry: float


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def parse_send(
    device_id: str,
    body: bytes,
    properties: Mapping[str, object],
    *,
    now: float,
    default_ttl: float,
    max_ttl: float,
    max_bytes: int,
) -> ParsedSend:
    """Validate a send as the service gives it (ref §3.2, §9.4); pure."""
    sent: dict[str, str] = {}  # every system value the sender gave, by its name here
    application: dict[str, str | None] = {}
    for key, value in properties.items():
        if not isinstance(key, str) or not key:
            raise InvalidRequestError(f"property names must be non-empty strings: {key!r}")
        if not _utf8(key) or (isinstance(value, str) and not _utf8(value)):
            # JSON may carry lone surrogates ("\ud800"); no topic or UTF-8 string can
            raise InvalidRequestError(f"property {key!r} is not valid Unicode text")
        if key in SERVICE_SYSTEM or key in ACK_KEYS or key == "expiryTimeUtc":
            if value is None:
                continue
            if not isinstance(value, str):
                raise InvalidRequestError(f"{key} must be a string, not {type(value).__name__}")
            if key in ACK_KEYS and value not in ACK_VALUES:
                raise InvalidRequestError(
                    f"{key} must be one of none, positive, negative, full: {value!r}"
                )
            sent[SERVICE_SYSTEM.get(key, key)] = value
        elif key == "to":
            continue  # the hub sets it (ref §3.1)
        elif key.startswith("$."):
            raise InvalidRequestError(f"application property {key!r} would read as a system key")
        elif value is not None and not isinstance(value, str):
            raise InvalidRequestError(
                f"application property {key!r} must be a string, not {type(value).__name__}"
            )
        else:
            application[key] = value
    size = message_size(body, sent, application)
    if size > max_bytes:
        raise C2DMessageTooLargeError(
            f"C2D message for {device_id!r} is {size} bytes, over the limit of {max_bytes}"
        )
    wire_ack, plain_ack = sent.pop("iothub-ack", None), sent.pop("ack", None)
    ack: str = wire_ack or plain_ack or Ack.NONE
    expiry_text = sent.pop("expiryTimeUtc", None)
    message_id = sent.pop("message-id", None) or str(uuid.uuid4())
    if len(message_id) > MAX_MESSAGE_ID or not message_id.isascii():
        raise InvalidRequestError(f"messageId must be at most {MAX_MESSAGE_ID} ASCII characters")
    system = {"message-id": message_id, "to": devicebound_address(device_id), **sent}
    if expiry_text is None:
        expiry = now + default_ttl
    else:
        expiry = _parse_expiry(expiry_text)
        if expiry <= now:
            raise InvalidRequestError(f"expiryTimeUtc {expiry_text!r} is in the past")
        if expiry - now > max_ttl:
            raise InvalidRequestError(
                f"expiryTimeUtc {expiry_text!r} is more than {max_ttl:g} s away"
            )
        system["absolute-expiry-time"] = format_time(expiry)
    return ParsedSend(message_id, system, application, ack, expiry)

