"""Benchmark of serial decoding: NMEA sentences decoded per second (a script, not a test).

Run: ``python3 tests/bench/serial_decode.py [--sentences N] [--repeat R] [--json]``. Prints the
best of R runs, for:

* the NMEA checksum alone (``checksum``, folding XOR) against a bytewise loop;
* :class:`hw.serial.nmea.NmeaDecoder` on a u-blox-like epoch mix (GGA, RMC, GSA, VTG), one
  sentence per call, readings built;
* the whole pure path, :class:`hw.serial.framing.FrameReader` fed the byte stream in 4 KiB
  chunks (what one ``read`` returns): line splitting, checksum, decoding, counters;
* the same with JSON lines and delimited lines of comparable size;
* the bridge end to end: sentences written into a pty pair, read by :class:`SerialBridge`,
  decoded and handed to a list-collecting ``emit`` (the I/O shell's ceiling, not a UART's: a
  9600-baud GPS sends about 15 sentences a second).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import tty
from collections.abc import Callable, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from hw.readings import Reading
from hw.serial.bridge import SerialBridge
from hw.serial.framing import (
    DelimitedDecoder,
    DelimitedOptions,
    FrameReader,
    JsonLinesDecoder,
    JsonOptions,
)
from hw.serial.nmea import NmeaDecoder, checksum, with_checksum

EPOCH = [
    with_checksum("GNGGA,092725.00,4717.11399,N,00833.91590,E,1,08,1.01,499.6,M,48.0,M,,"),
    with_checksum("GNRMC,092725.00,A,4717.11399,N,00833.91590,E,0.004,77.52,091202,,,A"),
    with_checksum("GNGSA,A,3,23,29,07,08,09,18,26,28,,,,,1.94,1.18,1.54,1"),
    with_checksum("GNVTG,77.52,T,,M,0.004,N,0.008,K,A"),
]
JSON_LINE = b'{"t": 21.53, "rh": 40.2, "p": 1013.25, "co2": 612, "voc": 0.31, "pm25": 7}'
CSV_LINE = b"21.53,40.2,1013.25,612,0.31,7"
CHUNK = 4096


def best_ns_per_item(run: Callable[[], int], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter_ns()
        items = run()
        best = min(best, (time.perf_counter_ns() - started) / items)
    return best


def stream_of(lines: Sequence[bytes]) -> list[bytes]:
    data = b"".join(line + b"\r\n" for line in lines)
    return [data[i : i + CHUNK] for i in range(0, len(data), CHUNK)]


def feed_all(reader: FrameReader, chunks: list[bytes], expected: int) -> int:
    for chunk in chunks:
        reader.feed(chunk, 0.0)
    assert reader.counters.decoded == expected, reader.counters
    return expected


async def bridge_end_to_end(count: int) -> float:
    """Seconds to push ``count`` sentences through a pty into the bridge and out of emit."""
    master, slave = os.openpty()
    tty.setraw(master)
    got = 0
    done = asyncio.Event()

    async def emit(_sensor: str, readings: Sequence[Reading]) -> None:
        nonlocal got
        got += 1
        if got == count:
            done.set()

    bridge = SerialBridge(queue_size=count + 1)
    bridge.apply({"ports": {"gps": {"path": os.ttyname(slave)}}})
    task = asyncio.create_task(bridge.run(emit))
    while not bridge.status()["ports"]["gps"]["connected"]:
        await asyncio.sleep(0.001)
    data = b"".join(s + b"\r\n" for s in (EPOCH * (count // len(EPOCH) + 1))[:count])
    loop = asyncio.get_running_loop()
    started = time.perf_counter()
    os.set_blocking(master, False)
    view = memoryview(data)
    while view:
        try:
            sent = os.write(master, view[:CHUNK])
            view = view[sent:]
        except BlockingIOError:
            writable = loop.create_future()
            loop.add_writer(master, writable.set_result, None)
            await writable
            loop.remove_writer(master)
    await done.wait()
    elapsed = time.perf_counter() - started
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    os.close(master)
    os.close(slave)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sentences", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    count: int = args.sentences
    sentences = (EPOCH * (count // len(EPOCH) + 1))[:count]
    bodies = [s[1 : s.rindex(b"*")] for s in sentences]
    decoder = NmeaDecoder()

    def bytewise(body: bytes) -> int:
        value = 0
        for byte in body:
            value ^= byte
        return value

    def run_checksum() -> int:
        for body in bodies:
            checksum(body)
        return count

    def run_bytewise() -> int:
        for body in bodies:
            bytewise(body)
        return count

    def run_decode() -> int:
        decode = decoder.decode
        for sentence in sentences:
            decode(sentence, "gps", 0.0)
        return count

    nmea_chunks = stream_of(sentences)
    json_chunks = stream_of([JSON_LINE] * count)
    csv_chunks = stream_of([CSV_LINE] * count)
    csv_options = DelimitedOptions(columns=("t", "rh", "p", "co2", "voc", "pm25"))
    results = {
        "nmea_checksum_ns": best_ns_per_item(run_checksum, args.repeat),
        "bytewise_checksum_ns": best_ns_per_item(run_bytewise, args.repeat),
        "nmea_decode_ns": best_ns_per_item(run_decode, args.repeat),
        "nmea_stream_ns": best_ns_per_item(
            lambda: feed_all(FrameReader("gps", NmeaDecoder(), max_line=164), nmea_chunks, count),
            args.repeat),
        "jsonl_stream_ns": best_ns_per_item(
            lambda: feed_all(FrameReader("s", JsonLinesDecoder(JsonOptions())), json_chunks, count),
            args.repeat),
        "delimited_stream_ns": best_ns_per_item(
            lambda: feed_all(FrameReader("s", DelimitedDecoder(csv_options)), csv_chunks, count),
            args.repeat),
    }
    e2e_count = min(count, 20_000)
    results["bridge_pty_ns"] = min(
        asyncio.run(bridge_end_to_end(e2e_count)) for _ in range(3)) * 1e9 / e2e_count
    if args.json:
        print(json.dumps({k: round(v, 1) for k, v in results.items()}))
        return
    print(f"{count} sentences, best of {args.repeat} (per item; rate = 1 s / time)")
    labels = {
        "nmea_checksum_ns": "NMEA checksum (folding XOR)",
        "bytewise_checksum_ns": "NMEA checksum (bytewise loop, for reference)",
        "nmea_decode_ns": "NmeaDecoder.decode (GGA/RMC/GSA/VTG mix)",
        "nmea_stream_ns": "FrameReader: NMEA stream in 4 KiB chunks",
        "jsonl_stream_ns": "FrameReader: JSON lines (6 numeric fields)",
        "delimited_stream_ns": "FrameReader: delimited (6 columns)",
        "bridge_pty_ns": f"SerialBridge over a pty, to emit ({e2e_count} sentences)",
    }
    for key, label in labels.items():
        ns = results[key]
        print(f"  {label:<58} {ns / 1000:8.2f} us  {1e9 / ns:>12,.0f} /s")


if __name__ == "__main__":
    main()
