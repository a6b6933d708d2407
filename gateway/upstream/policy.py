"""Queue policy of one upstream route (edgeHub's ``priority`` and ``timeToLiveSecs`` of the
route model, plus a byte cap, a policy when full, a bandwidth cap and the live-first lane;
federation.md §0.1 facts 6-9). Pure.

The forwarder takes ``policy_of(route) -> RoutePolicy``; until the route table carries these
per route, every route gets the one built from ``[upstream]`` (:func:`from_config`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from gateway.config import UpstreamConfig

DEFAULT_ROUTE = "$upstream"
"""The route name of IoT Edge's default ``FROM /messages/* INTO $upstream``."""

WhenFull = Literal["reject-new", "drop-oldest", "thin"]


@dataclass(frozen=True, slots=True, kw_only=True)
class RoutePolicy:
    priority: int = 0  # 0 is the highest class; classes share the link by weight
    ttl: float = 0.0  # seconds of monotonic age after which a message is dropped; 0 = never
    max_bytes: int = 0  # backlog byte cap of the route; 0 = none beyond the store's own
    when_full: WhenFull = "drop-oldest"
    thin_interval: float = 60.0  # "thin": keep one message per origin per this many seconds
    bandwidth: int = 0  # bytes/s over the link for this route; 0 = unlimited
    pack: bool = False  # the backlog: many readings of one origin per message of <= 4 KB
    live_first: bool = False  # new messages go ahead of the backlog (backlog.py, segments)

    def __post_init__(self) -> None:
        if not 0 <= self.priority <= 9:
            raise ValueError(f"priority must be 0..9, not {self.priority}")

    @property
    def weight(self) -> int:
        """Share of the link: each class gets twice the next lower one (never zero)."""
        return 1 << (9 - self.priority)


class ByteBucket:
    """Bytes per second with a burst of one second's worth (at least one 4 KB message)."""

    def __init__(self, rate: int, clock: Callable[[], float]) -> None:
        self.rate = rate
        self.burst = max(rate, 4096)
        self.tokens = float(self.burst)
        self.clock = clock
        self.stamp = clock()

    def take(self, size: int) -> bool:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= min(size, self.burst):
            self.tokens -= size
            return True
        return False


class Pacer:
    """The routes' bandwidth caps on one link (a connection, or all of identity mode's): one
    :class:`ByteBucket` per capped route. ``paced`` holds the routes that ran out of bytes in
    this turn of the sending loop, for the backlog to skip until :meth:`turn`."""

    def __init__(self, policy_of: Callable[[str], RoutePolicy],
                 clock: Callable[[], float]) -> None:
        self._policy_of = policy_of
        self._clock = clock
        self._buckets: dict[str, ByteBucket] = {}
        self.paced: set[str] = set()

    def turn(self) -> None:
        """A new turn of the sending loop: every route may try again."""
        self.paced.clear()

    def admit(self, route: str, size: int) -> bool:
        """Whether ``size`` bytes of ``route`` may go now (paid for if so); a route that may
        not joins :attr:`paced`."""
        rate = self._policy_of(route).bandwidth
        if not rate:
            return True
        bucket = self._buckets.get(route)
        if bucket is None:
            bucket = self._buckets[route] = ByteBucket(rate, self._clock)
        if bucket.take(size):
            return True
        self.paced.add(route)
        return False

    def charge(self, route: str, size: int) -> None:
        """Pay for ``size`` more bytes of ``route`` sent with what :meth:`admit` let through
        (the other readings of a pack)."""
        bucket = self._buckets.get(route)
        if bucket is not None:
            bucket.tokens -= size


def from_config(cfg: UpstreamConfig) -> RoutePolicy:
    return RoutePolicy(priority=cfg.priority, ttl=cfg.ttl, max_bytes=cfg.max_bytes,
                       when_full=cfg.when_full, thin_interval=cfg.thin_interval,
                       bandwidth=cfg.bandwidth, pack=cfg.pack, live_first=cfg.live_first)


def default_select(kind: str) -> str | None:
    """``FROM /messages/* INTO $upstream``: device and module telemetry, nothing else."""
    return DEFAULT_ROUTE if kind == "telemetry" else None
