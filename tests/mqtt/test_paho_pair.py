"""The session machine against a real third-party client: paho-mqtt over loopback TCP.

paho encodes what our decoder reads (CONNECT with will and credentials, SUBSCRIBE, QoS 0/1
PUBLISH, PUBACK, DISCONNECT) and decodes what our encoder writes (CONNACK, SUBACK, PUBACK,
PUBLISH). The server side is a plain socket loop around ServerSession.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from gateway.mqtt.session import (
    ConnectReceived,
    Event,
    PubackReceived,
    PublishReceived,
    ServerSession,
    SessionState,
    SubscribeReceived,
)


class LoopbackServer:
    """Serves one connection with a ServerSession; records every event."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.events: list[Event] = []
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self.listener.accept()
            with conn:
                conn.settimeout(10)
                session = ServerSession(max_packet_size=1 << 16, now=time.monotonic())
                while True:
                    data = conn.recv(65536)
                    if not data:
                        return
                    for event in session.receive(data, time.monotonic()):
                        self.events.append(event)
                        self._handle(session, event)
                    conn.sendall(session.data_to_send())
                    if session.state is SessionState.CLOSED:
                        return
        except Exception as exc:  # noqa: BLE001 - the test asserts there were none
            self.errors.append(exc)

    @staticmethod
    def _handle(session: ServerSession, event: Event) -> None:
        if isinstance(event, ConnectReceived):
            session.accept(session_present=False)
        elif isinstance(event, SubscribeReceived):
            session.suback(event.packet.packet_id, [min(q, 1) for _, q in event.packet.topics])
            session.publish("to/device/1", b"hello device", 1)
        elif isinstance(event, PublishReceived) and event.packet.qos == 1:
            assert event.packet.packet_id is not None
            session.ack(event.packet.packet_id)

    def close(self) -> None:
        self.listener.close()
        self.thread.join(10)


@pytest.fixture
def server() -> Iterator[LoopbackServer]:
    srv = LoopbackServer()
    yield srv
    srv.close()


def wait_for(condition: threading.Event, what: str) -> None:
    assert condition.wait(10), f"timed out waiting for {what}"


def test_paho_client_talks_to_the_session(server: LoopbackServer) -> None:
    client = paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id="dev1",
        protocol=paho.MQTTv311,
        clean_session=False,
    )
    client.username_pw_set("hub/dev1/?api-version=2021-04-12", "SharedAccessSignature sr=x")
    client.will_set("devices/dev1/messages/events/", b"gone", qos=1)
    connected, subscribed, published, received = (threading.Event() for _ in range(4))
    messages: list[paho.MQTTMessage] = []
    granted: list[int] = []

    def on_connect(c: paho.Client, u: object, flags: object, reason: object, p: object) -> None:
        connected.set()

    def on_subscribe(
        c: paho.Client, u: object, mid: int, codes: list[ReasonCode], p: Properties
    ) -> None:
        granted.extend(code.value for code in codes)
        subscribed.set()

    def on_publish(c: paho.Client, u: object, mid: int, reason: object, p: object) -> None:
        published.set()

    def on_message(c: paho.Client, u: object, message: paho.MQTTMessage) -> None:
        messages.append(message)
        received.set()

    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_publish = on_publish
    client.on_message = on_message
    client.connect("127.0.0.1", server.port, keepalive=30)
    client.loop_start()
    try:
        wait_for(connected, "CONNACK")
        client.subscribe(
            [("devices/dev1/messages/devicebound/#", 1), ("$iothub/methods/POST/#", 2)]
        )
        wait_for(subscribed, "SUBACK")
        wait_for(received, "PUBLISH from the server")
        client.publish("devices/dev1/messages/events/a=b", b"x" * 300, qos=1)
        wait_for(published, "PUBACK")
        client.publish("devices/dev1/messages/events/", b"qos0", qos=0)
        client.disconnect()
    finally:
        client.loop_stop()
    server.thread.join(10)
    assert server.errors == []
    assert granted == [1, 1]
    assert [(m.topic, m.payload, m.qos) for m in messages] == [("to/device/1", b"hello device", 1)]
    kinds = [type(event).__name__ for event in server.events]
    assert kinds[:2] == ["ConnectReceived", "SubscribeReceived"]
    assert kinds[-1] == "DisconnectReceived"
    # paho may send its PUBACK for our PUBLISH before or after its own first PUBLISH
    assert sorted(kinds[2:-1]) == ["PubackReceived", "PublishReceived", "PublishReceived"]
    assert PubackReceived(1) in server.events
    publishes = [e.packet for e in server.events if isinstance(e, PublishReceived)]
    assert [(p.topic, p.payload, p.qos) for p in publishes] == [
        ("devices/dev1/messages/events/a=b", b"x" * 300, 1),
        ("devices/dev1/messages/events/", b"qos0", 0),
    ]
    connect = server.events[0]
    assert isinstance(connect, ConnectReceived)
    assert connect.packet.client_id == "dev1" and not connect.packet.clean_session
    assert connect.packet.keepalive == 30
    assert connect.packet.username == "hub/dev1/?api-version=2021-04-12"
    assert connect.packet.password == b"SharedAccessSignature sr=x"
    assert connect.packet.will is not None and connect.packet.will.payload == b"gone"
