"""An MQTT 3.1.1 client connection for publishing in volume: the hub's own sans-I/O codec
(:mod:`gateway.mqtt.codec`) in a thin asyncio protocol. The upstream link
(:mod:`gateway.upstream.link`) and the ``mqtt`` endpoint (:mod:`gateway.endpoints.mqtt`) use it.

Why not aiomqtt here (DESIGN names it for client roles, and the bridges use it through
:mod:`gateway.client`): both keep hundreds of QoS 1 publishes in flight, and aiomqtt awaits
each one through paho, an ``asyncio.Event`` and a ``wait_for`` task: measured on this 2-core
machine it tops out at about 2,300 publishes/s, an eighth of what the hub ingests from one
connection. Here a publish is one encoded write and one future resolved by its PUBACK; the
codec is the one the broker uses, fuzzed and tested against real clients.

Keep-alive: PINGREQ after ``keepalive`` seconds without sending; the link is declared lost after
1.5 x ``keepalive`` without a byte from the peer, or when the oldest publish waits longer than
``ack_timeout`` for its PUBACK (a black-holed route). Failures raise ``error`` (the caller's
class from :mod:`gateway.errors`: UpstreamError for the link, EndpointError for an endpoint).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import struct
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, cast

from gateway.errors import GatewayError, RemoteProtocolError, UpstreamError, UpstreamRefusedError
from gateway.mqtt.codec import Decoder, encode
from gateway.mqtt.packets import (
    Connack,
    Connect,
    Disconnect,
    Pingreq,
    Pingresp,
    Puback,
    Publish,
    Suback,
    Subscribe,
)

_HEAD2 = struct.Struct(">BBBH")  # PUBLISH type and flags, two length bytes, topic length
_PID = struct.Struct(">H")

_CONNACK = {1: "unacceptable protocol version", 2: "identifier rejected",
            3: "server unavailable", 4: "bad username or password", 5: "not authorized"}


class _Protocol(asyncio.Protocol):
    def __init__(self, link: MqttLink) -> None:
        self.link = link
        self.decoder = Decoder(max_packet_size=1 << 20)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.link.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses

    def data_received(self, data: bytes) -> None:
        link = self.link
        link.last_rx = time.monotonic()
        if data[:2] == b"\x40\x02" and not self.decoder.buffered:
            # a run of PUBACKs (MQTT 3.1.1 §3.4: 0x40, length 2, packet id), most of what a
            # parent sends a forwarder: taken here, without a packet object each; the rest
            # (and a packet id 0, which the decoder refuses) goes to the decoder
            pos, end = 0, len(data)
            run: list[int] = []
            while pos + 4 <= end and data[pos] == 0x40 and data[pos + 1] == 2:
                packet_id = (data[pos + 2] << 8) | data[pos + 3]
                if not packet_id:
                    break
                run.append(packet_id)
                pos += 4
            link.acked_run(run)
            if pos == end:
                return
            data = data[pos:]
        try:
            packets = self.decoder.feed(data)
        except RemoteProtocolError as exc:
            link.lose(f"{link.peer} broke the protocol: {exc}")
            return
        for packet in packets:
            if type(packet) is Puback:
                link.acked_packet(packet.packet_id)
            elif type(packet) is Connack:
                if not link.connack.done():
                    link.connack.set_result(packet)
            elif type(packet) is Publish:  # a twin response and the like: acknowledge it
                if packet.qos == 1 and packet.packet_id is not None:
                    link.write(encode(Puback(packet.packet_id)))
                if link.on_publish is not None:  # the downlink (gateway.upstream.downlink)
                    link.on_publish(packet)
            elif type(packet) is Suback:
                link.acked_packet(packet.packet_id)
            elif type(packet) is Pingresp:
                pass

    def connection_lost(self, exc: Exception | None) -> None:
        link = self.link
        link.lose(f"connection lost: {exc}" if exc else f"connection closed by {link.peer}")


class MqttLink:
    """One connected client. ``send`` returns a future resolved by the PUBACK; ``lost``
    resolves (with the reason) when the connection goes."""

    def __init__(self, *, keepalive: int, ack_timeout: float, peer: str = "the parent",
                 error: type[GatewayError] = UpstreamError) -> None:
        loop = asyncio.get_running_loop()
        self.peer = peer
        self.error = error
        self.transport: asyncio.Transport | None = None
        self.connack: asyncio.Future[Connack] = loop.create_future()
        self.lost: asyncio.Future[str] = loop.create_future()
        self.keepalive = keepalive
        self.ack_timeout = ack_timeout
        self.last_rx = self.last_tx = time.monotonic()
        # packet id -> (future or None, sent at, on_ack or None, token for on_ack): neither
        # a future nor an on_ack: the token goes to ``on_acks`` (:meth:`send_batched`)
        self._pending: OrderedDict[int, tuple[asyncio.Future[None] | None, float,
                                              Callable[[Any], None] | None, Any]] = OrderedDict()
        self.on_acks: Callable[[list[Any]], None] | None = None
        self._next_id = 0
        self._out: list[bytes | bytearray] = []
        self._timer: asyncio.Task[None] | None = None
        self.on_publish: Callable[[Publish], None] | None = None  # PUBLISHes from the parent

    def write(self, data: bytes | bytearray) -> None:
        """Queue ``data``; everything written in one loop turn goes out in one TLS write."""
        if not self._out:
            asyncio.get_running_loop().call_soon(self._flush)
        self._out.append(data)

    def _flush(self) -> None:
        out, self._out = self._out, []
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(out))
            self.last_tx = time.monotonic()

    def send(self, topic: str, payload: bytes) -> asyncio.Future[None]:
        return self._request(lambda pid: Publish(topic=topic, payload=payload, qos=1,
                                                 packet_id=pid))

    def subscribe(self, *filters: str) -> asyncio.Future[None]:
        """SUBSCRIBE at QoS 1; the future resolves on the SUBACK (the downlink's filter)."""
        return self._request(lambda pid: Subscribe(pid, tuple((f, 1) for f in filters)))

    def _request(self, packet: Callable[[int], Publish | Subscribe]) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.lost.done():
            future.set_exception(self.error(self.lost.result()))
            return future
        if len(self._pending) >= 65535:
            future.set_exception(self.error("no free packet id"))
            return future
        pid = self._take_packet_id()
        self._pending[pid] = (future, time.monotonic(), None, None)
        self.write(encode(packet(pid)))
        return future

    def _take_packet_id(self) -> int:
        """The next packet id not awaiting its acknowledgement (the caller checked that one is
        free: fewer than 65535 pending)."""
        pid = self._next_id
        while True:
            pid = pid % 65535 + 1
            if pid not in self._pending:
                self._next_id = pid
                return pid

    def send_qos0(self, topic: str, payload: bytes) -> bool:
        """QoS 0: handed to the socket in this loop turn; False if the link is already lost."""
        if self.lost.done():
            return False
        self.write(encode(Publish(topic=topic, payload=payload, qos=0)))
        return True

    def send_nowait(self, topic: str, payload: bytes, on_ack: Callable[[Any], None],
                    token: Any) -> bool:
        """:meth:`send` without a future: ``on_ack(token)`` is called from the PUBACK; nothing
        is called if the link goes (the caller watches :attr:`lost`). False if the link is
        gone or every packet id is in use."""
        return self._send_qos1(topic, payload, on_ack, token)

    def send_batched(self, topic: str, payload: bytes, token: Any) -> bool:
        """:meth:`send_nowait` for the forwarder's hot path: the tokens of a run of PUBACKs
        (what one read of the socket brings) go to :attr:`on_acks` in one call, in the order
        the PUBACKs came, instead of a call each."""
        return self._send_qos1(topic, payload, None, token)

    def _send_qos1(self, topic: str, payload: bytes, on_ack: Callable[[Any], None] | None,
                   token: Any) -> bool:
        if self.lost.done() or len(self._pending) >= 65535:
            return False
        pid = self._take_packet_id()
        self._pending[pid] = (None, time.monotonic(), on_ack, token)
        raw = topic.encode()
        size = len(raw) + 4 + len(payload)  # the remaining length (MQTT 3.1.1 §2.2.3)
        if not 128 <= size < 16384 or len(raw) > 65535:  # not two length bytes: the codec
            self.write(encode(Publish(topic=topic, payload=payload, qos=1, packet_id=pid)))
            return True
        # PUBLISH QoS 1 (MQTT 3.1.1 §3.3): fixed header with a two-byte remaining length,
        # topic length, topic, packet id, payload; in pieces for the flush to join
        if not self._out:
            asyncio.get_running_loop().call_soon(self._flush)
        self._out += (_HEAD2.pack(0x32, (size & 0x7F) | 0x80, size >> 7, len(raw)), raw,
                      _PID.pack(pid), payload)
        return True

    def acked_packet(self, pid: int) -> None:
        entry = self._pending.pop(pid, None)
        if entry is None:
            return
        future, _, on_ack, token = entry
        if future is None:
            if on_ack is not None:
                on_ack(token)
            elif self.on_acks is not None:
                self.on_acks([token])
        elif not future.done():
            future.set_result(None)

    def acked_run(self, pids: list[int]) -> None:
        """A run of PUBACKs: the batched tokens (:meth:`send_batched`) go to :attr:`on_acks`
        together; anything else is settled in order around them."""
        pending = self._pending
        tokens: list[Any] = []
        for pid in pids:
            entry = pending.pop(pid, None)
            if entry is None:
                continue
            future, _, on_ack, token = entry
            if future is None and on_ack is None:
                tokens.append(token)
                continue
            if tokens and self.on_acks is not None:  # keep the order
                self.on_acks(tokens)
                tokens = []
            if future is None:
                if on_ack is not None:
                    on_ack(token)
            elif not future.done():
                future.set_result(None)
        if tokens and self.on_acks is not None:
            self.on_acks(tokens)

    def lose(self, reason: str) -> None:
        if not self.lost.done():
            self.lost.set_result(reason)
        if not self.connack.done():
            self.connack.set_exception(self.error(reason))
            self.connack.exception()  # retrieved: nobody awaits it when the dial itself failed
        pending, self._pending = self._pending, OrderedDict()
        for future, _, _, _ in pending.values():
            if future is not None and not future.done():
                future.set_exception(self.error(reason))
        if self.transport is not None:
            self.transport.abort()
        if self._timer is not None and self._timer is not asyncio.current_task():
            self._timer.cancel()

    async def _watch(self) -> None:
        """Keep-alive and PUBACK timeouts, once a second (or faster for short keep-alives)."""
        tick = min(1.0, self.keepalive / 4)
        while not self.lost.done():
            await asyncio.sleep(tick)
            now = time.monotonic()
            if now - self.last_rx > 1.5 * self.keepalive:
                self.lose(f"keep-alive expired: nothing from {self.peer}")
                return
            if self._pending:
                _, (_, sent, _, _) = next(iter(self._pending.items()))
                if now - sent > self.ack_timeout:
                    self.lose(f"no PUBACK for {self.ack_timeout:.0f} s")
                    return
            if now - self.last_tx >= self.keepalive:
                self.write(encode(Pingreq()))

    async def close(self) -> None:
        if not self.lost.done():
            self.write(encode(Disconnect()))
            self._flush()
            if self.transport is not None:
                self.transport.close()
            self.lose("closed")
        if self._timer is not None:
            self._timer.cancel()
            with contextlib.suppress(BaseException):
                await self._timer


async def connect(host: str, port: int, ctx: ssl.SSLContext | None, *, client_id: str,
                  username: str | None, password: str | None, keepalive: int,
                  ack_timeout: float, peer: str = "the parent",
                  error: type[GatewayError] = UpstreamError,
                  connect_timeout: float | None = None) -> MqttLink:
    """TCP (+ TLS unless ``ctx`` is None) + CONNECT/CONNACK; ``error`` with the reason on any
    failure."""
    link = MqttLink(keepalive=keepalive, ack_timeout=ack_timeout, peer=peer, error=error)
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(connect_timeout or ack_timeout + 5):
            await loop.create_connection(lambda: _Protocol(link), host, port, ssl=ctx,
                                         server_hostname=host if ctx is not None else None)
            link.write(encode(Connect(client_id=client_id, clean_session=True,
                                      keepalive=keepalive, username=username,
                                      password=password.encode() if password else None)))
            connack = await link.connack
    except GatewayError:
        link.lose("connect failed")
        raise
    except (OSError, ssl.SSLError, TimeoutError) as exc:
        link.lose("connect failed")
        raise error(f"cannot connect to {host}:{port}: {exc or type(exc).__name__}") from None
    if connack.return_code != 0:
        link.lose("refused")
        reason = (f"{peer} refused the connection: CONNACK {connack.return_code} "
                  f"({_CONNACK.get(connack.return_code, '?')})")
        if error is UpstreamError:  # the link backs off by the code (a 403002 quota waits)
            raise UpstreamRefusedError(reason, connack=int(connack.return_code))
        raise error(reason)
    link._timer = loop.create_task(link._watch())
    return link

