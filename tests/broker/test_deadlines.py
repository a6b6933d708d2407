"""The deadline wheel (gateway.broker.deadlines) on a real event loop: each owner is told at
its deadline, at most one tick late and never early; re-arming moves it, cancel forgets it,
and an owner that arms itself again from its callback is told again."""

from __future__ import annotations

import asyncio
import time

from gateway.broker.deadlines import Deadlines


class Owner:
    def __init__(self, wheel: Deadlines, deadline: float, again: float | None = None) -> None:
        self.deadline_slot: int | None = None
        self.wheel = wheel
        self.deadline = deadline
        self.again = again
        self.told: list[float] = []

    def deadline_reached(self) -> None:
        self.told.append(time.monotonic())
        if self.again is not None:
            self.deadline, self.again = self.deadline + self.again, None
            self.wheel.arm(self, self.deadline)


async def test_owners_are_told_at_their_deadlines_at_most_a_tick_late() -> None:
    tick = 0.05
    wheel = Deadlines(tick)
    now = time.monotonic()
    owners = [Owner(wheel, now + delay) for delay in (0.3, 0.02, 0.15, 0.15, 0.4)]
    moved = Owner(wheel, now + 0.1)
    cancelled = Owner(wheel, now + 0.05)
    again = Owner(wheel, now + 0.05, again=0.1)
    for owner in [*owners, moved, cancelled, again]:
        wheel.arm(owner, owner.deadline)
    moved.deadline = now + 0.25
    wheel.arm(moved, moved.deadline)  # replaces its first deadline
    wheel.cancel(cancelled)
    assert len(wheel) == 7
    await asyncio.sleep(0.6)
    for owner in [*owners, moved]:
        assert len(owner.told) == 1
        assert owner.deadline <= owner.told[0] < owner.deadline + tick + 0.05
    assert cancelled.told == []
    assert len(again.told) == 2 and again.told[1] >= again.deadline
    assert len(wheel) == 0 and all(o.deadline_slot is None for o in owners)


async def test_an_earlier_deadline_moves_the_timer_forward() -> None:
    wheel = Deadlines(0.05)
    now = time.monotonic()
    late, early = Owner(wheel, now + 5), Owner(wheel, now + 0.05)
    wheel.arm(late, late.deadline)
    wheel.arm(early, early.deadline)
    await asyncio.sleep(0.2)
    assert len(early.told) == 1 and late.told == []
    wheel.close()
    assert late.deadline_slot is None
