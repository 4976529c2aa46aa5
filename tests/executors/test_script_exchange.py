"""ScriptExchange: the executor-side state both ScriptRunner modes share, with the task queue of
each (LoopExchange: taken on the loop; ThreadExchange: taken by the script's thread)."""

from __future__ import annotations

import asyncio
import logging

import numpy as np
import pytest

from fedcell.engine.dispatcher import Task
from fedcell.errors import ConfigError, RequestTimeoutError, SiteCrashedError, TaskFailedError
from fedcell.executors.script_protocol import (
    LoopExchange,
    ScriptExchange,
    ScriptResult,
    ScriptTask,
    ThreadExchange,
)
from fedcell.fl_model import FLModel

KINDS = [LoopExchange, ThreadExchange]


@pytest.fixture(params=KINDS, ids=lambda kind: kind.__name__)
def kind(request: pytest.FixtureRequest) -> type[ScriptExchange]:
    return request.param  # type: ignore[no-any-return]


def make(kind: type[ScriptExchange]) -> ScriptExchange:
    return kind("script train.py", logging.getLogger("fedcell.test"))  # type: ignore[abstract]


async def next_task(ex: ScriptExchange) -> ScriptTask | None:
    """What the script takes next: on the loop (LoopExchange) or on a thread (ThreadExchange)."""
    if isinstance(ex, LoopExchange):
        return await ex.next_task()
    assert isinstance(ex, ThreadExchange)
    return await asyncio.to_thread(ex.take, 5.0)


def test_a_task_goes_to_the_script_and_its_result_comes_back(kind: type[ScriptExchange]) -> None:
    async def main() -> FLModel:
        ex = make(kind)
        running = asyncio.create_task(ex.run_task(Task("train", FLModel(params={"w": np.ones(1)}))))
        taken = await next_task(ex)
        assert taken is not None and taken.name == "train"
        ex.submit(ScriptResult(taken.task_id, FLModel(metrics={"acc": 1.0})))
        return await running

    assert asyncio.run(main()).metrics == {"acc": 1.0}


def test_a_cancelled_task_is_skipped_and_its_late_result_dropped(
    kind: type[ScriptExchange], caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> str:
        ex = make(kind)
        cancelled = asyncio.create_task(ex.run_task(Task("train", FLModel(current_round=0))))
        await asyncio.sleep(0)
        cancelled.cancel()
        await asyncio.gather(cancelled, return_exceptions=True)
        ex.submit(ScriptResult("no-such-task", FLModel()))
        running = asyncio.create_task(ex.run_task(Task("train", FLModel(current_round=1))))
        taken = await next_task(ex)
        assert taken is not None and taken.model.current_round == 1  # round 0 was skipped
        ex.submit(ScriptResult(taken.task_id, FLModel(current_round=1)))
        await running
        return caplog.text

    assert "no longer awaited" in asyncio.run(main())


def test_failure_fails_awaited_and_later_tasks_with_the_traceback(
    kind: type[ScriptExchange],
) -> None:
    async def main() -> None:
        ex = make(kind)
        running = asyncio.create_task(ex.run_task(Task("train", FLModel())))
        await asyncio.sleep(0)
        ex.fail("Traceback ...\nKeyError: 'x'\n")
        ex.script_ended("raised")
        with pytest.raises(TaskFailedError, match="KeyError: 'x'"):
            await running
        with pytest.raises(TaskFailedError, match="KeyError: 'x'"):
            await ex.run_task(Task("validate", FLModel()))

    asyncio.run(main())


def test_an_ended_script_crashes_awaited_and_later_tasks(kind: type[ScriptExchange]) -> None:
    async def main() -> None:
        ex = make(kind)
        running = asyncio.create_task(ex.run_task(Task("train", FLModel())))
        await asyncio.sleep(0)
        ex.script_ended("exited with code 137")
        with pytest.raises(
            SiteCrashedError, match="exited with code 137 without answering task 'train'"
        ):
            await running
        with pytest.raises(SiteCrashedError):
            await ex.run_task(Task("train", FLModel()))
        assert ex.finished

    asyncio.run(main())


def test_close_ends_the_script_loop_for_every_caller(kind: type[ScriptExchange]) -> None:
    async def main() -> None:
        ex = make(kind)
        ex.close()
        assert await next_task(ex) is None
        assert await next_task(ex) is None

    asyncio.run(main())


def test_task_data_must_be_a_model_or_nothing(kind: type[ScriptExchange]) -> None:
    async def main() -> None:
        ex = make(kind)
        with pytest.raises(ConfigError, match="carries list"):
            await ex.run_task(Task("train", [1, 2]))

    asyncio.run(main())


def test_a_script_thread_waiting_for_a_task_times_out() -> None:
    async def main() -> None:
        ex = ThreadExchange("script train.py", logging.getLogger("fedcell.test"))
        with pytest.raises(RequestTimeoutError, match=r"no task arrived within 0\.05 s"):
            await asyncio.to_thread(ex.take, 0.05)

    asyncio.run(main())
