"""Messages an endpoint did not get because its enrichments pushed them over the size limit
(IoT Hub ref §10.4; the rule itself is :func:`gateway.hub.messages.enriched`).

One :class:`EnrichedDrops` per hub, shared by every reader that applies enrichments: the
custom endpoints' runners, the built-in ``events`` endpoint's readers (the REST stream,
``monitor-events``) and the module inputs. Each drop is logged once, with the endpoint, the
seq, the device and the size, and counted once per (endpoint, seq), however often the message
is read again: the built-in endpoint has any number of readers, each of which may start again
from the beginning, and a custom endpoint reads a batch again after a failed delivery. The
memory of what was counted is bounded (the last :data:`REMEMBER` drops); a message dropped
again after that many later drops is counted again. ``gateway endpoint health`` and
``/metrics`` (``gateway_messages_dropped{reason="enrichedTooLarge"}``) show the counts.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Final, Protocol

from gateway.errors import MessageTooLargeError
from gateway.hub.messages import format_time

__all__ = ["REASON", "REMEMBER", "EnrichedDrops"]

log = logging.getLogger(__name__)

REASON: Final = "enrichedTooLarge"
"""The drop reason in ``/metrics``."""

REMEMBER: Final = 1024
"""How many (endpoint, seq) drops are remembered so as to be counted and logged once."""


class Dropped(Protocol):
    """What a drop names of the message (a log entry)."""

    @property
    def seq(self) -> int: ...
    @property
    def device_id(self) -> str: ...
    @property
    def module_id(self) -> str | None: ...


class EnrichedDrops:
    """Per endpoint: how many messages were dropped as too large once enriched, and the last."""

    def __init__(self, remember: int = REMEMBER) -> None:
        self.remember = remember
        self.counts: dict[str, int] = {}
        self.last_error: dict[str, str] = {}
        self.last_time: dict[str, float] = {}
        self._seen: dict[tuple[str, int], None] = {}  # insertion order: oldest first

    def drop(self, endpoint: str, entry: Dropped, error: MessageTooLargeError) -> bool:
        """Note that ``endpoint`` does not get ``entry``: logged and counted the first time,
        True then; False for a message already counted (read again)."""
        key = (endpoint, entry.seq)
        if key in self._seen:
            return False
        self._seen[key] = None
        if len(self._seen) > self.remember:
            del self._seen[next(iter(self._seen))]
        device = entry.device_id if entry.module_id is None else \
            f"{entry.device_id}/{entry.module_id}"
        log.warning("endpoint %s: dropped seq=%d device=%s size=%d: over the %d-byte limit once "
                    "enriched (IoT Hub ref §10.4)", endpoint, entry.seq, device, error.size,
                    error.limit)
        self.counts[endpoint] = self.counts.get(endpoint, 0) + 1
        self.last_error[endpoint] = (f"dropped seq {entry.seq} of {device}: {error.size} bytes "
                                     f"enriched, over {error.limit}")
        self.last_time[endpoint] = time.time()
        return True

    def health(self, endpoint: str) -> dict[str, Any]:
        """The fields an endpoint's health row gets from its drops: ``deadLettered`` and, if
        any, ``lastError`` and ``lastErrorTime``."""
        out: dict[str, Any] = {"deadLettered": self.counts.get(endpoint, 0)}
        if endpoint in self.last_error:
            out["lastError"] = self.last_error[endpoint]
            out["lastErrorTime"] = format_time(self.last_time[endpoint])
        return out
