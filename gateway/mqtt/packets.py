"""MQTT 3.1.1 control packets as frozen value types (MQTT 3.1.1 §2, §3).

One frozen, slotted dataclass per packet type. They carry no wire details beyond what a
packet means: the fixed-header flags of PUBLISH live in ``qos``/``retain``/``dup``, string
lengths and the remaining length are the codec's business (:mod:`gateway.mqtt.codec`).

The classes do not validate on construction (construction is on the broker's hot path);
:func:`gateway.mqtt.codec.encode` refuses a packet that would break the protocol with
:class:`~gateway.errors.LocalProtocolError`, and the decoder only ever produces valid ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import TypeAlias

__all__ = [
    "SUBACK_FAILURE",
    "Connack",
    "ConnackCode",
    "Connect",
    "Disconnect",
    "Packet",
    "PacketType",
    "Pingreq",
    "Pingresp",
    "Puback",
    "Pubcomp",
    "Publish",
    "Pubrec",
    "Pubrel",
    "Suback",
    "Subscribe",
    "Unsuback",
    "Unsubscribe",
    "Will",
]


class PacketType(IntEnum):
    """The control packet type in bits 7-4 of the fixed header (MQTT 3.1.1 §2.2.1)."""

    CONNECT = 1
    CONNACK = 2
    PUBLISH = 3
    PUBACK = 4
    PUBREC = 5
    PUBREL = 6
    PUBCOMP = 7
    SUBSCRIBE = 8
    SUBACK = 9
    UNSUBSCRIBE = 10
    UNSUBACK = 11
    PINGREQ = 12
    PINGRESP = 13
    DISCONNECT = 14


class ConnackCode(IntEnum):
    """CONNACK return codes (MQTT 3.1.1 §3.2.2.3, table 3.1). 6-255 are reserved."""

    ACCEPTED = 0
    UNACCEPTABLE_PROTOCOL = 1
    IDENTIFIER_REJECTED = 2
    SERVER_UNAVAILABLE = 3
    BAD_USERNAME_OR_PASSWORD = 4
    NOT_AUTHORIZED = 5


SUBACK_FAILURE = 0x80
"""The SUBACK return code that refuses one subscription (MQTT 3.1.1 §3.9.3)."""


@dataclass(frozen=True, slots=True)
class Will:
    """The Will Message of a CONNECT (MQTT 3.1.1 §3.1.2.5-§3.1.2.7, §3.1.3.2-§3.1.3.3)."""

    topic: str
    payload: bytes
    qos: int
    retain: bool


@dataclass(frozen=True, slots=True)
class Connect:
    """CONNECT, client to server (MQTT 3.1.1 §3.1).

    ``protocol_name``/``protocol_level`` are "MQTT"/4 (3.1.1) or "MQIsdp"/3 (3.1). For any
    other level the decoder fills in only the variable header (name, level, clean session,
    keep alive) and leaves the payload undecoded, because its layout belongs to that other
    version; the server must then answer CONNACK 0x01 (§3.1.2.2).
    """

    client_id: str
    clean_session: bool
    keepalive: int
    username: str | None = None
    password: bytes | None = None
    will: Will | None = None
    protocol_name: str = "MQTT"
    protocol_level: int = 4


@dataclass(frozen=True, slots=True)
class Connack:
    """CONNACK, server to client (MQTT 3.1.1 §3.2). ``return_code`` is a :class:`ConnackCode`."""

    session_present: bool
    return_code: int


@dataclass(frozen=True, slots=True)
class Publish:
    """PUBLISH, both directions (MQTT 3.1.1 §3.3). ``packet_id`` is None exactly when qos is 0."""

    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    dup: bool = False
    packet_id: int | None = None


@dataclass(frozen=True, slots=True)
class Puback:
    """PUBACK, the answer to a QoS 1 PUBLISH (MQTT 3.1.1 §3.4)."""

    packet_id: int


@dataclass(frozen=True, slots=True)
class Pubrec:
    """PUBREC, QoS 2 delivery part 1 (MQTT 3.1.1 §3.5)."""

    packet_id: int


@dataclass(frozen=True, slots=True)
class Pubrel:
    """PUBREL, QoS 2 delivery part 2 (MQTT 3.1.1 §3.6)."""

    packet_id: int


@dataclass(frozen=True, slots=True)
class Pubcomp:
    """PUBCOMP, QoS 2 delivery part 3 (MQTT 3.1.1 §3.7)."""

    packet_id: int


@dataclass(frozen=True, slots=True)
class Subscribe:
    """SUBSCRIBE, client to server (MQTT 3.1.1 §3.8): (topic filter, requested QoS) pairs."""

    packet_id: int
    topics: tuple[tuple[str, int], ...]


@dataclass(frozen=True, slots=True)
class Suback:
    """SUBACK, server to client (MQTT 3.1.1 §3.9): granted QoS 0-2 or 0x80 per filter."""

    packet_id: int
    return_codes: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    """UNSUBSCRIBE, client to server (MQTT 3.1.1 §3.10)."""

    packet_id: int
    topics: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Unsuback:
    """UNSUBACK, server to client (MQTT 3.1.1 §3.11)."""

    packet_id: int


@dataclass(frozen=True, slots=True)
class Pingreq:
    """PINGREQ, client to server (MQTT 3.1.1 §3.12)."""


@dataclass(frozen=True, slots=True)
class Pingresp:
    """PINGRESP, server to client (MQTT 3.1.1 §3.13)."""


@dataclass(frozen=True, slots=True)
class Disconnect:
    """DISCONNECT, client to server (MQTT 3.1.1 §3.14)."""


Packet: TypeAlias = (
    Connect
    | Connack
    | Publish
    | Puback
    | Pubrec
    | Pubrel
    | Pubcomp
    | Subscribe
    | Suback
    | Unsubscribe
    | Unsuback
    | Pingreq
    | Pingresp
    | Disconnect
)
"""Any MQTT 3.1.1 control packet."""
