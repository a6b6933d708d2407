"""One scheduler per physical bus: timing, ordering and per-unit circuit breakers. Pure.

A serial Modbus line is half duplex with one master: every request on it, to whichever unit,
waits for the previous transaction to end. Peers that schedule per unit instead of per line
collide or let one dead slave stall the rest (see reference/peers.md §3 item 3). Here a
:class:`BusSchedule` owns every polling job of one line, picks the most overdue one whose
unit may be asked, and keeps a :class:`Breaker` per unit so that a unit that stopped answering
costs one timeout per back-off period instead of one per poll.

Timing (Modbus over Serial Line V1.02 §2.5.1.1): frames are separated by at least 3.5
character times; a character is 11 bits (start, 8 data, parity or a second stop bit, stop).
Above 19200 baud the spec fixes the inter-frame delay at 1.750 ms.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum

from hw.modbus.registers import Block, Table

BITS_PER_CHAR = 11  # Modbus over Serial Line §2.5.1: 1 start + 8 data + parity + 1 stop
FIXED_GAP_ABOVE_19200 = 0.00175  # §2.5.1.1: t3.5 = 1.750 ms for baud rates > 19200


def char_time(baud: int) -> float:
    """Seconds one character occupies the line."""
    return BITS_PER_CHAR / baud


def frame_gap(baud: int) -> float:
    """The minimum silence between frames (t3.5), §2.5.1.1."""
    return FIXED_GAP_ABOVE_19200 if baud > 19200 else 3.5 * char_time(baud)


READ_REQUEST_BYTES = 8  # unit, function, address (2), quantity (2), CRC (2): §6.1-6.4 + §2.5.1


def read_response_bytes(table: Table, count: int) -> int:
    """RTU bytes of a read response: unit, function, byte count, data, CRC (2)."""
    data = math.ceil(count / 8) if table.is_bits else 2 * count
    return 5 + data


def transaction_time(baud: int, request_bytes: int, response_bytes: int) -> float:
    """Shortest possible time of one transaction on the line: both frames, each followed by
    the t3.5 silence that delimits it (slave turnaround taken as zero)."""
    return (request_bytes + response_bytes) * char_time(baud) + 2 * frame_gap(baud)


def max_utilisation(baud: int, request_bytes: int, response_bytes: int) -> float:
    """The theoretical ceiling of bytes-on-the-wire time over elapsed time."""
    wire = (request_bytes + response_bytes) * char_time(baud)
    return wire / transaction_time(baud, request_bytes, response_bytes)


# ---------------------------------------------------------------------------------------------
# Circuit breaker


class Outcome(StrEnum):
    OK = "ok"
    EXCEPTION = "exception"  # the unit answered with a Modbus exception: it is alive
    TIMEOUT = "timeout"  # no answer (or a corrupt one): counts against the unit
    LINK = "link"  # the bus itself failed: nobody's fault but the line's


class UnitState(StrEnum):
    UNKNOWN = "unknown"
    UP = "up"
    DOWN = "down"


class Transition(StrEnum):
    UP = "up"  # first successful answer
    DOWN = "down"
    RECOVERED = "recovered"


@dataclass(frozen=True, slots=True, kw_only=True)
class BreakerConfig:
    """``threshold`` consecutive failures open the breaker; it then lets one probe through
    after ``backoff`` seconds, doubling up to ``max_backoff`` while probes fail."""

    threshold: int = 3
    backoff: float = 1.0
    max_backoff: float = 60.0


@dataclass(slots=True)
class Breaker:
    config: BreakerConfig
    state: UnitState = UnitState.UNKNOWN
    failures: int = 0
    backoff: float = 0.0
    retry_at: float = 0.0

    def allows(self, now: float) -> bool:
        return self.state is not UnitState.DOWN or now >= self.retry_at

    def success(self) -> Transition | None:
        previous = self.state
        self.state, self.failures, self.backoff = UnitState.UP, 0, 0.0
        if previous is UnitState.DOWN:
            return Transition.RECOVERED
        return Transition.UP if previous is UnitState.UNKNOWN else None

    def failure(self, now: float) -> Transition | None:
        self.failures += 1
        if self.state is UnitState.DOWN:  # a failed probe
            self.backoff = min(self.backoff * 2, self.config.max_backoff)
            self.retry_at = now + self.backoff
            return None
        if self.failures < self.config.threshold:
            return None
        self.state = UnitState.DOWN
        self.backoff = min(self.config.backoff, self.config.max_backoff)
        self.retry_at = now + self.backoff
        return Transition.DOWN


# ---------------------------------------------------------------------------------------------
# The bus schedule


@dataclass(frozen=True, slots=True)
class JobSpec:
    """What to poll: one device's blocks that share one interval."""

    device: str
    unit: int
    interval: float
    blocks: tuple[Block, ...]

    @property
    def key(self) -> tuple[str, float]:
        return (self.device, self.interval)


