"""An owner for short-lived request tasks (a twin write started by a PUBLISH, a C2D pump).

Every task is kept until it ends; a failure is logged with the task's name, never lost; and
:meth:`TaskSet.close` cancels whatever is still running at shutdown. Long-lived services run in
the app's TaskGroup instead; this is for the many small tasks whose failure must not take the
hub down (a TaskGroup cancels all its tasks when one fails).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


def checkpoint() -> None:
    """Raise CancelledError when the current task has been asked to stop. Call it at the top
    of a loop that awaits a library using Python 3.11's ``asyncio.wait_for`` (aiomqtt for its
    acknowledgements, pymodbus for its answers): when the awaited result and a cancel arrive
    together, that ``wait_for`` returns the result and drops the cancel, and the loop would run
    on (and its TaskGroup wait for it) for ever. The request stays counted in
    ``Task.cancelling()``, which only ``uncancel()`` (TaskGroup, ``asyncio.timeout``) lowers."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


class TaskSet:
    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, T], name: str) -> asyncio.Task[T]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("task failed name=%s: %r", task.get_name(), task.exception(),
                      exc_info=task.exception())

    def __len__(self) -> int:
        return len(self._tasks)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
