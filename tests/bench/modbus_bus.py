"""Benchmark: Modbus RTU bus utilisation of the bridge's per-bus scheduler.

Utilisation = time the line carries bytes / elapsed time, i.e. bytes on the wire x 11 bits /
baud / seconds. It is measured on an emulated RS-485 line: the bridge and a pymodbus server
with several slaves each open one end of a pty pair, and a relay process between the two
pairs forwards every chunk only after it would have finished crossing a half-duplex line at
the configured baud rate (ptys themselves have no baud rate). The bridge polls every slave as
fast as the line allows (interval 1 ms), so the figure is the scheduler's ceiling, which is
compared with the theoretical maximum: both frames of a transaction plus two t3.5 silences
(Modbus over Serial Line V1.02 §2.5.1.1), slave turnaround taken as zero.

    python tests/bench/modbus_bus.py [--seconds 4] [--slaves 4]

Runs on this machine only (loopback ptys); bounded in time; stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import multiprocessing as mp
import os
import select
import sys
import time
import tty
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from hw.modbus.bridge import ModbusBridge
from hw.modbus.registers import Table
from hw.modbus.schedule import (
    BITS_PER_CHAR,
    READ_REQUEST_BYTES,
    frame_gap,
    max_utilisation,
    read_response_bytes,
)


def relay(client_fd: int, server_fd: int, baud: int, start: float, warmup: float,
          seconds: float, out: Any) -> None:
    """Forward bytes between the two pty masters at the line rate of one shared half-duplex
    line; count the bytes that finish crossing it inside the measurement window. A frame
    starts no earlier than t3.5 after the previous one ended: real slaves detect the end of a
    request by that silence before answering (§2.5.1.1), which the pymodbus server (it frames
    by length) does not."""
    char = BITS_PER_CHAR / baud
    gap = frame_gap(baud)
    busy_until = 0.0
    window_start, window_end = start + warmup, start + warmup + seconds
    counted = 0
    pending: list[tuple[float, int, bytes]] = []  # (deliver at, fd, data)
    while True:
        now = time.perf_counter()
        if now >= window_end + 0.2:
            break
        timeout = max(0.0, min((p[0] for p in pending), default=now + 0.05) - now)
        readable, _, _ = select.select([client_fd, server_fd], [], [], min(timeout, 0.05))
        now = time.perf_counter()
        for fd in readable:
            try:
                data = os.read(fd, 4096)
            except OSError:
                continue
            begin = max(now, busy_until + gap)
            busy_until = begin + len(data) * char
            pending.append((busy_until, server_fd if fd == client_fd else client_fd, data))
        pending.sort()
        while pending:
            now = time.perf_counter()
            due, fd, data = pending[0]
            if due - now > 0.0015:
                break
            while time.perf_counter() < due:  # sub-millisecond precision
                pass
            os.write(fd, data)
            if window_start <= due < window_end:
                counted += len(data)
            pending.pop(0)
    out.put(counted)


def serve(port: str, baud: int, slaves: int, dead: int, registers: int) -> None:
    """Slaves 1..N answer; units 100.. are on the line but never answer (powered off)."""
    from pymodbus.server import ModbusSerialServer
    from pymodbus.simulator import DataType, SimData, SimDevice

    units = list(range(1, slaves + 1)) + list(range(100, 100 + dead))
    devices = [SimDevice(id=u, simdata=[SimData(0, values=list(range(registers)),
                                                datatype=DataType.REGISTERS)]) for u in units]

    def silence_dead(sending: bool, data: bytes) -> bytes:
        return b"" if sending and data and data[0] >= 100 else data

    async def main() -> None:
        server = ModbusSerialServer(devices, port=port, baudrate=baud,
                                    trace_packet=silence_dead)
        await server.serve_forever()

    asyncio.run(main())


async def poll(port: str, baud: int, slaves: int, dead: int, registers: int,
               duration: float) -> dict[str, Any]:
    bridge = ModbusBridge()
    units = list(range(1, slaves + 1)) + list(range(100, 100 + dead))
    bridge.apply({
        "buses": {"line": {"serial": {"port": port, "baud": baud, "parity": "N"},
                           "timeout": 0.1}},
        "devices": {f"u{u}": {"bus": "line", "unit": u, "interval": 0.001, "registers": {
            "block": {"address": 0, "type": "string", "length": registers}}} for u in units}})
    counts: dict[str, int] = {}

    async def emit(sensor: str, readings: Any) -> None:
        counts[sensor] = counts.get(sensor, 0) + 1

    task = asyncio.create_task(bridge.run(emit))
    await asyncio.sleep(duration)
    status = bridge.status()
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    return {"counts": counts, "status": status}


def scenario(baud: int, slaves: int, dead: int, registers: int, seconds: float,
             warmup: float = 1.0) -> dict[str, Any]:
    ctx = mp.get_context("fork")
    (cm, cs), (sm, ss) = os.openpty(), os.openpty()
    for fd in (cm, cs, sm, ss):
        tty.setraw(fd)
    client_port, server_port = os.ttyname(cs), os.ttyname(ss)
    out = ctx.Queue()
    start = time.perf_counter() + 0.5  # the server needs a moment to open its port
    relay_proc = ctx.Process(target=relay, args=(cm, sm, baud, start, warmup, seconds, out))
    server_proc = ctx.Process(target=serve, args=(server_port, baud, slaves, dead, registers))
    relay_proc.start()
    server_proc.start()
    try:
        time.sleep(max(0.0, start - time.perf_counter()))
        result = asyncio.run(poll(client_port, baud, slaves, dead, registers,
                                  warmup + seconds))
        counted = out.get(timeout=10)
    finally:
        server_proc.terminate()
        relay_proc.join(5)
        server_proc.join(5)
        for fd in (cm, cs, sm, ss):
            os.close(fd)
    response = read_response_bytes(Table.HOLDING, registers)
    measured = counted * BITS_PER_CHAR / baud / seconds
    ceiling = max_utilisation(baud, READ_REQUEST_BYTES, response)
    live = [result["counts"].get(f"u{u}", 0) for u in range(1, slaves + 1)]
    return {"baud": baud, "slaves": slaves, "dead": dead, "registers": registers,
            "measured": measured, "ceiling": ceiling, "ratio": measured / ceiling,
            "tx_per_s": counted / (READ_REQUEST_BYTES + response) / seconds,
            "polls_per_slave_s": sum(live) / len(live) / (warmup + seconds),
            "gap_ms": frame_gap(baud) * 1000,
            "timeouts": result["status"]["buses"]["line"]["timeouts"]}


def main(argv: list[str] | None = None) -> int:
    logging.getLogger("hw.modbus").setLevel(logging.ERROR)  # "unit 100 down" is expected
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--slaves", type=int, default=4)
    args = parser.parse_args(argv)
    print(f"Modbus RTU bus utilisation, {args.slaves} slaves polled back to back, "
          f"{args.seconds:g} s per row (emulated line; 11-bit characters)")
    header = (f"{'baud':>6} {'regs':>4} {'dead':>4} {'gap ms':>6} {'measured':>8} "
              f"{'ceiling':>7} {'ratio':>5} {'tx/s':>6} {'polls/slave/s':>13} {'timeouts':>8}")
    print(header)
    print("-" * len(header))
    for baud in (19200, 115200):
        for registers in (10, 60):
            for dead in (0, 1):
                r = scenario(baud, args.slaves, dead, registers, args.seconds)
                print(f"{r['baud']:>6} {r['registers']:>4} {r['dead']:>4} {r['gap_ms']:>6.3f} "
                      f"{r['measured']:>8.1%} {r['ceiling']:>7.1%} {r['ratio']:>5.2f} "
                      f"{r['tx_per_s']:>6.0f} {r['polls_per_slave_s']:>13.1f} "
                      f"{r['timeouts']:>8}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
