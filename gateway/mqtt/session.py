"""The server side of one MQTT 3.1.1 connection as a pure state machine (like h11's Connection).

The shell feeds received bytes to :meth:`ServerSession.receive` and gets events back; it calls
:meth:`~ServerSession.accept`, :meth:`~ServerSession.ack`, :meth:`~ServerSession.publish` and
friends, then writes :meth:`~ServerSession.data_to_send` to the socket. Time comes in as
``now`` (any monotonic clock, in seconds); :meth:`~ServerSession.deadline` says when to give up.

States (:class:`SessionState`)::

    AWAIT_CONNECT --CONNECT--> CONNECTED --DISCONNECT, error, refuse(), close()--> CLOSED
          `--------------- error, unsupported CONNECT, close() ---------------------^

Events that follow a :class:`ConnectReceived` in the same list were pipelined by the client
(MQTT 3.1.1 §3.1.4): handle them only after :meth:`~ServerSession.accept`; after
:meth:`~ServerSession.refuse` drop them (§3.1.4, MQTT-3.1.4-5).

When :meth:`~ServerSession.receive` raises :class:`RemoteProtocolError` the state is CLOSED and
the events of that call are lost; :meth:`~ServerSession.data_to_send` may still hold a final
CONNACK refusal (unsupported protocol level, rejected client identifier), so flush it before
closing the socket. This module only queues bytes: it never decides to publish a will.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import NoReturn, TypeAlias

from gateway.errors import LocalProtocolError, RemoteProtocolError
from gateway.mqtt.codec import (
    Decoder,
    encode,
    encode_puback,
    encode_pubacks,
    encode_publish,
)
from gateway.mqtt.packets import (
    SUBACK_FAILURE,
    Connack,
    ConnackCode,
    Connect,
    Disconnect,
    Packet,
    Pingreq,
    Puback,
    Pubcomp,
    Publish,
    Pubrec,
    Pubrel,
    Suback,
    Subscribe,
    Unsuback,
    Unsubscribe,
)

__all__ = [
    "ConnectReceived",
    "DisconnectReceived",
    "Event",
    "PubackReceived",
    "PublishReceived",
    "ServerSession",
    "SessionState",
    "SubscribeReceived",
    "UnsubscribeReceived",
]


class SessionState(Enum):
    """Where a connection is in its life (MQTT 3.1.1 §3.1, §3.14)."""

    AWAIT_CONNECT = "await_connect"
    CONNECTED = "connected"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class ConnectReceived:
    """The client's CONNECT; answer with accept() or refuse() (MQTT 3.1.1 §3.1)."""

    packet: Connect


@dataclass(frozen=True, slots=True)
class PublishReceived:
    """A QoS 0 or 1 PUBLISH from the client; ack() QoS 1 once it is durable (§3.3, §4.3.2)."""

    packet: Publish


@dataclass(frozen=True, slots=True)
class SubscribeReceived:
    """A SUBSCRIBE; answer with suback() (MQTT 3.1.1 §3.8.4)."""

    packet: Subscribe


@dataclass(frozen=True, slots=True)
class UnsubscribeReceived:
    """An UNSUBSCRIBE; answer with unsuback() (MQTT 3.1.1 §3.10.4)."""

    packet: Unsubscribe


@dataclass(frozen=True, slots=True)
class PubackReceived:
    """The client acknowledged our QoS 1 PUBLISH ``packet_id``; the id is free again (§4.3.2)."""

    packet_id: int


@dataclass(frozen=True, slots=True)
class DisconnectReceived:
    """The client said goodbye; discard its will and close (MQTT 3.1.1 §3.14.4)."""


Event: TypeAlias = (
    ConnectReceived
    | PublishReceived
    | SubscribeReceived
    | UnsubscribeReceived
    | PubackReceived
    | DisconnectReceived
)


# Plain slotted twins of the two hot events, given the frozen class after construction: see
# gateway.mqtt._readers.PublishTwin for why (a frozen dataclass costs ~140 ns to build).
@dataclass(slots=True)
class _PublishReceivedTwin:
    packet: Publish


@dataclass(slots=True)
class _PubackReceivedTwin:
    packet_id: int


def _puback_received(packet_id: int) -> PubackReceived:
    event = _PubackReceivedTwin(packet_id)
    event.__class__ = PubackReceived  # type: ignore[assignment]
    return event  # type: ignore[return-value]


