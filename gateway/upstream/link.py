"""One MQTT connection to the parent (IoT Hub ref §1.2: client id, username,
SAS password or client certificate; TLS 1.2+ verified against the parent's CA).

A :class:`Session` is one connected client: QoS 1 publishes resolve on PUBACK; ``lost``
resolves when the connection goes (RST, FIN, keep-alive expiry, the parent closing it), which
the forwarder races against its in-flight publishes. SAS tokens are renewed *between* windows:
past :attr:`Session.renew_at` the forwarder stops sending, lets the in-flight PUBACKs come back
and reconnects with a fresh token (federation.md §3.3: MQTT 3.1.1 cannot re-authenticate, and
dropping a connection with publishes in flight is edgeHub's duplicate, Azure/iotedge#1538).
:class:`Backoff` is the jittered exponential delay between attempts.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
import time
import urllib.parse
from collections.abc import Callable
from typing import Any

from gateway.hub.sas import generate_sas_token
from gateway.mqttlink import MqttLink, connect
from gateway.upstream.settings import LinkSettings
from gateway.upstream.wire import Origin

log = logging.getLogger(__name__)

API_VERSION = "2021-04-12"
USER_AGENT = urllib.parse.quote("edge-gateway-upstream/0.1", safe="")


class Backoff:
    """``min * 2**n`` capped at ``max``, each delay drawn in [50 %, 100 %] of it (jitter keeps
    many gateways from reconnecting in step after a parent restarts)."""

    def __init__(self, minimum: float, maximum: float, rng: random.Random | None = None) -> None:
        self.minimum = max(0.01, minimum)
        self.maximum = max(self.minimum, maximum)
        self.failures = 0
        self._rng = rng or random.Random()

    def next(self) -> float:
        base = min(self.maximum, self.minimum * (2 ** min(self.failures, 30)))
        self.failures += 1
        return float(base * self._rng.uniform(0.5, 1.0))

    def reset(self) -> None:
        self.failures = 0


def ssl_context(settings: LinkSettings) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=settings.ca_file)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if settings.cert_file and settings.key_file:
        ctx.load_cert_chain(settings.cert_file, settings.key_file)
    return ctx


class Session:
    """One connected client (:mod:`gateway.mqttlink`). Use :func:`open_session`."""

    def __init__(self, link: MqttLink, *, renew_at: float) -> None:
        self.link = link
        self.renew_at = renew_at  # on the caller's clock; inf for X.509
        self.lost: asyncio.Future[str] = link.lost
        self.ended = False
        self.acked = 0

    def send(self, topic: str, payload: bytes) -> asyncio.Future[None]:
        """QoS 1: the future resolves on PUBACK, fails with UpstreamError if the link goes."""
        future = self.link.send(topic, payload)
        future.add_done_callback(self._count)
        return future

    def send_batched(self, topic: str, payload: bytes, token: Any) -> bool:
        """QoS 1 without a future (the forwarder's hot path): the PUBACKs of a socket read
        handed over together, to ``link.on_acks``
        (:meth:`gateway.mqttlink.MqttLink.send_batched`)."""
        return self.link.send_batched(topic, payload, token)

    def _count(self, future: asyncio.Future[None]) -> None:
        if not future.cancelled() and future.exception() is None:
            self.acked += 1

    async def publish(self, topic: str, payload: bytes) -> None:
        await self.send(topic, payload)

    async def close(self) -> None:
        self.ended = True
        await self.link.close()


async def open_session(settings: LinkSettings, *, origin: Origin | None = None,
                       key: str | None = None, policy: str | None = None, window: int,
                       keepalive: int,
                       token_ttl: int, ack_timeout: float,
                       ssl_ctx: ssl.SSLContext | None = None,
                       clock: Callable[[], float] = time.monotonic) -> Session:
    """Connect as our own gateway identity, or (identity mode) as ``origin`` with its own
    ``key`` (or a token of the parent's DeviceConnect ``policy`` signed with ``key``). Raises
    UpstreamError with the reason (CONNACK code, TLS, refused, timeout)."""
    device_id = origin.device_id if origin is not None else settings.device_id
    module_id = origin.module_id if origin is not None else None
    client_id = device_id if module_id is None else f"{device_id}/{module_id}"
    username = (f"{settings.hub}/{client_id}/?api-version={API_VERSION}"
                f"&DeviceClientType={USER_AGENT}")
    sas_key = key if origin is not None else settings.shared_access_key
    password = None
    renew_at = float("inf")
    if sas_key:
        resource = f"{settings.hub}/devices/{device_id}"
        if module_id:
            resource += f"/modules/{module_id}"
        password = generate_sas_token(resource, sas_key, int(time.time()) + token_ttl,
                                      policy if origin is not None else None)
        renew_at = clock() + token_ttl * 0.8  # on the caller's clock
    link = await connect(settings.host or settings.hub, settings.port,
                         ssl_ctx or ssl_context(settings), client_id=client_id,
                         username=username, password=password, keepalive=keepalive,
                         ack_timeout=ack_timeout)
    return Session(link, renew_at=renew_at)
