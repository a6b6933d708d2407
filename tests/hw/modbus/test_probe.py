"""``gateway modbus probe``: every interpretation of a block, and the command end to end."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from hw.modbus.probe import interpret, render
from tests.hw.modbus.peers import free_port, rtu_peer, tcp_peer

REPO = Path(__file__).resolve().parents[3]


def row(rows: list, type_: str, order: str) -> tuple[str | None, ...]:  # type: ignore[type-arg]
    (match,) = [r for r in rows if r.type == type_ and r.order == order]
    return match.values  # type: ignore[no-any-return]


def test_every_type_and_order_gets_one_row() -> None:
    rows = interpret([0x4366, 0x6666, 0x0000, 0x0001])
    labels = [(r.type, r.order) for r in rows]
    assert len(labels) == len(set(labels)) == 32
    assert row(rows, "float32", "ABCD")[0] == "230.4"
    assert row(rows, "float32", "CDAB")[0] != "230.4"
    assert row(rows, "uint32", "ABCD")[2] == "1"
    assert row(rows, "uint32", "CDAB")[2] == "65536"
    assert row(rows, "int16", "AB") == ("17254", "26214", "0", "1")
    assert row(rows, "uint16", "BA")[3] == "256"
    assert row(rows, "float32", "ABCD")[3] is None  # not enough registers left
    assert row(rows, "float64", "ABCDEFGH")[1:] == (None, None, None)
    assert row(rows, "hex", "AB") == ("4366", "6666", "0000", "0001")
    assert row(rows, "bits", "15..0")[3] == "0000000000000001"
    assert row(rows, "string", "AB")[0] == "Cf"


def test_scale_multiplies_numeric_rows_and_the_table_is_aligned() -> None:
    rows = interpret([2304], scale=0.1)
    assert row(rows, "uint16", "AB") == ("230.4",)
    text = render(40, interpret(list(range(10))), columns=4)
    sections = text.split("\n\n")
    assert len(sections) == 3  # 4 + 4 + 2 registers
    header = sections[0].splitlines()[0].split()
    assert header == ["type", "order", "40", "41", "42", "43"]
    assert len({len(line) for line in sections[0].splitlines()[1:3]}) == 1


async def probe(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "import sys; from hw.modbus.probe import main; "
        "sys.exit(main(sys.argv[1:]))", *args, cwd=REPO,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_probe_reads_a_tcp_device_and_prints_the_table() -> None:
    async with tcp_peer({5: {"input": {100: [0x4366, 0x6666, 0x6666, 0x4366]}}}) as peer:
        code, out, err = await probe("--tcp", f"127.0.0.1:{peer.port}", "--unit", "5",
                                     "--address", "100", "--count", "4", "--input")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == f"tcp:127.0.0.1:{peer.port} unit 5, input registers (FC 4) 100..103"
    (abcd,) = [line for line in lines if line.startswith("float32") and " ABCD " in line]
    (cdab,) = [line for line in lines if line.startswith("float32") and " CDAB " in line]
    assert abcd.split()[2] == "230.4" and cdab.split()[4] == "230.4"


async def test_probe_reads_over_rtu(tmp_path: Path) -> None:
    async with rtu_peer(tmp_path, {2: {"holding": {0: [0x0102, 0xFFFF]}}}, baud=9600) as peer:
        code, out, err = await probe("--serial", peer.device, "--baud", "9600", "--parity", "N",
                                     "--unit", "2", "--address", "0", "--count", "2")
    assert code == 0, err
    assert "holding registers (FC 3) 0..1" in out
    assert any(line.startswith("int16") and line.split()[2:] == ["258", "-1"]
               for line in out.splitlines())


async def test_probe_errors_are_reported_not_raised() -> None:
    code, _, err = await probe("--tcp", f"127.0.0.1:{free_port()}", "--unit", "1",
                               "--address", "0", "--count", "2", "--timeout", "0.5")
    assert code == 1 and "cannot connect" in err
    code, _, err = await probe("--tcp", "nohostport", "--unit", "1", "--address", "0",
                               "--count", "2")
    assert code == 2 and "HOST:PORT" in err
    code, _, err = await probe("--tcp", "h:1", "--unit", "1", "--address", "0", "--count", "200")
    assert code == 2 and "--count" in err
    async with tcp_peer({1: {"holding": {0: [1]}}}) as peer:
        code, _, err = await probe("--tcp", f"127.0.0.1:{peer.port}", "--unit", "1",
                                   "--address", "50", "--count", "2")
    assert code == 1 and "illegal data address" in err


async def test_probe_says_why_it_cannot_connect_in_one_line(tmp_path: Path) -> None:
    """The reason (refused, no such port) is in the error itself, not in a pymodbus warning
    beside a bare "cannot connect"."""
    port = free_port()
    code, _, err = await probe("--tcp", f"127.0.0.1:{port}", "--unit", "1",
                               "--address", "0", "--count", "2", "--timeout", "0.5")
    assert code == 1
    [line] = err.strip().splitlines()
    assert line.startswith("gateway modbus probe: ") and "cannot connect: " in line
    assert "Connect call failed" in line and f"'127.0.0.1', {port}" in line, line
    code, _, err = await probe("--serial", str(tmp_path / "ttyUSB9"), "--unit", "1",
                               "--address", "0", "--count", "1")
    assert code == 1
    [line] = err.strip().splitlines()
    assert "cannot connect: " in line and "could not open port" in line, line
    assert "pymodbus" not in err