_SUPPORTED_PROTOCOLS = {("MQTT", 4), ("MQIsdp", 3)}
_PINGRESP = b"\xd0\x00"
_VALID_SUBACK_CODES = frozenset({0, 1, 2, SUBACK_FAILURE})
_CLOSED = SessionState.CLOSED
_CONNECTED = SessionState.CONNECTED


class ServerSession:
    """One client connection, seen from the server (MQTT 3.1.1 §3, §4)."""

    __slots__ = (
        "_answered",
        "_connect_timeout",
        "_decoder",
        "_deferred_pingresps",
        "_disconnected",
        "_inflight",
        "_last_received",
        "_max_inflight",
        "_next_packet_id",
        "_outbox",
        "_protocol_level",
        "_started",
        "keepalive",
        "state",
    )

    def __init__(
        self,
        *,
        max_packet_size: int,
        max_inflight: int = 100,
        connect_timeout: float = 60.0,
        now: float,
    ) -> None:
        if not 1 <= max_inflight <= 0xFFFF:
            raise ValueError(f"max_inflight must be in 1..65535, not {max_inflight}")
        self.state = SessionState.AWAIT_CONNECT
        self.keepalive = 0
        """Keep Alive from CONNECT in seconds, 0 = none (MQTT 3.1.1 §3.1.2.10)."""
        self._decoder = Decoder(max_packet_size)
        self._max_inflight = max_inflight
        self._connect_timeout = connect_timeout
        self._started = now
        self._last_received = now
        self._outbox: list[bytes] = []
        self._deferred_pingresps = 0  # PINGREQs answered once the CONNACK is queued
        self._answered = False  # CONNACK queued
        self._disconnected = False  # DISCONNECT received (perhaps before the CONNACK)
        self._protocol_level = 4
        self._inflight: dict[int, bytes] = {}  # our QoS 1 PUBLISH packets awaiting PUBACK
        self._next_packet_id = 1

    # -- inbound ------------------------------------------------------------------------------

    def receive(self, data: bytes | bytearray | memoryview, now: float) -> list[Event]:
        """Decode ``data`` and return the events it completes, in order.

        Answers PINGREQ itself (§3.12.4). Raises :class:`RemoteProtocolError`, leaving the
        state CLOSED, for malformed bytes, a first packet that is not CONNECT (§3.1.0), a second
        CONNECT (§3.1.0), QoS 2 (PUBLISH QoS 2, PUBREC, PUBREL, PUBCOMP: not supported), and
        packets only a server sends. After CLOSED, data is ignored.
        """
        if self.state is _CLOSED:
            return []
        try:
            packets = self._decoder.feed(data)
        except RemoteProtocolError:
            self.state = _CLOSED
            raise
        if not packets:
            return []
        self._last_received = now  # any control packet resets the keep alive (§3.1.2.10)
        events: list[Event] = []
        if self.state is SessionState.AWAIT_CONNECT:
            events.append(self._on_first_packet(packets[0]))
            packets = packets[1:]
        append = events.append
        inflight = self._inflight
        publish_twin = _PublishReceivedTwin  # built inline: a call costs ~35 ns
        publish_event = PublishReceived
        for packet in packets:
            if isinstance(packet, Publish):
                if packet.qos == 2:
                    self._fail("QoS 2 not supported: client sent a QoS 2 PUBLISH")
                event = publish_twin(packet)
                event.__class__ = publish_event  # type: ignore[assignment]
                append(event)  # type: ignore[arg-type]
            elif isinstance(packet, Puback):
                packet_id = packet.packet_id
                if inflight.pop(packet_id, None) is not None:
                    append(_puback_received(packet_id))
            else:
                answer = _HANDLERS.get(type(packet), ServerSession._on_forbidden)(self, packet)
                if answer is not None:
                    append(answer)
                if self.state is _CLOSED:
                    break  # DISCONNECT: anything after it is ignored (§3.14.4)
        return events

    def _fail(self, reason: str) -> NoReturn:
        self.state = _CLOSED
        raise RemoteProtocolError(reason)

    def _refuse_and_fail(self, code: ConnackCode, reason: str) -> NoReturn:
        self._outbox.append(encode(Connack(False, code)))
        self._fail(f"{reason}; refused with CONNACK {code:#04x}")

    def _on_first_packet(self, packet: Packet) -> Event:
        """The first packet must be CONNECT (MQTT 3.1.1 §3.1.0)."""
        if not isinstance(packet, Connect):
            name = type(packet).__name__.upper()
            self._fail(f"first packet is {name}, not CONNECT (MQTT 3.1.1 §3.1.0)")
        if (packet.protocol_name, packet.protocol_level) not in _SUPPORTED_PROTOCOLS:
            self._refuse_and_fail(
                ConnackCode.UNACCEPTABLE_PROTOCOL,
                f"unsupported protocol level {packet.protocol_level} (MQTT 3.1.1 §3.1.2.2)",
            )
        if not packet.client_id and (packet.protocol_level == 3 or not packet.clean_session):
            self._refuse_and_fail(
                ConnackCode.IDENTIFIER_REJECTED,
                "empty client identifier without clean session (MQTT 3.1.1 §3.1.3.1)",
            )
        self.state = _CONNECTED
        self.keepalive = packet.keepalive
        self._protocol_level = packet.protocol_level
        return ConnectReceived(packet)

    def _on_connect(self, packet: Packet) -> Event | None:
        self._fail("second CONNECT (MQTT 3.1.1 §3.1.0)")

    def _on_subscribe(self, packet: Packet) -> Event | None:
        assert isinstance(packet, Subscribe)
        return SubscribeReceived(packet)

    def _on_unsubscribe(self, packet: Packet) -> Event | None:
        assert isinstance(packet, Unsubscribe)
        return UnsubscribeReceived(packet)

    def _on_pingreq(self, packet: Packet) -> Event | None:
        if self._answered:
            self._outbox.append(_PINGRESP)
        else:  # the first packet a server sends is CONNACK (MQTT 3.1.1 §3.2)
            self._deferred_pingresps += 1
        return None

    def _on_disconnect(self, packet: Packet) -> Event | None:
        self.state = _CLOSED
        self._disconnected = True
        return DisconnectReceived()

    def _on_qos2(self, packet: Packet) -> Event | None:
        self._fail(f"QoS 2 not supported: client sent {type(packet).__name__.upper()}")

    def _on_forbidden(self, packet: Packet) -> Event | None:
        self._fail(f"client sent {type(packet).__name__.upper()}, which only a server sends")

    # -- outbound -----------------------------------------------------------------------------

    def _require_accepted(self, action: str) -> bool:
        """True if answers may be queued; False (drop them) once CLOSED; raise before accept."""
        if self.state is _CLOSED:
            return False
        if not self._answered:
            raise LocalProtocolError(
                f"cannot {action} in state {self.state.name} before accept(): the first packet"
                " a server sends is CONNACK (MQTT 3.1.1 §3.2)"
            )
        return True

    def _require_unanswered_connect(self, action: str) -> None:
        # CONNECT, PUBLISH, DISCONNECT may arrive in one read, before the CONNACK (MQTT 3.1.1
        # §3.1.4): the CONNECT is still answered, though the session is CLOSED by then.
        if self.state is _CLOSED and self._disconnected and not self._answered:
            return
        if self.state is not _CONNECTED or self._answered:
            raise LocalProtocolError(
                f"cannot {action} in state {self.state.name}"
                f"{' after CONNACK' if self._answered else ''}: needs an unanswered CONNECT"
            )

    def accept(self, session_present: bool) -> None:
        """Queue CONNACK 0 (MQTT 3.1.1 §3.2.2), then a PINGRESP per PINGREQ that came before.

        Session present is always 0 for MQTT 3.1 clients, whose CONNACK has no such flag.
        """
        self._require_unanswered_connect("accept")
        self._answered = True
        present = session_present and self._protocol_level == 4
        self._outbox.append(encode(Connack(present, ConnackCode.ACCEPTED)))
        if self._deferred_pingresps:
            self._outbox.append(_PINGRESP * self._deferred_pingresps)
            self._deferred_pingresps = 0

    def refuse(self, code: ConnackCode) -> None:
        """Queue a refusing CONNACK and close (MQTT 3.1.1 §3.2.2.3, MQTT-3.2.2-5)."""
        self._require_unanswered_connect("refuse")
        if not 1 <= code <= 5:
            raise LocalProtocolError(f"refuse() needs a refusing CONNACK code 1..5, not {code}")
        self._answered = True
        self._deferred_pingresps = 0
        self._outbox.append(encode(Connack(False, code)))
        self.state = _CLOSED

    def ack(self, packet_id: int) -> None:
        """Queue PUBACK for an inbound QoS 1 PUBLISH (MQTT 3.1.1 §3.4). Dropped once CLOSED."""
        if self._require_accepted("ack"):
            self._outbox.append(encode_puback(packet_id))

    def ack_many(self, packet_ids: Iterable[int]) -> None:
        """Queue PUBACKs for several inbound QoS 1 PUBLISH packets, in order, as one write."""
        if self._require_accepted("ack"):
            acks = encode_pubacks(packet_ids)
            if acks:
                self._outbox.append(acks)

    def suback(self, packet_id: int, codes: Sequence[int]) -> None:
        """Queue SUBACK: one granted QoS (0-2) or 0x80 per requested filter (§3.9)."""
        if self._require_accepted("suback"):
            self._outbox.append(encode(Suback(packet_id, tuple(codes))))

    def unsuback(self, packet_id: int) -> None:
        """Queue UNSUBACK (MQTT 3.1.1 §3.11)."""
        if self._require_accepted("unsuback"):
            self._outbox.append(encode(Unsuback(packet_id)))

    def publish(self, topic: str, payload: bytes, qos: int, retain: bool = False) -> int | None:
        """Queue a PUBLISH to the client (MQTT 3.1.1 §3.3, §4.3).

        QoS 0 returns None. QoS 1 takes the next free packet id (1..65535, wrapping, skipping
        ids in flight, §2.3.1), keeps the packet in flight until its PUBACK and returns the id.
        Raises :class:`LocalProtocolError` for QoS 2, when ``inflight_full``, or unless the
        session is accepted and open.
        """
        if self.state is not _CONNECTED or not self._answered:
            raise LocalProtocolError(
                f"cannot publish in state {self.state.name} before accept()"
                if self.state is not _CLOSED
                else "cannot publish: CLOSED"
            )
        if qos == 0:
            self._outbox.append(encode_publish(topic, payload, 0, None, retain))
            return None
        if qos != 1:
            raise LocalProtocolError(f"cannot publish at QoS {qos}: this server speaks QoS 0 and 1")
        inflight = self._inflight
        if len(inflight) >= self._max_inflight:
            raise LocalProtocolError(
                f"{len(inflight)} PUBLISH packets in flight already (max_inflight)"
            )
        packet_id = self._next_packet_id
        while packet_id in inflight:
            packet_id = packet_id % 0xFFFF + 1
        raw = encode_publish(topic, payload, 1, packet_id, retain)
        self._next_packet_id = packet_id % 0xFFFF + 1
        inflight[packet_id] = raw
        self._outbox.append(raw)
        return packet_id

    @property
    def inflight(self) -> int:
        """How many of our QoS 1 PUBLISH packets await their PUBACK."""
        return len(self._inflight)

    @property
    def inflight_full(self) -> bool:
        """True when publish() at QoS 1 would raise: ``max_inflight`` ids are in flight."""
        return len(self._inflight) >= self._max_inflight

    def resend_inflight(self) -> None:
        """Queue every in-flight PUBLISH again, oldest first, with DUP set (MQTT 3.1.1 §3.3.1.1)."""
        if not self._require_accepted("resend"):
            return
        for packet_id, raw in self._inflight.items():
            raw = bytes((raw[0] | 0x08,)) + raw[1:]
            self._inflight[packet_id] = raw
            self._outbox.append(raw)

    def data_to_send(self) -> bytes:
        """Everything queued since the last call (also after CLOSED), then forget it."""
        if not self._outbox:
            return b""
        data = b"".join(self._outbox)
        self._outbox.clear()
        return data

    # -- time and teardown --------------------------------------------------------------------

    def deadline(self) -> float | None:
        """When to close the connection for silence, on the clock of ``now``; None = never.

        Before CONNECT: start + ``connect_timeout``. After: the last complete packet received
        + 1.5 x Keep Alive, or None if Keep Alive is 0 (MQTT 3.1.1 §3.1.2.10). CLOSED: None.
        """
        if self.state is SessionState.AWAIT_CONNECT:
            return self._started + self._connect_timeout
        if self.state is _CLOSED or not self.keepalive:
            return None
        return self._last_received + 1.5 * self.keepalive

    def close(self) -> None:
        """Stop: later data is ignored and later answers are dropped (queued bytes stay)."""
        self.state = _CLOSED


_Handler = Callable[[ServerSession, Packet], Event | None]
_HANDLERS: dict[type, _Handler] = {
    Connect: ServerSession._on_connect,
    Subscribe: ServerSession._on_subscribe,
    Unsubscribe: ServerSession._on_unsubscribe,
    Pingreq: ServerSession._on_pingreq,
    Disconnect: ServerSession._on_disconnect,
    **{kind: ServerSession._on_qos2 for kind in (Pubrec, Pubrel, Pubcomp)},
}
"""What to do with each packet type a client may send, other than PUBLISH and PUBACK."""
