"""A QoS 1 load of many devices at a hub that keeps going across the hub's restarts: each
device publishes numbered messages ``{"d": id, "n": k}`` and records which were PUBACKed (an ack
means durable at that hub). A message not acked is sent again after a reconnect with the same
number, so the parent may legitimately hold a number the device never saw acked, but never two
of them."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence

from gateway.hub.sas import generate_sas_token
from gateway.mqtt.codec import Decoder, encode
from gateway.mqtt.packets import Connack, Connect, Puback, Publish


class Device:
    def __init__(self, device_id: str, key: str, *, module_id: str | None = None) -> None:
        self.device_id = device_id
        self.module_id = module_id
        self.key = key
        self.acked: list[int] = []  # numbers, in ack order
        self.next = 1
        self.connects = 0

    @property
    def client_id(self) -> str:
        return self.device_id if self.module_id is None else f"{self.device_id}/{self.module_id}"


async def run_device(dev: Device, host_name: str, address: str, port_of: "PortSource",
                     stop: asyncio.Event, *, count: int, window: int = 10,
                     rate: float = 0.0, body_bytes: int = 0) -> None:
    """Publish ``count`` messages (numbers 1..count), reconnecting until all are acked."""
    topic = f"devices/{dev.device_id}/" + (f"modules/{dev.module_id}/" if dev.module_id else "") \
        + "messages/events/"
    pad = "x" * body_bytes
    while not stop.is_set() and len(dev.acked) < count:
        try:
            port = port_of()
            reader, writer = await asyncio.open_connection(address, port)
        except OSError:
            await asyncio.sleep(0.1)
            continue
        resource = f"{host_name}/devices/{dev.device_id}" + (
            f"/modules/{dev.module_id}" if dev.module_id else "")
        writer.write(encode(Connect(
            client_id=dev.client_id, clean_session=True, keepalive=30,
            username=f"{host_name}/{dev.client_id}/?api-version=2021-04-12",
            password=generate_sas_token(resource, dev.key, int(time.time()) + 3600).encode())))
        decoder = Decoder()
        inflight: dict[int, int] = {}
        resend: list[int] = []
        pid = 0
        try:
            packets = decoder.feed(await asyncio.wait_for(reader.read(1024), 10))
            if not packets or not isinstance(packets[0], Connack) or packets[0].return_code:
                raise ConnectionError("refused")
            dev.connects += 1
            pending_numbers = sorted(set(range(1, dev.next)) - set(dev.acked))
            resend = pending_numbers
            last_send = time.monotonic()
            while not stop.is_set() and len(dev.acked) < count:
                while len(inflight) < window and (resend or dev.next <= count):
                    if rate and not resend:
                        wait = last_send + 1.0 / rate - time.monotonic()
                        if wait > 0:
                            break
                    n = resend.pop(0) if resend else dev.next
                    if n == dev.next:
                        dev.next += 1
                    pid = pid % 65535 + 1
                    inflight[pid] = n
                    writer.write(encode(Publish(topic=topic, qos=1, packet_id=pid, payload=json.dumps(
                        {"d": dev.client_id, "n": n, "t": time.time(), "pad": pad}).encode())))
                    last_send = time.monotonic()
                try:
                    data = await asyncio.wait_for(reader.read(65536), 0.05 if rate else 5)
                except TimeoutError:
                    continue
                if not data:
                    raise ConnectionError("closed")
                for packet in decoder.feed(data):
                    if isinstance(packet, Puback) and packet.packet_id in inflight:
                        dev.acked.append(inflight.pop(packet.packet_id))
        except (ConnectionError, OSError, TimeoutError):
            await asyncio.sleep(0.1)
        finally:
            writer.close()


class PortSource:
    def __call__(self) -> int:  # pragma: no cover - protocol
        raise NotImplementedError


def acked_sets(devices: Sequence[Device]) -> dict[str, set[int]]:
    return {d.client_id: set(d.acked) for d in devices}
