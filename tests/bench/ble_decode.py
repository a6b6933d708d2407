"""Benchmark of the BLE advertisement decoders: decoded readings per second per CPU (a script).

Run: ``python3 tests/bench/ble_decode.py [--frames N] [--repeat R]``. For each format it decodes
N advertisements (counters varying, as on air) on one core and prints the best of R runs as
advertisements/s and readings/s of CPU time (``time.process_time``):

* the pure decoders (``hw.ble.decoders``): BTHome v2 plain and AES-CCM encrypted, Ruuvi DF5,
  pvvx custom, ATC1441;
* the bridge's whole per-advertisement path (address lookup, decode, de-duplication,
  ``Reading`` objects, the bounded queue), fed directly without a radio.
"""

from __future__ import annotations

import argparse
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from hw.ble.bridge import BleBridge
from hw.ble.decoders import (
    BTHOME_UUID,
    ENV_SENSING_UUID,
    RUUVI_COMPANY_ID,
    Advertisement,
    BindKey,
    decode_atc1441,
    decode_bthome,
    decode_pvvx,
    decode_ruuvi,
    encode_bthome,
    mac_bytes,
)

MAC = "A4:C1:38:12:34:56"
MACB = mac_bytes(MAC)
KEY_HEX = "231d39c1d7cc1ab1aee224cd096db932"
KEY = BindKey.from_hex(KEY_HEX)
# battery, temperature, humidity, voltage: what pvvx firmware sends in BTHome mode
BTHOME_OBJECTS = bytes.fromhex("016402b30803a9110c860b")


def frames(count: int) -> dict[str, list[bytes]]:
    ruuvi = bytearray.fromhex("0512FC5394C37C0004FFFC040CAC364200CDCBB8334C884F")
    out: dict[str, list[bytes]] = {k: [] for k in
                                   ("bthome", "bthome-aes", "ruuvi", "pvvx", "atc1441")}
    for i in range(count):
        out["bthome"].append(encode_bthome(bytes([0, i & 0xFF]) + BTHOME_OBJECTS))
        out["bthome-aes"].append(encode_bthome(BTHOME_OBJECTS, mac=MACB, key=KEY, counter=i))
        ruuvi[16:18] = (i % 65535).to_bytes(2, "big")
        out["ruuvi"].append(bytes(ruuvi))
        out["pvvx"].append(struct.pack("<6shHHBBB", MACB[::-1], 2000 + i % 500, 4567, 2950,
                                       85, i & 0xFF, 5))
        out["atc1441"].append(struct.pack(">6shBBHB", MACB, 200 + i % 50, 46, 85, 2950,
                                          i & 0xFF))
    return out


def best(run: Callable[[], int], repeat: int) -> tuple[float, int]:
    """(fewest CPU seconds over ``repeat`` runs, readings per run)."""
    fastest, readings = float("inf"), 0
    for _ in range(repeat):
        started = time.process_time()
        readings = run()
        fastest = min(fastest, time.process_time() - started)
    return fastest, readings


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--frames", type=int, default=50_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    n: int = args.frames
    f = frames(n)

    def pure(decoder: Callable[[bytes], object], data: list[bytes]) -> Callable[[], int]:
        def run() -> int:
            readings = 0
            for payload in data:
                readings += len(decoder(payload).measures)  # type: ignore[attr-defined]
            return readings
        return run

    def bridge_path(kind: str, data: list[bytes]) -> Callable[[], int]:
        bridge = BleBridge(queue_size=n + 1)
        sensor: dict[str, object] = {"address": MAC, "decoder": kind}
        if kind == "bthome":
            sensor["bindkey"] = KEY_HEX
        bridge.apply({"sensors": {"s": sensor}})
        if kind == "bthome":
            advs = [Advertisement(MAC, -60, 1.7e9 + i, {}, {BTHOME_UUID: p})
                    for i, p in enumerate(data)]
        elif kind == "ruuvi":
            advs = [Advertisement(MAC, -60, 1.7e9 + i, {RUUVI_COMPANY_ID: p}, {})
                    for i, p in enumerate(data)]
        else:
            advs = [Advertisement(MAC, -60, 1.7e9 + i, {}, {ENV_SENSING_UUID: p})
                    for i, p in enumerate(data)]
        queue = bridge._queue
        on_adv = bridge._on_advertisement

        def run() -> int:
            for sensor_state in bridge._sensors.values():
                for d in sensor_state.dedup.values():
                    d.reset()
            for adv in advs:
                on_adv(adv)
            readings = 0
            while not queue.empty():
                readings += len(queue.get_nowait()[1])
            return readings
        return run

    rows: list[tuple[str, Callable[[], int]]] = [
        ("decode_bthome, plain (4 values)", pure(lambda p: decode_bthome(p, MACB), f["bthome"])),
        ("decode_bthome, AES-CCM (4 values)",
         pure(lambda p: decode_bthome(p, MACB, KEY), f["bthome-aes"])),
        ("decode_ruuvi, DF5 (9 values)", pure(decode_ruuvi, f["ruuvi"])),
        ("decode_pvvx (4 values)", pure(decode_pvvx, f["pvvx"])),
        ("decode_atc1441 (4 values)", pure(decode_atc1441, f["atc1441"])),
        ("bridge path, BTHome AES-CCM", bridge_path("bthome", f["bthome-aes"])),
        ("bridge path, Ruuvi DF5", bridge_path("ruuvi", f["ruuvi"])),
        ("bridge path, pvvx (decoder atc)", bridge_path("atc", f["pvvx"])),
    ]
    print(f"{n} advertisements per run, best of {args.repeat}, one CPU; "
          f"Python {sys.version.split()[0]}")
    print(f"  {'':38s} {'adv/s':>10s} {'readings/s':>12s} {'us/adv':>8s}")
    for name, run in rows:
        seconds, readings = best(run, args.repeat)
        print(f"  {name:38s} {n / seconds:10,.0f} {readings / seconds:12,.0f} "
              f"{seconds / n * 1e6:8.2f}")


if __name__ == "__main__":
    main()
