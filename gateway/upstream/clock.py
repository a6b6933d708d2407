"""Ages of stored messages by the monotonic clock and a boot id, never by the wall clock.

A board without an RTC boots in 1970 and jumps when NTP answers: a TTL on the wall clock then
expires the whole queue at once or keeps it forever (edgeHub does exactly that, federation.md
§0.1 fact 8). Instead the forwarder records, while it runs, checkpoints ``(log seq, boot id,
monotonic time)`` (every message up to ``seq`` was stored by then) and each boot's latest
monotonic time. A message's age is the running time since its checkpoint: in the same boot
``now - mono``; across reboots what was left of its boot after the checkpoint, plus the running
time of every later boot. The time the box was off is not known without an RTC and is not
counted, so a TTL never expires a message early. Pure apart from :func:`boot_id`.
"""

from __future__ import annotations

import bisect
import uuid
from pathlib import Path

_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")

Checkpoint = tuple[int, str, float]  # seq, boot, mono
BootRow = tuple[str, int, float]  # boot, order, latest mono


def boot_id() -> str:
    try:
        return _BOOT_ID.read_text().strip()
    except OSError:  # not Linux: every start counts as a boot (ages only lose the off time)
        return f"process-{uuid.uuid4()}"


class AgeClock:
    def __init__(self, boot: str, checkpoints: list[Checkpoint], boots: list[BootRow]) -> None:
        self.boot = boot
        rows = sorted(checkpoints)
        self._seqs = [r[0] for r in rows]
        self._rows = rows
        ordered = sorted(boots, key=lambda b: b[1])
        self._boots = [b[0] for b in ordered]
        self._last = {b[0]: b[2] for b in ordered}

    def start(self, last_seq: int, now: float) -> list[Checkpoint]:
        """At start: messages stored after the last checkpoint of an earlier run are dated at
        the end of the most recent earlier boot (else: now). Returns rows to store."""
        out = []
        if not self._rows or last_seq > self._rows[-1][0]:
            previous = next((b for b in reversed(self._boots) if b != self.boot), None)
            if self.boot in self._last:  # an earlier run in this very boot
                row = (last_seq, self.boot, self._last[self.boot])
            elif previous is not None:
                row = (last_seq, previous, self._last[previous])
            else:
                row = (last_seq, self.boot, now)
            self._append(row)
            out.append(row)
        return out

    def _append(self, row: Checkpoint) -> None:
        self._rows.append(row)
        self._seqs.append(row[0])

    def checkpoint(self, seq: int, now: float) -> tuple[Checkpoint | None, BootRow]:
        """Everything up to ``seq`` exists at ``now``: the checkpoint to store (None if the log
        has not moved) and this boot's row."""
        if self.boot not in self._last:
            self._boots.append(self.boot)
        self._last[self.boot] = now
        row = None
        if not self._rows or seq > self._rows[-1][0]:
            row = (seq, self.boot, now)
            self._append(row)
        return row, (self.boot, self._boots.index(self.boot), now)

    def age(self, seq: int, now: float) -> float:
        """Seconds the box has been running since message ``seq`` was stored (0 if it is newer
        than every checkpoint)."""
        i = bisect.bisect_left(self._seqs, seq)
        if i == len(self._seqs):
            return 0.0
        _, boot, mono = self._rows[i]
        if boot == self.boot:
            return max(0.0, now - mono)
        age = max(0.0, self._last.get(boot, mono) - mono)
        start = self._boots.index(boot) + 1 if boot in self._boots else 0
        for later in self._boots[start:]:
            if later != self.boot:
                age += self._last[later]
        return age + now

    def prune(self, floor: int) -> int:
        """Forget checkpoints below every message still queued; returns the first seq kept."""
        i = max(0, bisect.bisect_left(self._seqs, floor + 1) - 1)
        del self._rows[:i]
        del self._seqs[:i]
        return self._seqs[0] if self._seqs else 0
