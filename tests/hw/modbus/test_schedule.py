"""Per-bus scheduling, frame timing and circuit breakers (hw/modbus/schedule.py)."""

from __future__ import annotations

import pytest

from hw.modbus.registers import Block, Table
from hw.modbus.schedule import (
    Breaker,
    BreakerConfig,
    BusSchedule,
    JobSpec,
    Outcome,
    Transition,
    UnitState,
    frame_gap,
    max_utilisation,
    read_response_bytes,
    transaction_time,
)

BLOCK = (Block(Table.HOLDING, 0, 10, ()),)


def spec(device: str, unit: int, interval: float = 1.0) -> JobSpec:
    return JobSpec(device, unit, interval, BLOCK)


@pytest.mark.parametrize(("baud", "gap_ms"), [
    (2400, 16.0417), (9600, 4.0104), (19200, 2.0052), (38400, 1.75), (115200, 1.75)])
def test_gap_is_3_5_characters_of_11_bits_and_fixed_above_19200(baud: int,
                                                                 gap_ms: float) -> None:
    assert frame_gap(baud) * 1000 == pytest.approx(gap_ms, abs=1e-4)


def test_frame_sizes_and_theoretical_ceiling() -> None:
    assert read_response_bytes(Table.HOLDING, 10) == 25
    assert read_response_bytes(Table.COIL, 10) == 7
    # 8 + 25 bytes on the wire, plus two t3.5 silences: 33 / (33 + 7) characters
    assert max_utilisation(19200, 8, 25) == pytest.approx(33 / 40)
    assert transaction_time(19200, 8, 25) == pytest.approx(40 * 11 / 19200)
    # above 19200 the fixed 1.75 ms gap costs relatively more
    assert max_utilisation(115200, 8, 25) < max_utilisation(19200, 8, 25)


def test_breaker_opens_after_threshold_and_backs_off_exponentially() -> None:
    b = Breaker(BreakerConfig(threshold=3, backoff=1.0, max_backoff=4.0))
    assert b.success() is Transition.UP
    assert b.failure(10.0) is None and b.failure(10.5) is None
    assert b.failure(11.0) is Transition.DOWN
    assert b.state is UnitState.DOWN and b.retry_at == 12.0
    assert not b.allows(11.9) and b.allows(12.0)
    assert b.failure(12.0) is None and b.retry_at == 14.0  # failed probe: 2 s
    assert b.failure(14.0) is None and b.retry_at == 18.0  # 4 s
    assert b.failure(18.0) is None and b.retry_at == 22.0  # capped at 4 s
    assert b.success() is Transition.RECOVERED
    assert b.state is UnitState.UP and b.allows(0.0) and b.failures == 0


def test_a_unit_dead_from_the_start_goes_down_without_ever_being_up() -> None:
    b = Breaker(BreakerConfig(threshold=1))
    assert b.failure(0.0) is Transition.DOWN


def test_earliest_deadline_first_across_units() -> None:
    s = BusSchedule()
    s.set_jobs([spec("a", 1, 1.0), spec("b", 2, 0.5)], now=0.0)
    order = []
    now = 0.0
    while now < 2.0:
        job = s.next_job(now)
        if job is None:
            now += s.wait_time(now) or 0.0
            continue
        order.append((round(now, 2), job.spec.device))
        s.finish(job, Outcome.OK, now)
    assert order == [(0.0, "a"), (0.0, "b"), (0.5, "b"), (1.0, "a"), (1.0, "b"), (1.5, "b")]


def test_a_down_unit_is_held_until_its_retry_time() -> None:
    s = BusSchedule(breaker=BreakerConfig(threshold=1, backoff=5.0))
    s.set_jobs([spec("dead", 3, 1.0), spec("live", 1, 1.0)], now=0.0)
    job = s.next_job(0.0)
    assert job is not None and job.spec.device == "dead"
    assert s.finish(job, Outcome.TIMEOUT, 0.3) is Transition.DOWN
    for t in (0.3, 1.0, 2.0, 4.9):
        job = s.next_job(t)
        while job is not None:
            assert job.spec.device == "live"
            s.finish(job, Outcome.OK, t)
            job = s.next_job(t)
    assert s.wait_time(4.9) == pytest.approx(0.1)  # the live job at 5.0; the dead one waits
    live = s.next_job(5.3)
    assert live is not None and live.spec.device == "live"  # due 5.0: earlier than 5.0 + hold
    s.finish(live, Outcome.OK, 5.3)
    probe = s.next_job(5.3)
    assert probe is not None and probe.spec.device == "dead"
    assert s.breakers[3].retry_at == 5.3
    assert s.finish(probe, Outcome.OK, 5.3) is Transition.RECOVERED
    assert probe.overruns == 0  # being held back is not being late


