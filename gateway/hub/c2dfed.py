"""Cloud-to-device through child gateways (federation; IoT Hub ref §3.1-§3.3).

Azure IoT Edge cannot send C2D to nested children; here a message for a device behind
gateways stays in **this** hub's durable queue (its 50-message limit, expiry and feedback are
this hub's, as for a device connected here) and the child gateway acts like the device's
connection:

* delivering locks the message (:meth:`C2DQueues.deliverable`) and sends it down the gateway's
  link (``$iothub/gateway/down/c2d/?d={d}[&via=...]``, the message as JSON); the hop nearest
  the device puts it into its own durable queue (deduplicated by message id), so the device
  gets it when it connects there, even if that hop's own link is down by then;
* the lock lapses as usual; each lapse resends it (a redelivery after a lapse does not count,
  ref §3.2, and the child drops the copy it already has): a message lost on a link that went
  down is sent again, one already down there costs a few hundred bytes per lock period;
* when the message is settled down there -- completed, rejected or abandoned by the device
  over whatever protocol it uses at its hop, or dead-lettered there -- the outcome travels up
  hop by hop (``$iothub/gateway/up/c2d/settled/?d={d}&mid={id}&st={status}``, queued durably
  on the way, :mod:`gateway.upstream.c2dmirror`) and settles the message here the same way,
  with the lock token of its latest delivery: ``Success`` completes it, ``Rejected`` rejects
  it, ``Abandoned`` abandons it (the delivery counts here too; at ``max_delivery_count`` it is
  dead-lettered here), ``DeliveryCountExceeded``, ``Expired`` and ``Purged`` remove it with
  that status. The feedback is written here, where the sender reads it. Expiry is decided
  here too (the copy below carries the same absolute expiry time, so it lapses there too).
* when a gateway's downlink comes (back) up, directly or further down (a resync from the
  child), the locks of the messages handed down behind it are released and they are handed
  down again at once: one sent while that link was reconnecting is not left waiting for its
  lock period (the hop nearest the device drops the copies it already has).
"""

from __future__ import annotations

import base64
import json
import logging
from datetime import UTC, datetime
from typing import Any, Final

from gateway.errors import GatewayError
from gateway.hub.c2d import ABANDONED, C2DMessage, C2DQueues, FeedbackStatus
from gateway.hub.c2dmodel import LockLostError
from gateway.hub.federated import DOWN_PREFIX, DownlinkFilter, Federation
from gateway.hub.propbag import decode_bag, encode_bag

log = logging.getLogger(__name__)

_DOWN_C2D: Final = DOWN_PREFIX + "c2d/?"
_SYSTEM_TO_SERVICE: Final = {"correlation-id": "correlationId", "user-id": "userId",
                             "content-type": "contentType",
                             "content-encoding": "contentEncoding"}


def down_c2d_topic(device_id: str, via: tuple[str, ...]) -> str:
    pairs: list[tuple[str, str | None]] = [("d", device_id)]
    if via:
        pairs.append(("via", ";".join(via)))
    return _DOWN_C2D + encode_bag(pairs)


def parse_down_c2d(topic: str) -> tuple[str, tuple[str, ...]] | None:
    """(device id, via) of a C2D handed down, or None if ``topic`` is not one."""
    if not topic.startswith(_DOWN_C2D):
        return None
    params = dict(decode_bag(topic[len(_DOWN_C2D):]))
    via = params.get("via")
    return str(params.get("d") or ""), tuple(v for v in via.split(";") if v) if via else ()


def message_json(message: C2DMessage) -> bytes:
    """The service-API send body (ref §9.4) that recreates ``message`` one hop down."""
    properties: dict[str, Any] = {"messageId": message.message_id, "ack": "none",
                                  "expiryTimeUtc": datetime.fromtimestamp(
                                      message.expiry, UTC).isoformat()}
    for name, key in _SYSTEM_TO_SERVICE.items():
        if name in message.system:
            properties[key] = message.system[name]
    properties.update(message.application)
    return json.dumps({"bodyBase64": base64.b64encode(message.body).decode(),
                       "properties": properties}, separators=(",", ":")).encode()


class C2DForwarder:
    """This hub's queued messages for devices behind child gateways, sent down."""

    def __init__(self, queues: C2DQueues, federation: Federation) -> None:
        self.queues = queues
        self.federation = federation
        self._tokens: dict[tuple[str, str], str] = {}  # (device, message id) -> latest token
        self._devices: set[str] = set()  # devices with messages handed down
        self.forwarded = 0

    def behind(self, device_id: str) -> bool:
        return self.federation.hops(device_id, None) is not None

    async def pump(self, device_id: str) -> None:
        """Hand down what is deliverable now, if the device's first gateway is linked."""
        hops = self.federation.hops(device_id, None)
        if hops is None or not self.queues.pending(device_id):
            return
        self._devices.add(device_id)
        conn = self.federation.targets.target(hops.first, DownlinkFilter)
        if conn is None:
            return  # the gateway's downlink subscription pumps again (Federation.on_ready)
        topic = down_c2d_topic(device_id, hops.via)
        for message in await self.queues.deliverable(device_id):
            assert message.lock_token is not None
            self._tokens[(device_id, message.message_id)] = message.lock_token
            conn.publish(topic, message_json(message), 0)
            self.forwarded += 1

    async def settle_here(self, device_id: str, message_id: str, status: str) -> bool:
        """A completion from below: settle it if the message is queued here (True)."""
        if not self.queues.pending(device_id):
            return False
        await self.settled(device_id, message_id, status)
        return True

    def on_ready(self, gateway: str, below: tuple[str, ...] = ()) -> None:
        """A downlink is up: ``gateway`` (a child of ours), or ``below`` it (the child asked
        for a resync of that path). What waits behind it is handed down again at once."""
        for device_id in self.devices():
            hops = self.federation.hops(device_id, None)
            if hops is not None and hops.first == gateway and hops.via[:len(below)] == below:
                self.federation.spawn(self._again(device_id))

    async def _again(self, device_id: str) -> None:
        await self.queues.release(device_id)  # a redelivery after a release does not count
        await self.pump(device_id)

    def devices(self) -> list[str]:
        return [d for d in self._devices if self.queues.pending(d)]

    async def settled(self, device_id: str, message_id: str, status: str) -> None:
        """The message was settled down there with ``status``: settle it here the same way."""
        if status not in _OUTCOMES:
            log.warning("c2d %s for %s: unknown outcome %r from below ignored", message_id,
                        device_id, status)
            return
        token = self._tokens.pop((device_id, message_id), None)
        if token is None:  # not locked here now (restarted, abandoned): hand it down again
            await self.pump(device_id)
            token = self._tokens.pop((device_id, message_id), None)
            if token is None:
                log.info("c2d %s for %s settled below (%s) but not deliverable here",
                         message_id, device_id, status)
                return
        for attempt in (1, 2):
            try:
                if status == ABANDONED:
                    await self.queues.abandon(device_id, token)
                else:
                    await self.queues.settle(device_id, token, FeedbackStatus(status))
                return
            except LockLostError:  # handed down again meanwhile: settle with that token
                newer = self._tokens.pop((device_id, message_id), None)
                if newer is None or attempt == 2:
                    log.info("c2d %s for %s already settled here", message_id, device_id)
                    return
                token = newer
            except GatewayError as exc:
                log.warning("c2d %s for %s not settled: %s", message_id, device_id, exc)
                return


_OUTCOMES: Final = frozenset({ABANDONED, *(status.value for status in FeedbackStatus)})
