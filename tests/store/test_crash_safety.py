"""Crash safety for real: a subprocess appends in a stream and prints every acknowledged
append; we SIGKILL it mid-stream and check that every acknowledged record is stored intact."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gateway.store import Database, MessageLog

sys.path.insert(0, str(Path(__file__).parent))
from crash_writer import make

ROOT = Path(__file__).resolve().parents[2]
WRITER = Path(__file__).with_name("crash_writer.py")


def run_and_kill(path: Path, appenders: int, acks_before_kill: int) -> list[tuple[int, int, int]]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, str(WRITER), str(path), str(appenders)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert proc.stdout is not None
    try:
        assert proc.stdout.readline() == b"ready\n", proc.stderr.read() if proc.stderr else ""
        lines: list[bytes] = []
        deadline = time.monotonic() + 60
        while len(lines) < acks_before_kill and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
        os.kill(proc.pid, signal.SIGKILL)  # mid-stream: appends are in flight right now
        rest, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, err
    lines += rest.splitlines(keepends=True)
    acked = [line.split() for line in lines if line.endswith(b"\n")]  # a torn last line is ignored
    assert len(acked) >= acks_before_kill, err
    return [(int(seq), int(first), int(count)) for seq, first, count in acked]


@pytest.mark.slow
@pytest.mark.parametrize(("appenders", "acks"), [(1, 300), (50, 3000), (200, 20000)])
async def test_every_acknowledged_append_survives_kill_9(
    tmp_path: Path, appenders: int, acks: int
) -> None:
    path = tmp_path / "crash.sqlite"
    acked = run_and_kill(path, appenders, acks)

    db = Database(path)
    await db.open()
    log = MessageLog(db)
    await log.open()
    top = max(seq for seq, _first, _count in acked)
    assert log.last_seq >= top
    stored = {e.seq: e for e in await log.read(0, limit=log.last_seq + 1)}
    for seq, first, count in acked:
        for offset in range(count):
            entry = stored.get(seq - count + 1 + offset)
            assert entry is not None, f"acknowledged seq {seq - count + 1 + offset} lost"
            want = make(first + offset)
            assert (entry.kind, entry.device_id, entry.module_id) == (
                want.kind,
                want.device_id,
                want.module_id,
            )
            assert (entry.enqueued_ms, entry.props, entry.body) == (
                want.enqueued_ms,
                want.props,
                want.body,
            )
    # the log goes on after the crash, without reusing a seq
    assert await log.append([make(0)]) == log.last_seq > top
    await db.close()
