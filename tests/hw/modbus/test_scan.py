"""``gateway modbus scan``: which unit ids answer, against pymodbus servers over TCP and RTU."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from hw.modbus.scan import parse_units
from tests.hw.modbus.peers import rtu_peer, tcp_peer

REPO = Path(__file__).resolve().parents[3]


async def gateway(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "modbus", "scan", *args, cwd=REPO,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def test_unit_ranges() -> None:
    assert parse_units("1-3,7,2,9-10") == [1, 2, 3, 7, 9, 10]
    assert len(parse_units("1-247")) == 247
    for bad in ("0-3", "1-248", "5-2", "a", "1-", ""):
        with pytest.raises(ValueError):
            parse_units(bad)


async def test_scan_finds_live_units_and_skips_dead_ones_over_tcp() -> None:
    devices = {1: {"holding": {0: [0x1234]}}, 3: {"holding": {100: [1]}},  # 3: no register 0
               7: {"holding": {0: [1]}}}
    # an absent unit is one that never answers (the peer drops its replies: pymodbus itself
    # would answer unknown unit ids with exception 4)
    async with tcp_peer(devices, dead=[2, 4, 5, 6, 7, 8]) as peer:
        code, out, err = await gateway("--tcp", f"127.0.0.1:{peer.port}", "--units", "1-8",
                                       "--timeout", "0.3")
        assert peer.requests.get(7) == 1  # asked, did not answer
    assert code == 0, err
    rows = [line.split() for line in out.splitlines() if line.startswith("  unit")]
    assert [(r[1], r[2]) for r in rows] == [("1", "value"), ("3", "exception")]
    assert "holding 0 = 4660 (0x1234)" in out and "illegal data address" in out
    assert "2 unit(s) answered" in out and ": 1, 3" in out


async def test_scan_says_so_when_nothing_answers() -> None:
    async with tcp_peer({1: {"holding": {0: [1]}}}, dead=[4, 5]) as peer:
        code, out, _ = await gateway("--tcp", f"127.0.0.1:{peer.port}", "--units", "4-5",
                                     "--timeout", "0.2")
    assert code == 3 and "no unit answered" in out


async def test_scan_tries_each_serial_setting_over_rtu(tmp_path: Path) -> None:
    async with rtu_peer(tmp_path, {2: {"input": {5: [42]}}}, baud=9600) as peer:
        code, out, err = await gateway("--serial", peer.device, "--baud", "9600,19200",
                                       "--parity", "n", "--units", "1-3", "--address", "5",
                                       "--input", "--timeout", "0.3")
    assert code == 0, err
    assert f"scanning {peer.device} 9600 8N1" in out and f"scanning {peer.device} 19200 8N1" in out
    assert out.count("input 5 = 42") == 2  # a pty has no line speed: both settings answer
    assert f"{peer.device} 9600 8N1  unit 2" in out


async def test_bad_arguments_are_refused() -> None:
    code, _, err = await gateway("--tcp", "nohostport")
    assert code == 2 and "HOST:PORT" in err
    code, _, err = await gateway("--serial", "/dev/null", "--parity", "X")
    assert code == 2 and "bad parity" in err
    code, _, err = await gateway("--tcp", "127.0.0.1:1", "--units", "0-4")
    assert code == 2 and "1..247" in err
