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


async def stop(task: asyncio.Task[Any], within: float = 10.0) -> None:
    """Cancel ``task`` and wait for it to end; AssertionError if it has not ended after
    ``within`` seconds (it swallowed the cancel), its own exception if it failed. Unlike
    ``suppress(CancelledError): await task``, a cancel of the caller itself is not eaten."""
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=within)
    if not done:
        raise AssertionError(f"task {task.get_name()} did not stop within {within:g} s of a cancel")
    if not task.cancelled() and task.exception() is not None:
        raise task.exception()  # type: ignore[misc]
