"""gateway.tasks: the task owner and the cancel checkpoint."""

from __future__ import annotations

import asyncio

import pytest

from gateway.tasks import TaskSet, checkpoint
from tests import waiting


async def answer_over_cancel(answer: asyncio.Future[int]) -> int:
    """What 3.11's ``asyncio.wait_for`` does when the result and a cancel come together."""
    try:
        return await asyncio.shield(answer)
    except asyncio.CancelledError:
        return await answer


async def test_a_loop_with_a_checkpoint_stops_after_a_dropped_cancel() -> None:
    answers: asyncio.Queue[asyncio.Future[int]] = asyncio.Queue()

    async def loop(check: bool) -> int:
        turns = 0
        while turns < 2:
            if check:
                checkpoint()
            answer: asyncio.Future[int] = asyncio.get_running_loop().create_future()
            await answers.put(answer)
            await answer_over_cancel(answer)
            turns += 1
        return turns

    for check in (False, True):
        task = asyncio.create_task(loop(check))
        first = await answers.get()
        task.cancel()  # arrives while the answer is awaited ...
        first.set_result(1)  # ... together with it
        if check:
            await waiting.stop(task, within=1)
            assert task.cancelled()
        else:  # without the checkpoint the loop runs on: the cancel was lost
            second = await asyncio.wait_for(answers.get(), 1)
            assert task.cancelling() == 1 and not task.done()
            second.set_result(2)
            assert await task == 2


async def test_checkpoint_passes_when_nothing_asked_the_task_to_stop() -> None:
    checkpoint()
    async with asyncio.timeout(0.01):  # a timeout that lapsed is uncancelled: no stop
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.001):
                await asyncio.sleep(1)
        checkpoint()


async def test_a_task_set_logs_a_failure_and_closes_what_runs(
        caplog: pytest.LogCaptureFixture) -> None:
    tasks = TaskSet()

    async def fail() -> None:
        raise ValueError("boom")

    tasks.spawn(fail(), "failing")
    sleeper = tasks.spawn(asyncio.sleep(60), "sleeping")
    await waiting.eventually(lambda: len(tasks) == 1)
    assert "name=failing" in caplog.text and "boom" in caplog.text
    await tasks.close()
    assert sleeper.cancelled() and len(tasks) == 0

