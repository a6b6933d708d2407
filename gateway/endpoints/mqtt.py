"""The ``mqtt`` endpoint: an external broker, MQTT 3.1.1 through aiomqtt.

One connection per endpoint, clean session (the cursor, not the broker, remembers what is
left). QoS 1: up to ``max_inflight`` PUBLISHes await their PUBACK at once, written in log
order on the one connection (so the broker receives each device's messages in order, MQTT
3.1.1 §4.6), and a message counts as delivered on its PUBACK. QoS 0: delivered once handed
to the socket (at most once if the connection drops). A lost connection is noticed at once
(the client's message stream ends) and the unacknowledged rest is sent again on the next
connection. TLS 1.2+ verifies the broker against ``caFile`` (or the system's CAs); the
password is read from ``passwordFile`` at every connect, so it can be rotated.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import ssl
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import aiomqtt

from gateway.endpoints.envelope import Delivery, body_publish, json_line, render_topic
from gateway.endpoints.runner import Progress, Session
from gateway.endpoints.spec import MAX_TOPIC_BYTES, MqttEndpointSpec
from gateway.errors import EndpointError

__all__ = ["MqttSink"]

_CONNACK = {1: "unacceptable protocol version", 2: "client identifier rejected",
            3: "server unavailable", 4: "bad user name or password", 5: "not authorized"}


def _describe(exc: BaseException) -> str:
    if isinstance(exc, aiomqtt.MqttCodeError) and isinstance(exc.rc, int) and exc.rc in _CONNACK:
        return f"broker refused the connection: {_CONNACK[exc.rc]}"
    text = str(exc) or type(exc).__name__
    cause = exc.__cause__ or exc.__context__
    if cause is not None and str(cause) and str(cause) not in text:
        text = f"{text}: {cause}"
    return text


class MqttSink:
    def __init__(self, spec: MqttEndpointSpec, *, client_id: str,
                 connect_timeout: float = 10.0) -> None:
        self.spec = spec
        self.client_id = client_id
        self.connect_timeout = connect_timeout

    def _tls(self) -> ssl.SSLContext | None:
        if not self.spec.tls:
            return None
        try:
            context = ssl.create_default_context(cafile=self.spec.ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise EndpointError(f"cannot load CA file {self.spec.ca_file}: {exc}") from None
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        return context

    def _password(self) -> str | None:
        if self.spec.password_file is None:
            return None
        try:
            return Path(self.spec.password_file).read_text(encoding="utf-8").rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as exc:
            raise EndpointError(f"cannot read password file {self.spec.password_file}: "
                                f"{exc}") from None

    @contextlib.asynccontextmanager
    async def session(self) -> AsyncIterator[Session]:
        spec = self.spec
        client = aiomqtt.Client(
            spec.host, spec.port, username=spec.username, password=self._password(),
            identifier=self.client_id, clean_session=True, tls_context=self._tls(),
            timeout=self.connect_timeout, max_inflight_messages=spec.max_inflight,
            keepalive=30,
            max_queued_outgoing_messages=0,
        )
        client.pending_calls_threshold = spec.max_inflight + 16  # a full window is normal
        try:
            async with client, asyncio.TaskGroup() as tasks:
                tasks.create_task(_watch(client))
                yield _MqttSession(spec, client, tasks)
        except* (aiomqtt.MqttError, OSError) as group:
            raise EndpointError(f"{spec.url}: {_describe(group.exceptions[0])}") from None


async def _watch(client: aiomqtt.Client) -> None:
    """Ends (raising MqttError) as soon as the connection is lost; nothing is subscribed."""
    async for _message in client.messages:
        pass


class _MqttSession:
    recovered = 0
    reachable = True

    def __init__(self, spec: MqttEndpointSpec, client: aiomqtt.Client,
                 tasks: asyncio.TaskGroup) -> None:
        self.spec = spec
        self.client = client
        self.tasks = tasks

    def idle_timeout(self) -> float | None:
        return None

    async def idle(self) -> None:
        return None

    def _message(self, d: Delivery) -> tuple[str, bytes]:
        if self.spec.envelope == "body":
            return body_publish(self.spec.topic, d)
        return render_topic(self.spec.topic, d), json_line(d)[:-1]

    async def deliver(self, batch: Sequence[Delivery], progress: Progress) -> None:
        client, qos = self.client, self.spec.qos
        window = asyncio.Semaphore(self.spec.max_inflight)
        inflight: list[asyncio.Task[None]] = []
        for index, d in enumerate(batch):
            topic, payload = self._message(d)
            if len(topic.encode("utf-8")) > MAX_TOPIC_BYTES:
                progress.dead_letter(index, f"topic over {MAX_TOPIC_BYTES} bytes")
                continue
            if qos == 0:
                await client.publish(topic, payload, qos=0)
                progress.ack(index)
                continue
            await window.acquire()
            # The task's first step hands the PUBLISH to the client; tasks start in creation
            # order, so PUBLISHes go out in log order.
            inflight.append(self.tasks.create_task(
                _publish(client, topic, payload, index, progress, window)))
        if inflight:
            await asyncio.gather(*inflight)


async def _publish(client: aiomqtt.Client, topic: str, payload: bytes, index: int,
                   progress: Progress, window: asyncio.Semaphore) -> None:
    try:
        # No per-message timer (it would cost a task each): a broker that stops answering is
        # caught by the keepalive, which ends the connection and so the session.
        await client.publish(topic, payload, qos=1, timeout=math.inf)
    finally:
        window.release()
    progress.ack(index)
