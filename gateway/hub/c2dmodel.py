"""Cloud-to-device messages as values (IoT Hub ref §3): the message and feedback records, the
``iothub-ack`` and feedback status vocabularies, and the C2D errors. Pure; the durable queues
that hold them are :mod:`gateway.hub.c2d`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from gateway.errors import InvalidRequestError, MessageTooLargeError, NotFoundError
from gateway.hub.addresses import c2d_topic
from gateway.hub.messages import SYSTEM_TO_WIRE
from gateway.hub.propbag import encode_bag

class QueueFullError(InvalidRequestError):
    """The device queue already holds ``max_pending`` messages (ref §3.2: 403002)."""

    status = 403
    code = "DeviceMaximumQueueDepthExceeded"


class C2DMessageTooLargeError(MessageTooLargeError):
    """A C2D message is over 64 KB (IoT Hub answers 413, error ``MessageTooLarge``)."""

    status = 413
    code = "MessageTooLarge"


class LockLostError(NotFoundError):
    """The lock token is unknown: never issued, already settled, or replaced by a later
    delivery. IoT Hub's device HTTP API answers 412 ``DeviceMessageLockLost``."""

    status = 412
    code = "DeviceMessageLockLost"


class Ack(StrEnum):
    """``iothub-ack``: which outcomes produce feedback (ref §3.3)."""

    NONE = "none"
    POSITIVE = "positive"
    NEGATIVE = "negative"
    FULL = "full"


class FeedbackStatus(StrEnum):
    """``statusCode`` of a feedback record (ref §3.3)."""

    SUCCESS = "Success"
    EXPIRED = "Expired"
    DELIVERY_COUNT_EXCEEDED = "DeliveryCountExceeded"
    REJECTED = "Rejected"
    PURGED = "Purged"


# Only "Success" -> "Success" is documented (ref §3.3); the other texts are ours.
DESCRIPTION: Final[Mapping[str, str]] = {
    FeedbackStatus.SUCCESS: "Success",
    FeedbackStatus.EXPIRED: "Message expired",
    FeedbackStatus.DELIVERY_COUNT_EXCEEDED: "Delivery count exceeded",
    FeedbackStatus.REJECTED: "Message rejected",
    FeedbackStatus.PURGED: "Message purged",
}

# Bag order of the system properties written to the device (ref §3.1); iothub-ack follows.
BAG_ORDER: Final = (
    "message-id",
    "to",
    "correlation-id",
    "user-id",
    "content-type",
    "content-encoding",
    "absolute-expiry-time",
)

# Service-side property names (ref §9.4) -> system property names (gateway.hub.messages).
SERVICE_SYSTEM: Final[Mapping[str, str]] = {
    "messageId": "message-id",
    "correlationId": "correlation-id",
    "userId": "user-id",
    "contentType": "content-type",
    "contentEncoding": "content-encoding",
}
ACK_KEYS: Final = ("ack", "iothub-ack")
ACK_VALUES: Final = frozenset(ack.value for ack in Ack)
MAX_MESSAGE_ID: Final = 128


def devicebound_address(device_id: str) -> str:
    return f"/devices/{device_id}/messages/devicebound"


@dataclass(frozen=True, slots=True)
class C2DMessage:
    """One queued cloud-to-device message (ref §3.1, §3.2).

    ``system`` uses the names of :mod:`gateway.hub.messages` (``message-id``, ``to``,
    ``correlation-id``, ``user-id``, ``content-type``, ``content-encoding``, and
    ``absolute-expiry-time`` only when the sender set an expiry). Times are clock seconds.
    ``lock_token``/``locked_until`` are those of the latest delivery (None before the
    first). Treat the mappings as read-only."""

    message_id: str
    device_id: str
    body: bytes
    system: Mapping[str, str]
    application: Mapping[str, str | None]
    enqueued: float
    expiry: float
    delivery_count: int
    ack: str
    lock_token: str | None
    locked_until: float | None

    def topic_bag(self) -> str:
        """The property bag the SDKs parse (ref §3.1): ``%24.mid``, ``%24.to``, ``%24.cid``,
        ``%24.uid``, ``%24.ct``, ``%24.ce``, ``%24.exp``, ``iothub-ack``, then application
        properties, all percent-encoded (so the bag is one topic level)."""
        pairs: list[tuple[str, str | None]] = [
            (SYSTEM_TO_WIRE[name], self.system[name]) for name in BAG_ORDER if name in self.system
        ]
        pairs.append(("iothub-ack", self.ack))
        pairs.extend(self.application.items())
        return encode_bag(pairs)

    def topic(self) -> str:
        """``devices/{id}/messages/devicebound/{bag}`` (ref §3.1)."""
        return c2d_topic(self.device_id, self.topic_bag())


@dataclass(frozen=True, slots=True)
class Feedback:
    """One feedback record (ref §3.3); :meth:`to_json` gives the wire shape."""

    original_message_id: str
    device_id: str
    device_generation_id: str
    status_code: str
    description: str
    enqueued_time_utc: str

    def to_json(self) -> dict[str, str]:
        return {
            "originalMessageId": self.original_message_id,
            "enqueuedTimeUtc": self.enqueued_time_utc,
            "statusCode": self.status_code,
            "description": self.description,
            "deviceId": self.device_id,
            "deviceGenerationId": self.device_generation_id,
        }

