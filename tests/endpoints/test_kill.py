"""kill -9 of a process running the manager: nothing acknowledged is lost to the endpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.endpoints.peers import Mosquitto, Subscriber
from tests.endpoints.test_files import read_jsonl
from tests.endpoints.test_mqtt_endpoint import first_occurrences

ROOT = Path(__file__).resolve().parents[2]


class Proc:
    def __init__(self, db: Path, spec: dict[str, object]) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.endpoints.endpoint_proc", str(db), json.dumps(spec)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
        assert self.expect("ready")

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def expect(self, word: str) -> str:
        assert self.proc.stdout is not None
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise AssertionError(f"process ended before {word!r}")
            if line.startswith(word):
                return line.strip()

    def health(self) -> dict[str, object]:
        self.send("health")
        return json.loads(self.expect("health ").split(" ", 1)[1])  # type: ignore[no-any-return]

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)


def wait_for(check, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


@pytest.mark.slow
def test_kill_while_broker_down_loses_nothing(tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path / "broker", persist=True)
    broker.start()
    sub = Subscriber(broker.port, client_id="kill-sub").start()
    spec = {"type": "mqtt", "url": broker.url, "topic": "k/{deviceId}", "envelope": "json"}
    db = tmp_path / "hub.db"
    try:
        first = Proc(db, spec)
        first.send("append d1 0 20")
        first.expect("acked")
        wait_for(lambda: len(sub.messages) >= 20, 20, "the first 20")
        broker.stop()
        first.send("append d1 20 30")  # acknowledged (committed) while the broker is down
        first.expect("acked")
        wait_for(lambda: first.health()["healthStatus"] == "unhealthy", 20, "unhealthy")
        first.kill()
        broker.start()
        second = Proc(db, spec)
        try:
            wait_for(lambda: len({m.payload for m in sub.messages}) >= 50, 30, "all 50")
            wait_for(lambda: second.health()["backlog"] == 0, 20, "no backlog")
        finally:
            second.kill()
        seen = [(json.loads(m.payload)["body"]["device"], json.loads(m.payload)["body"]["i"])
                for m in sub.messages]
        assert first_occurrences(seen) == {"d1": list(range(50))}
    finally:
        sub.stop()
        broker.stop()


@pytest.mark.slow
def test_kill_while_writing_files_loses_and_repeats_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    spec = {"type": "file", "path": str(out), "rollBytes": 20000}
    db = tmp_path / "hub.db"
    acked: set[int] = set()
    for _round in range(5):
        proc = Proc(db, spec)
        proc.send("flood")
        target = len(acked) + 150
        while len(acked) < target:
            acked.add(int(proc.expect("acked ").split()[1]) + 100000 * _round)
        proc.kill()  # mid-write, most likely: the endpoint keeps up with the flood
        # The next round numbers its records from 0 again: offset them apart.
    proc = Proc(db, spec)
    try:
        wait_for(lambda: proc.health()["backlog"] == 0, 30, "the file endpoint caught up")
    finally:
        proc.kill()
    lines = read_jsonl(out)
    seqs = [line["systemProperties"]["x-opt-sequence-number"] for line in lines]
    assert seqs == sorted(set(seqs)), "a line is repeated or out of order"
    assert seqs == list(range(1, len(seqs) + 1)), "a line is missing"
    numbered = {line["body"]["i"] + 100000 * r for r, line in _rounds(lines)}
    assert acked <= numbered


def _rounds(lines: list[dict[str, object]]):  # type: ignore[no-untyped-def]
    """Which round wrote each line: the record numbers restart at 0 each round."""
    r, last = 0, -1
    for line in lines:
        i = line["body"]["i"]  # type: ignore[index]
        if i <= last:
            r += 1
        last = i
        yield r, line