def test_an_exception_answer_proves_the_unit_alive() -> None:
    s = BusSchedule(breaker=BreakerConfig(threshold=1))
    s.set_jobs([spec("a", 1)], now=0.0)
    job = s.next_job(0.0)
    assert job is not None
    assert s.finish(job, Outcome.EXCEPTION, 0.0) is Transition.UP


def test_a_link_failure_neither_blames_the_unit_nor_moves_the_deadline() -> None:
    s = BusSchedule(breaker=BreakerConfig(threshold=1))
    s.set_jobs([spec("a", 1)], now=0.0)
    job = s.next_job(0.0)
    assert job is not None
    assert s.finish(job, Outcome.LINK, 0.1) is None
    assert job.due == 0.0 and s.breakers[1].state is UnitState.UNKNOWN


def test_set_jobs_keeps_deadlines_of_unchanged_jobs_and_breakers_of_kept_units() -> None:
    s = BusSchedule(breaker=BreakerConfig(threshold=1, backoff=30.0))
    s.set_jobs([spec("a", 1, 10.0), spec("b", 2, 10.0)], now=0.0)
    for _ in range(2):
        job = s.next_job(0.0)
        assert job is not None
        s.finish(job, Outcome.TIMEOUT if job.spec.unit == 2 else Outcome.OK, 0.0)
    s.set_jobs([spec("a", 1, 10.0), spec("b", 2, 10.0), spec("c", 3, 10.0)], now=1.0)
    assert s.jobs[("a", 10.0)].due == 10.0  # unchanged
    assert s.jobs[("c", 10.0)].due == 1.0  # new: due now
    assert s.breakers[2].state is UnitState.DOWN  # kept
    s.set_jobs([spec("a", 1, 10.0)], now=2.0)
    assert set(s.breakers) == {1}


def test_a_job_a_whole_interval_late_is_counted_and_resynchronised() -> None:
    s = BusSchedule()
    s.set_jobs([spec("a", 1, 1.0)], now=0.0)
    job = s.next_job(0.0)
    assert job is not None
    s.finish(job, Outcome.OK, 0.5)
    assert (job.due, job.overruns) == (1.0, 0)
    s.finish(job, Outcome.OK, 3.5)  # ran at 3.5, two slots behind
    assert (job.due, job.overruns) == (3.5, 1)


def simulate(breaker: BreakerConfig, *, seconds: float = 60.0) -> dict[str, int]:
    """A 19200-baud line: live units answer in 5 ms, unit 3 never answers (0.3 s timeout);
    all are polled every 0.2 s. Returns the polls that got an answer, per device."""
    s = BusSchedule(breaker=breaker)
    s.set_jobs([spec("live1", 1, 0.2), spec("live2", 2, 0.2), spec("dead", 3, 0.2)], now=0.0)
    now, answered = 0.0, {"live1": 0, "live2": 0, "dead": 0}
    gap = frame_gap(19200)
    while now < seconds:
        job = s.next_job(now)
        if job is None:
            now += s.wait_time(now) or 0.0
            continue
        dead = job.spec.unit == 3
        now += 0.3 if dead else 0.005
        s.finish(job, Outcome.TIMEOUT if dead else Outcome.OK, now)
        answered[job.spec.device] += 0 if dead else 1
        now += gap
    return answered


def test_a_dead_unit_does_not_slow_its_neighbours() -> None:
    expected = 60.0 / 0.2
    with_breaker = simulate(BreakerConfig(threshold=3, backoff=1.0, max_backoff=60.0))
    assert with_breaker["live1"] >= 0.98 * expected
    assert with_breaker["live2"] >= 0.98 * expected
    # The control: without a breaker the dead unit's timeouts eat the line.
    without = simulate(BreakerConfig(threshold=10**6))
    assert without["live1"] < 0.75 * expected
