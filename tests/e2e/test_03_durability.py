"""Durability: SIGKILL the hub during a QoS 1 load; after a restart every message that was
PUBACKed is in the built-in endpoint (DESIGN step 6: an ack means "durable")."""

from __future__ import annotations

import asyncio
import json

from gateway.mqtt.codec import Decoder, encode
from gateway.mqtt.packets import Connack, Connect, Puback, Publish
from tests.hubproc import HubProcess, create_device, device_token, username

DEVICES = 8
WINDOW = 50


async def publisher(hub: HubProcess, port: int, device_id: str, key: str,
                    acked: set[str], stop: asyncio.Event) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(encode(Connect(client_id=device_id, clean_session=True, keepalive=60,
                                username=username(hub, device_id),
                                password=device_token(hub, device_id, key).encode())))
    decoder = Decoder()
    inflight: dict[int, str] = {}
    n = 0
    try:
        packets = decoder.feed(await reader.read(1024))
        assert packets and isinstance(packets[0], Connack) and packets[0].return_code == 0
        while not stop.is_set():
            while len(inflight) < WINDOW:
                n += 1
                pid = n % 65535 + 1
                msg_id = f"{device_id}-{n}"
                inflight[pid] = msg_id
                writer.write(encode(Publish(topic=f"devices/{device_id}/messages/events/",
                                            payload=json.dumps({"id": msg_id}).encode(),
                                            qos=1, packet_id=pid)))
            data = await reader.read(65536)
            if not data:
                return
            for packet in decoder.feed(data):
                if isinstance(packet, Puback):
                    acked.add(inflight.pop(packet.packet_id))
    except (ConnectionError, OSError):
        return
    finally:
        writer.close()


def test_sigkill_during_qos1_load_loses_no_acknowledged_message(tmp_path) -> None:  # type: ignore[no-untyped-def]
    hub = HubProcess(tmp_path / "data").start()
    keys = {}
    for i in range(DEVICES):
        info = create_device(hub, f"load{i}")
        keys[f"load{i}"] = info["authentication"]["symmetricKey"]["primaryKey"]
    acked: set[str] = set()

    async def load() -> None:
        stop = asyncio.Event()
        port = hub.port("mqtt_local_port")
        tasks = [asyncio.create_task(publisher(hub, port, d, k, acked, stop)) for d, k in keys.items()]
        await asyncio.sleep(2.0)
        hub.kill()  # SIGKILL mid-stream
        await asyncio.wait_for(asyncio.gather(*tasks), 20)

    asyncio.run(load())
    assert len(acked) > 1000, f"the load was too light to mean anything ({len(acked)} acked)"
    hub.start()
    try:
        out = hub.cli("monitor-events", "--from-beginning", "--timeout", "3", "--json").stdout
        stored = {json.loads(line)["event"]["payload"]["id"] for line in out.splitlines() if line.strip()}
        missing = acked - stored
        assert not missing, f"{len(missing)} of {len(acked)} acknowledged messages lost: {sorted(missing)[:5]}"
    finally:
        hub.stop()
