"""MessageLog against a plain in-memory model: random appends, clock steps, cursor moves,
prunes (retention and byte-cap eviction) and reopens must leave the same contents, stats and
cursors as the model says."""

from __future__ import annotations

import asyncio
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.store import Database, Entry, MessageLog, Record

RETENTION_S = 100
MAX_BYTES = 1500
CURSORS = ("$upstream", "module/in", "events/$Default")  # the last one does not pin


@dataclass
class Model:
    now: float = 1_700_000_000.0
    last_seq: int = 0
    entries: dict[int, Entry] = field(default_factory=dict)
    cursors: dict[str, tuple[int, bool]] = field(default_factory=dict)
    dropped: int = 0

    @property
    def bytes(self) -> int:
        return sum(len(e.body) + len(e.props) for e in self.entries.values())

    def floor(self) -> int:
        pins = [seq for seq, pin in self.cursors.values() if pin]
        return min(pins, default=self.last_seq)

    def prune(self) -> None:
        cutoff = int((self.now - RETENTION_S) * 1000)
        for seq in sorted(self.entries):
            if seq > min(self.floor(), self.last_seq) or self.entries[seq].enqueued_ms >= cutoff:
                break
            del self.entries[seq]
        if self.bytes > MAX_BYTES:
            target = MAX_BYTES * 9 // 10
            floor = self.floor()
            for seq in sorted(self.entries):
                if self.bytes <= target:
                    break
                del self.entries[seq]
                self.dropped += seq > floor


append_op = st.tuples(
    st.just("append"),
    st.lists(
        st.tuples(st.integers(0, 400), st.sampled_from(["telemetry", "lifecycle"])),
        max_size=6,
    ),
)
advance_op = st.tuples(st.just("advance"), st.integers(1, 80))
cursor_op = st.tuples(st.just("cursor"), st.sampled_from(CURSORS), st.floats(0, 1, allow_nan=False))
ops = st.lists(
    st.one_of(append_op, advance_op, cursor_op, st.just(("prune",)), st.just(("reopen",))),
    max_size=40,
)


async def check(log: MessageLog, model: Model) -> None:
    assert await log.read(0, limit=10_000) == [model.entries[s] for s in sorted(model.entries)]
    stats = log.stats()
    first = min(model.entries, default=None)
    assert (stats.count, stats.bytes, stats.last_seq, stats.first_seq) == (
        len(model.entries),
        model.bytes,
        model.last_seq,
        first,
    )
    assert stats.oldest_enqueued_ms == (model.entries[first].enqueued_ms if first else None)
    assert stats.dropped_total.get("byte-cap", 0) == model.dropped
    assert await log.cursors() == {name: seq for name, (seq, _) in model.cursors.items()}


async def scenario(path: Path, steps: list[tuple[object, ...]]) -> None:
    model = Model()

    def clock() -> float:
        return model.now

    async def opened() -> tuple[Database, MessageLog]:
        db = Database(path, synchronous="normal")
        await db.open()
        log = MessageLog(db, retention_s=RETENTION_S, max_bytes=MAX_BYTES, clock=clock)
        await log.open()
        return db, log

    db, log = await opened()
    counter = 0
    for step in steps:
        match step:
            case ("append", specs):
                records = []
                for size, kind in specs:  # type: ignore[attr-defined]
                    counter += 1
                    records.append(
                        Record(
                            kind,
                            f"dev{counter % 4}",
                            None,
                            int(model.now * 1000),
                            f'{{"n":{counter}}}',
                            bytes([counter % 256]) * size,
                        )
                    )
                assert await log.append(records) == model.last_seq + len(records)
                for r in records:
                    model.last_seq += 1
                    model.entries[model.last_seq] = Entry(
                        model.last_seq,
                        r.kind,
                        r.device_id,
                        r.module_id,
                        r.enqueued_ms,
                        r.props,
                        r.body,
                    )
            case ("advance", seconds):
                model.now += seconds  # type: ignore[operator]
            case ("cursor", name, fraction):
                seq = int(model.last_seq * fraction)  # type: ignore[operator]
                pin = name != "events/$Default"
                await log.set_cursor(name, seq, pin=pin)  # type: ignore[arg-type]
                model.cursors[name] = (seq, pin)  # type: ignore[index]
            case ("prune",):
                await log.prune()
                model.prune()
            case ("reopen",):
                await db.close()
                db, log = await opened()
        await check(log, model)
    await db.close()


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops)
def test_message_log_matches_the_model(steps: list[tuple[object, ...]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(scenario(Path(tmp) / "model.sqlite", steps))