@dataclass(slots=True)
class Job:
    spec: JobSpec
    due: float
    runs: int = 0
    overruns: int = 0  # times the job fell a whole interval behind (the bus is too busy)


@dataclass(slots=True)
class BusSchedule:
    """Earliest-deadline-first over every job of one bus, gated by per-unit breakers."""

    breaker: BreakerConfig = field(default_factory=BreakerConfig)
    jobs: dict[tuple[str, float], Job] = field(default_factory=dict)
    breakers: dict[int, Breaker] = field(default_factory=dict)

    def set_jobs(self, specs: Iterable[JobSpec], now: float) -> None:
        """Replace the job set. Jobs whose spec is unchanged keep their deadlines; new ones
        are due now. Breakers of units that remain keep their state."""
        old, self.jobs = self.jobs, {}
        for spec in specs:
            kept = old.get(spec.key)
            if kept is not None and kept.spec == spec:
                self.jobs[spec.key] = kept
            else:
                self.jobs[spec.key] = Job(spec, due=kept.due if kept else now)
        units = {j.spec.unit for j in self.jobs.values()}
        self.breakers = {u: b for u, b in self.breakers.items() if u in units}
        for u in units:
            self.breakers.setdefault(u, Breaker(self.breaker))

    def unit(self, unit: int) -> Breaker:
        return self.breakers.setdefault(unit, Breaker(self.breaker))

    def _effective_due(self, job: Job) -> float:
        b = self.breakers[job.spec.unit]
        return max(job.due, b.retry_at) if b.state is UnitState.DOWN else job.due

    def next_job(self, now: float) -> Job | None:
        """The job to run now, or None when nothing is due."""
        best: Job | None = None
        best_due = math.inf
        for job in self.jobs.values():
            due = self._effective_due(job)
            if due <= now and due < best_due:
                best, best_due = job, due
        return best

    def wait_time(self, now: float) -> float | None:
        """Seconds until the next job is due (0 if one is), None without jobs."""
        if not self.jobs:
            return None
        return max(0.0, min(self._effective_due(j) for j in self.jobs.values()) - now)

    def finish(self, job: Job, outcome: Outcome, now: float) -> Transition | None:
        """Record a run's outcome; returns the unit's state transition, if any."""
        if outcome is Outcome.LINK:
            return None  # the bus reconnects; the job stays due
        job.runs += 1
        breaker = self.unit(job.spec.unit)
        interval = job.spec.interval
        job.due += interval
        if job.due <= now - interval:  # a whole interval behind: resynchronise
            if breaker.state is not UnitState.DOWN:  # (a held-back dead unit is not late)
                job.overruns += 1
            job.due = now
        if outcome is Outcome.TIMEOUT:
            return breaker.failure(now)
        return breaker.success()

    def record(self, unit: int, outcome: Outcome, now: float) -> Transition | None:
        """Record the outcome of a transaction that was not a polling job (a write)."""
        if outcome is Outcome.LINK:
            return None
        breaker = self.unit(unit)
        return breaker.failure(now) if outcome is Outcome.TIMEOUT else breaker.success()
