"""One event-loop timer for the deadlines of every connection (connect timeout, keep-alive,
SAS token expiry), instead of a timer handle per connection.

A timer handle and its callback cost about 600 bytes per idle connection; here a connection
is one entry in the set of its deadline's slot (``tick`` seconds wide), and the loop holds one
timer, set for the earliest slot. A deadline fires at most ``tick`` late. Deadlines move
lazily: traffic does not re-arm anything; when a slot fires, each owner checks its actual
deadline and arms itself again if it moved (as a keep-alive timer re-armed on expiry would).
"""

from __future__ import annotations

import asyncio
import heapq
import math
import time
from typing import Final, Protocol

TICK: Final = 0.5
"""Width of a slot in seconds: how late a deadline may fire."""


class Owner(Protocol):
    """What a deadline belongs to: it remembers its slot, and is told when the slot is due."""

    deadline_slot: int | None

    def deadline_reached(self) -> None: ...


class Deadlines:
    """Owners grouped by the slot of their next deadline, on ``time.monotonic``'s clock."""

    __slots__ = ("_heap", "_slots", "_tick", "_timer", "_timer_slot")

    def __init__(self, tick: float = TICK) -> None:
        self._tick = tick
        self._slots: dict[int, set[Owner]] = {}
        self._heap: list[int] = []  # the keys of _slots, earliest first
        self._timer: asyncio.TimerHandle | None = None
        self._timer_slot = 0

    def __len__(self) -> int:
        return sum(len(owners) for owners in self._slots.values())

    def arm(self, owner: Owner, deadline: float) -> None:
        """Call ``owner.deadline_reached()`` at ``deadline`` (at most one tick later);
        replaces the owner's earlier deadline."""
        slot = math.ceil(deadline / self._tick)
        old = owner.deadline_slot
        if old == slot:
            return
        if old is not None:
            self._discard(owner, old)
        owners = self._slots.get(slot)
        if owners is None:
            owners = self._slots[slot] = set()
            heapq.heappush(self._heap, slot)
            if self._timer is None or slot < self._timer_slot:
                self._schedule(slot)
        owners.add(owner)
        owner.deadline_slot = slot

    def cancel(self, owner: Owner) -> None:
        slot = owner.deadline_slot
        if slot is not None:
            self._discard(owner, slot)
            owner.deadline_slot = None

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for owners in self._slots.values():
            for owner in owners:
                owner.deadline_slot = None
        self._slots.clear()
        self._heap.clear()

    def _discard(self, owner: Owner, slot: int) -> None:
        owners = self._slots.get(slot)
        if owners is not None:
            owners.discard(owner)
            # An emptied slot stays until it is due (its key is in the heap once, and a
            # deadline armed into it again does not push it twice).

    def _schedule(self, slot: int) -> None:
        if self._timer is not None:
            self._timer.cancel()
        loop = asyncio.get_running_loop()
        delay = slot * self._tick - time.monotonic()
        self._timer = loop.call_later(max(delay, 0.0), self._fire)
        self._timer_slot = slot

    def _fire(self) -> None:
        self._timer = None
        due = math.floor(time.monotonic() / self._tick)
        heap = self._heap
        slots = self._slots
        while heap and heap[0] <= due:
            owners = slots.pop(heapq.heappop(heap))
            for owner in owners:
                owner.deadline_slot = None
            for owner in owners:
                owner.deadline_reached()  # may arm itself again, into a later slot
        if heap and self._timer is None:
            self._schedule(heap[0])
