"""The hub's daily message quota, metered as IoT Hub meters it (ref §13): every telemetry
message counts one unit per started 4 KB (a 200-byte reading is 1, a 5 KB message is 2), the
count restarts at 00:00 UTC. Once the day's units are spent, IoT Hub refuses everything with
403002 until the next UTC day; this hub does the same, visibly: telemetry gets no PUBACK and
new MQTT connections get CONNACK 3 "server unavailable" (MQTT 3.1.1 has no other way to say
it), which a child gateway of ours reads as "paused until 00:00 UTC" rather than a link fault.

Pure: the caller passes the wall-clock time (the quota is a calendar thing, unlike the
forwarder's TTLs). The count lives in memory: a restart of the hub starts the day afresh.
"""

from __future__ import annotations

from gateway.errors import ConfigError

UNIT = 4096
DAY = 86400


def units(size: int) -> int:
    """Quota units of one message of ``size`` bytes (body and properties)."""
    return max(1, -(-size // UNIT))


def next_midnight(now: float) -> float:
    """The next 00:00 UTC after ``now`` (Unix seconds)."""
    return (int(now) // DAY + 1) * DAY


class DailyQuota:
    """``limit`` units per UTC day; 0 means no quota."""

    def __init__(self, limit: int) -> None:
        if limit < 0:
            raise ConfigError("must be 0 (no quota) or more", path="hub.daily_message_quota")
        self.limit = limit
        self.used = 0
        self.full = False  # a charge was refused today: everything is, until 00:00 UTC
        self._day = -1

    def _roll(self, now: float) -> None:
        day = int(now) // DAY
        if day != self._day:
            self._day = day
            self.used = 0
            self.full = False

    def charge(self, count: int, now: float) -> bool:
        """Spend ``count`` units; False (nothing spent) if that would pass the limit."""
        if not self.limit:
            return True
        self._roll(now)
        if self.full or self.used + count > self.limit:
            self.full = True
            return False
        self.used += count
        return True

    def exhausted(self, now: float) -> bool:
        if not self.limit:
            return False
        self._roll(now)
        return self.full or self.used >= self.limit
