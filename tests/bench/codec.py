"""Micro-benchmark of the MQTT codec hot paths (a script, not a test).

Run: ``python3 tests/bench/codec.py [--packets N] [--repeat R]``. Prints the best of R runs,
in nanoseconds per packet, for:

* decoding a stream of QoS 1 PUBLISH packets (40-byte topic, 200-byte payload) fed to
  :class:`gateway.mqtt.codec.Decoder` in 64 KiB chunks, and the same stream through
  :meth:`gateway.mqtt.session.ServerSession.receive` (decoder plus events);
* encoding those PUBLISH packets (:func:`encode_publish` and the generic :func:`encode`);
* encoding PUBACKs one by one (:func:`encode_puback`) and in batches
  (:func:`encode_pubacks`, :meth:`ServerSession.ack_many`).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from gateway.mqtt.codec import (
    Decoder,
    decode,
    encode,
    encode_puback,
    encode_pubacks,
    encode_publish,
)
from gateway.mqtt.packets import Connect, Publish
from gateway.mqtt.session import ServerSession

TOPIC = "devices/sensor-0001/messages/events/ab=c"  # 40 bytes
assert len(TOPIC.encode()) == 40
PAYLOAD = bytes(range(200))
CHUNK = 64 * 1024


def best_ns_per_item(run: Callable[[], int], repeat: int) -> float:
    """The fastest of ``repeat`` runs, in ns per item (``run`` returns its item count)."""
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter_ns()
        items = run()
        elapsed = time.perf_counter_ns() - started
        best = min(best, elapsed / items)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--packets", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    count: int = args.packets
    ids = [i % 65535 + 1 for i in range(count)]
    packets = [Publish(TOPIC, PAYLOAD, 1, packet_id=pid) for pid in ids]
    stream = b"".join(encode(p) for p in packets)
    chunks = [stream[i : i + CHUNK] for i in range(0, len(stream), CHUNK)]
    assert Decoder().feed(stream) == packets

    def decode_stream() -> int:
        decoder = Decoder()
        feed = decoder.feed
        decoded = 0
        for chunk in chunks:
            decoded += len(feed(chunk))
        assert decoded == count
        return count

    def decode_one_by_one() -> int:
        view = memoryview(stream)
        pos = 0
        for _ in range(count):
            result = decode(view[pos:])
            assert result is not None
            pos += result[1]
        view.release()
        return count

    connect = encode(Connect("bench", True, 60))

    def session_receive() -> int:
        session = ServerSession(max_packet_size=1 << 20, now=0.0)
        session.receive(connect, 0.0)
        session.accept(False)
        receive = session.receive
        events = 0
        for chunk in chunks:
            events += len(receive(chunk, 1.0))
        assert events == count
        return count

    def encode_fast() -> int:
        for pid in ids:
            encode_publish(TOPIC, PAYLOAD, 1, pid)
        return count

    def encode_generic() -> int:
        for packet in packets:
            encode(packet)
        return count

    def puback_each() -> int:
        for pid in ids:
            encode_puback(pid)
        return count

    batches = [ids[i : i + 100] for i in range(0, count, 100)]

    def puback_batches() -> int:
        for batch in batches:
            encode_pubacks(batch)
        return count

    def session_ack_many() -> int:
        session = ServerSession(max_packet_size=1 << 20, now=0.0)
        session.receive(connect, 0.0)
        session.accept(False)
        session.data_to_send()
        for batch in batches:
            session.ack_many(batch)
            session.data_to_send()
        return count

    print(
        f"{count} QoS 1 PUBLISH packets, 40-byte topic, 200-byte payload "
        f"({len(stream[:]) // count} bytes each); best of {args.repeat}; Python {sys.version.split()[0]}"
    )
    rows = [
        ("decode: Decoder.feed, 64 KiB chunks", decode_stream),
        ("decode: ServerSession.receive (decode + events)", session_receive),
        ("decode: decode(memoryview) one packet at a time", decode_one_by_one),
        ("encode: encode_publish()", encode_fast),
        ("encode: encode(Publish)", encode_generic),
        ("encode: encode_puback() each", puback_each),
        ("encode: encode_pubacks() batches of 100", puback_batches),
        ("encode: ServerSession.ack_many() batches of 100", session_ack_many),
    ]
    for name, run in rows:
        print(f"  {name:50s} {best_ns_per_item(run, args.repeat):8.0f} ns/packet")


if __name__ == "__main__":
    main()
