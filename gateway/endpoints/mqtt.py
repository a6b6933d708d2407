"""The ``mqtt`` endpoint: an external broker, MQTT 3.1.1 on the hub's own codec
(:mod:`gateway.mqttlink`; aiomqtt capped delivery at about 7,800 msg/s here).

One connection per endpoint, clean session (the cursor, not the broker, remembers what is
left). QoS 1: up to ``max_inflight`` PUBLISHes await their PUBACK at once, written in log
order on the one connection (so the broker receives each device's messages in order, MQTT
3.1.1 §4.6), and a message counts as delivered on its PUBACK. QoS 0: delivered once handed
to the socket (at most once if the connection drops). A lost connection is noticed at once
(RST, FIN, keep-alive expiry, or a PUBACK overdue by ``ack_timeout``) and the unacknowledged
rest is sent again on the next connection. TLS 1.2+ verifies the broker against ``caFile`` (or
the system's CAs); the password is read from ``passwordFile`` at every connect, so it can be
rotated.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from gateway.endpoints.envelope import Delivery, body_publish, json_line, render_topic
from gateway.endpoints.runner import Progress, Session
from gateway.endpoints.spec import MAX_TOPIC_BYTES, MqttEndpointSpec
from gateway.errors import EndpointError
from gateway.mqttlink import MqttLink, connect

__all__ = ["MqttSink"]

_KEEPALIVE = 30
_MAX_BUFFERED = 4 << 20  # QoS 0: bytes left in the socket's buffer before a batch waits


class MqttSink:
    def __init__(self, spec: MqttEndpointSpec, *, client_id: str,
                 connect_timeout: float = 10.0, ack_timeout: float = 60.0) -> None:
        self.spec = spec
        self.client_id = client_id
        self.connect_timeout = connect_timeout
        self.ack_timeout = ack_timeout  # a PUBACK overdue this long: the broker is gone

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
        try:
            link = await connect(
                spec.host, spec.port, self._tls(), client_id=self.client_id,
                username=spec.username, password=self._password(), keepalive=_KEEPALIVE,
                ack_timeout=self.ack_timeout, peer="the broker", error=EndpointError,
                connect_timeout=self.connect_timeout)
        except EndpointError as exc:
            raise EndpointError(f"{spec.url}: {exc}") from None
        try:
            async with asyncio.TaskGroup() as tasks:
                watch = tasks.create_task(_watch(spec.url, link))
                yield _MqttSession(spec, link)
                watch.cancel()
        except* EndpointError as group:
            raise group.exceptions[0] from None
        finally:
            await link.close()


async def _watch(url: str, link: MqttLink) -> None:
    """Ends the session (raising EndpointError) as soon as the connection is lost."""
    reason = await link.lost
    raise EndpointError(f"{url}: {reason}")


class _MqttSession:
    recovered = 0
    reachable = True

    def __init__(self, spec: MqttEndpointSpec, link: MqttLink) -> None:
        self.spec = spec
        self.link = link

    def idle_timeout(self) -> float | None:
        return None

    async def idle(self) -> None:
        return None

    def _message(self, d: Delivery) -> tuple[str, bytes]:
        if self.spec.envelope == "body":
            return body_publish(self.spec.topic, d)
        return render_topic(self.spec.topic, d), json_line(d)[:-1]

    def _lost(self) -> EndpointError:
        return EndpointError(f"{self.spec.url}: {self.link.lost.result()}")

    async def deliver(self, batch: Sequence[Delivery], progress: Progress) -> None:
        link, qos = self.link, self.spec.qos
        if qos == 1:
            await self._deliver_qos1(batch, progress)
            return
        for index, d in enumerate(batch):
            topic, payload = self._message(d)
            if len(topic.encode("utf-8")) > MAX_TOPIC_BYTES:
                progress.dead_letter(index, f"topic over {MAX_TOPIC_BYTES} bytes")
                continue
            if not link.send_qos0(topic, payload):
                raise self._lost()
            progress.ack(index)
        transport = link.transport
        while (transport is not None and not link.lost.done()
               and transport.get_write_buffer_size() > _MAX_BUFFERED):
            await asyncio.sleep(0.01)  # QoS 0 into a broker that reads slowly

    async def _deliver_qos1(self, batch: Sequence[Delivery], progress: Progress) -> None:
        """Up to ``max_inflight`` PUBLISHes awaiting PUBACK, written in log order; each PUBACK
        settles its message through a callback (no future per message), and the sender sleeps
        only while the window is full (woken by the first PUBACK, or the link's loss)."""
        link, limit = self.link, self.spec.max_inflight
        window = _Window()

        def acked(index: int) -> None:
            progress.ack(index)
            window.inflight -= 1
            window.wake()

        link.lost.add_done_callback(window.wake)
        try:
            for index, d in enumerate(batch):
                topic, payload = self._message(d)
                if len(topic.encode("utf-8")) > MAX_TOPIC_BYTES:
                    progress.dead_letter(index, f"topic over {MAX_TOPIC_BYTES} bytes")
                    continue
                while window.inflight >= limit and not link.lost.done():
                    await window.wait()
                # written in this order: log order on the wire
                if not link.send_nowait(topic, payload, acked, index):
                    raise self._lost()
                window.inflight += 1
            while window.inflight and not link.lost.done():  # the batch's tail
                _quickack(link)
                await window.wait()
            if window.inflight:
                raise self._lost()
        finally:
            link.lost.remove_done_callback(window.wake)


class _Window:
    """The count of PUBLISHes awaiting PUBACK, and the sender's wake-up."""

    __slots__ = ("inflight", "waiter")

    def __init__(self) -> None:
        self.inflight = 0
        self.waiter: asyncio.Future[None] | None = None

    async def wait(self) -> None:
        self.waiter = asyncio.get_running_loop().create_future()
        try:
            await self.waiter
        finally:
            self.waiter = None

    def wake(self, _: object = None) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


def _quickack(link: MqttLink) -> None:
    """ACK what the broker sent at once while only its PUBACKs are awaited (a batch's tail):
    a broker writing without TCP_NODELAY (Mosquitto's default) holds its next PUBACKs until
    the previous segment is ACKed, and with nothing to send our ACK would wait for the
    kernel's delayed-ACK timer, about 40 ms per batch (7,700 msg/s instead of 34,000 in
    tests/bench/mqtt_endpoint.py). Linux re-arms delayed ACKs after a while, so this is set
    before every wait."""
    sock = link.transport.get_extra_info("socket") if link.transport is not None else None
    if sock is not None and hasattr(socket, "TCP_QUICKACK"):
        with contextlib.suppress(OSError, AttributeError):  # not TCP, or a wrapped socket
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
