"""Waiting in tests for something to become true: one poll loop for every suite."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any


async def eventually(check: Callable[[], Any], timeout: float = 5.0, what: str = "condition",
                     *, interval: float = 0.005, blocking: bool = False) -> Any:
    """Poll ``check()`` until it returns something true, and return that; AssertionError
    naming ``what`` after ``timeout`` seconds. ``blocking``: ``check`` does I/O (an HTTP
    request to the hub), so it runs in a thread."""
    deadline = time.monotonic() + timeout
    while True:
        result = await asyncio.to_thread(check) if blocking else check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(interval)
