"""JobRunner: controllers run as asyncio tasks, outcomes map to node states, abort and limits."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from fedcell.engine.dispatcher import Controller, ControllerContext, Task, TaskResult
from fedcell.engine.job import Job
from fedcell.engine.job_runner import JobRunner
from fedcell.engine.local_dispatcher import LocalDispatcher
from fedcell.engine.scheduler import JobState, NodeState
from fedcell.errors import (
    ConfigError,
    JobAbortedError,
    JobError,
    SiteCrashedError,
    TaskFailedError,
    TooFewResultsError,
)

SITES = ("site-1", "site-2")


@dataclass
class Fn(Controller):
    """Runs ``body(ctx)`` (async) as the node's algorithm."""

    body: Callable[[ControllerContext], Any]

    async def run(self, ctx: ControllerContext) -> Any:
        return await self.body(ctx)


@dataclass
class Broadcast(Controller):
    """Sends ``task`` to every site and returns the sum of the answers plus its inputs."""

    task: str = "train"

    @property
    def task_names(self) -> tuple[str, ...]:
        return (self.task,)

    async def run(self, ctx: ControllerContext) -> Any:
        base = sum(ctx.inputs.values())
        results = await ctx.dispatcher.broadcast_and_wait(Task(self.task, data=base))
        return sum(result.data for result in results)


@dataclass
class Answers:
    names: tuple[str, ...] = ("train",)

    @property
    def task_names(self) -> tuple[str, ...]:
        return self.names


@dataclass
class Blocker:
    """Controllers that wait until released or cancelled, recording what happened."""

    started: list[str] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    async def __call__(self, ctx: ControllerContext) -> str:
        self.started.append(ctx.node)
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled.append(ctx.node)
            raise
        return ctx.node


def local_dispatcher() -> LocalDispatcher:
    def handler(site: str, task: Task) -> Any:
        return task.data + int(site[-1])

    return LocalDispatcher(dict.fromkeys(SITES, handler))


def make_job(*nodes: tuple[str, Controller, list[str]]) -> Job:
    job = Job("test")
    for name, controller, after in nodes:
        job.add(controller, name=name, after=after)
    job.add_executor(Answers())
    return job


async def constant(value: Any) -> Any:
    return value


def test_outputs_flow_along_edges_through_a_real_dispatcher() -> None:
    # Prepare: init=10 → train (10+1 + 10+2 = 23) → again (23+1 + 23+2 = 49)
    job = make_job(
        ("init", Fn(lambda ctx: constant(10)), []),
        ("train", Broadcast(), ["init"]),
        ("again", Broadcast(), ["train"]),
    )
    runner = JobRunner(job, local_dispatcher(), job_id="job-1")

    # Execute
    result = asyncio.run(runner.run())

    # Assert
    assert result.state is JobState.FINISHED and result.ok
    assert result.job_id == "job-1"
    assert result.output("train") == 23
    assert result.output("again") == 49
    assert [n.state for n in result.nodes.values()] == [NodeState.FINISHED] * 3
    assert all(n.duration is not None and n.duration >= 0 for n in result.nodes.values())
    assert result.nodes["init"].finished_at <= result.nodes["train"].started_at  # type: ignore[operator]
    assert result.duration >= 0
    assert runner.state is JobState.FINISHED
    result.raise_for_state()


def test_context_carries_job_node_inputs_dispatcher_and_a_per_node_workspace(
    tmp_path: Path,
) -> None:
    # Prepare
    seen: dict[str, Any] = {}

    async def inspect(ctx: ControllerContext) -> None:
        seen.update(
            job_id=ctx.job_id, node=ctx.node, inputs=dict(ctx.inputs), workspace=ctx.workspace,
            logger=ctx.logger.name, dispatcher=ctx.dispatcher,
        )  # fmt: skip
        with pytest.raises(TypeError):
            ctx.inputs["a"] = 0  # type: ignore[index]

    job = make_job(("a", Fn(lambda ctx: constant(1)), []), ("b", Fn(inspect), ["a"]))
    dispatcher = local_dispatcher()

    # Execute
    result = asyncio.run(JobRunner(job, dispatcher, job_id="j", workspace=tmp_path).run())

    # Assert
    assert result.ok
    assert seen == {
        "job_id": "j", "node": "b", "inputs": {"a": 1}, "workspace": tmp_path / "b",
        "logger": "fedcell.job.j.b", "dispatcher": dispatcher,
    }  # fmt: skip
    assert (tmp_path / "b").is_dir()


def test_independent_branches_run_concurrently() -> None:
    # Prepare: each branch waits for the other to have started; sequential runs would deadlock
    left_started, right_started = asyncio.Event(), asyncio.Event()

    async def left(ctx: ControllerContext) -> str:
        left_started.set()
        await right_started.wait()
        return "left"

    async def right(ctx: ControllerContext) -> str:
        right_started.set()
        await left_started.wait()
        return "right"

    job = make_job(("left", Fn(left), []), ("right", Fn(right), []))

    # Execute
    result = asyncio.run(asyncio.wait_for(JobRunner(job, local_dispatcher()).run(), 5))

    # Assert
    assert (result.output("left"), result.output("right")) == ("left", "right")


@pytest.mark.parametrize(
    ("error", "node_state", "job_state", "raised"),
    [
        (ValueError("bad lr"), NodeState.FAILED, JobState.FAILED, TaskFailedError),
        (TaskFailedError("site code raised"), NodeState.FAILED, JobState.FAILED, TaskFailedError),
        (SiteCrashedError("all sites gone"), NodeState.CRASHED, JobState.CRASHED, SiteCrashedError),
        (JobAbortedError("gave up"), NodeState.ABORTED, JobState.ABORTED, JobAbortedError),
        (
            TooFewResultsError("1 of 2", [TaskResult("s1", "t"), TaskResult("s2", "t", "crashed")]),
            NodeState.CRASHED, JobState.CRASHED, SiteCrashedError,
        ),
        (
            TooFewResultsError("0 of 2", [TaskResult("s1", "t", "timeout"), TaskResult("s2", "t", "failed")]),
            NodeState.FAILED, JobState.FAILED, TaskFailedError,
        ),
    ],
)  # fmt: skip
def test_controller_exceptions_map_to_node_and_job_states(
    error: Exception, node_state: NodeState, job_state: JobState, raised: type[JobError]
) -> None:
    # Prepare
    async def fail(ctx: ControllerContext) -> None:
        raise error

    job = make_job(("bad", Fn(fail), []), ("after", Fn(lambda ctx: constant(1)), ["bad"]))

    # Execute
    result = asyncio.run(JobRunner(job, local_dispatcher(), job_id="j").run())

    # Assert
    bad = result.nodes["bad"]
    assert (bad.state, result.state) == (node_state, job_state)
    assert bad.exception is error
    assert bad.error == f"{type(error).__name__}: {error}"
    assert result.nodes["after"].state is NodeState.SKIPPED
    assert result.reason == f"node 'bad' {node_state.value}: {bad.error}"
    with pytest.raises(raised, match=f"job 'j' {job_state.value}") as caught:
        result.raise_for_state()
    assert caught.value.__cause__ is error
    with pytest.raises(JobError, match="node 'after' has no output: it skipped"):
        result.output("after")


def test_a_failed_node_lets_an_independent_branch_finish() -> None:
    # Prepare
    gate = asyncio.Event()

    async def fail(ctx: ControllerContext) -> None:
        raise RuntimeError("boom")

    async def slow(ctx: ControllerContext) -> str:
        await asyncio.sleep(0.05)
        gate.set()
        return "done"

    job = make_job(("bad", Fn(fail), []), ("slow", Fn(slow), []))

    # Execute
    result = asyncio.run(JobRunner(job, local_dispatcher()).run())

    # Assert
    assert gate.is_set()
    assert result.state is JobState.FAILED
    assert result.output("slow") == "done"


def test_abort_cancels_running_controllers_and_never_starts_pending_ones() -> None:
    # Prepare
    blocker = Blocker()
    job = make_job(
        ("a", Fn(blocker), []),
        ("b", Fn(blocker), []),
        ("c", Fn(lambda ctx: constant(0)), ["a"]),
    )

    async def main() -> Any:
        runner = JobRunner(job, local_dispatcher())
        running = asyncio.create_task(runner.run())
        while len(blocker.started) < 2:
            await asyncio.sleep(0)
        runner.abort("admin stop")
        return await running

    # Execute
    result = asyncio.run(main())

    # Assert
    assert result.state is JobState.ABORTED
    assert result.reason == "admin stop"
    assert sorted(blocker.cancelled) == ["a", "b"]
    assert {n.state for n in result.nodes.values()} == {NodeState.ABORTED}
    assert result.nodes["c"].started_at is None
    with pytest.raises(JobAbortedError, match="admin stop"):
        result.raise_for_state()


def test_abort_before_run_aborts_before_any_controller_runs() -> None:
    blocker = Blocker()
    runner = JobRunner(make_job(("a", Fn(blocker), [])), local_dispatcher())
    runner.abort()

    result = asyncio.run(runner.run())

    assert result.state is JobState.ABORTED
    assert result.reason == "aborted on request"
    assert blocker.started == []


def test_a_node_past_its_time_limit_is_cancelled_and_failed() -> None:
    # Prepare
    blocker = Blocker()
    job = Job("limits")
    job.add(Fn(blocker), name="slow", timeout=0.05)
    job.add(Fn(lambda ctx: constant(1)), name="next", after=["slow"])

    # Execute
    result = asyncio.run(asyncio.wait_for(JobRunner(job, local_dispatcher()).run(), 5))

    # Assert
    assert blocker.cancelled == ["slow"]
    assert result.state is JobState.FAILED
    assert result.nodes["slow"].error == "node 'slow' exceeded its time limit of 0.05 s"
    assert result.nodes["slow"].duration == pytest.approx(0.05, abs=0.5)
    assert result.nodes["next"].state is NodeState.SKIPPED


def test_losing_sites_below_min_sites_crashes_the_running_job() -> None:
    # Prepare: two sites, min_sites=1
    blocker = Blocker()
    job = make_job(("a", Fn(blocker), []))

    async def main() -> Any:
        runner = JobRunner(job, local_dispatcher())
        running = asyncio.create_task(runner.run())
        while not blocker.started:
            await asyncio.sleep(0)
        runner.site_lost("site-1")
        runner.site_joined("site-1")
        runner.site_lost("site-2")
        await asyncio.sleep(0.02)
        assert runner.state is JobState.RUNNING
        runner.site_lost("site-1")
        return await running

    # Execute
    result = asyncio.run(main())

    # Assert
    assert result.state is JobState.CRASHED
    assert blocker.cancelled == ["a"]
    assert result.nodes["a"].state is NodeState.CRASHED
    with pytest.raises(SiteCrashedError, match="only 0 site"):
        result.raise_for_state()


def test_a_cancellation_from_inside_a_controller_aborts_that_node() -> None:
    async def cancelled_inside(ctx: ControllerContext) -> None:
        raise asyncio.CancelledError

    result = asyncio.run(
        JobRunner(make_job(("a", Fn(cancelled_inside), [])), local_dispatcher()).run()
    )

    assert result.state is JobState.ABORTED
    assert result.nodes["a"].state is NodeState.ABORTED
    assert result.nodes["a"].error == "its run was cancelled"


def test_cancelling_run_cancels_and_awaits_every_node() -> None:
    # Prepare
    blocker = Blocker()
    runner = JobRunner(make_job(("a", Fn(blocker), []), ("b", Fn(blocker), [])), local_dispatcher())

    async def main() -> None:
        running = asyncio.create_task(runner.run())
        while len(blocker.started) < 2:
            await asyncio.sleep(0)
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running
        # nothing of the job is left running on the loop
        assert asyncio.all_tasks() == {asyncio.current_task()}

    # Execute / Assert
    asyncio.run(main())
    assert sorted(blocker.cancelled) == ["a", "b"]


def test_an_invalid_job_raises_config_error_before_anything_runs() -> None:
    blocker = Blocker()
    job = Job("bad")
    job.add(Fn(blocker), name="a")
    job.add(Broadcast("predict"), name="b")  # no executor answers "predict"
    runner = JobRunner(job, local_dispatcher())

    with pytest.raises(ConfigError, match="sends task 'predict'"):
        asyncio.run(runner.run())
    assert blocker.started == []
    assert runner.state is JobState.PENDING


def test_run_can_only_be_called_once() -> None:
    runner = JobRunner(make_job(("a", Fn(lambda ctx: constant(1)), [])), local_dispatcher())

    async def main() -> None:
        await runner.run()
        with pytest.raises(JobError, match="already called"):
            await runner.run()

    asyncio.run(main())


def test_default_job_id_is_the_job_name_plus_a_random_suffix() -> None:
    first = JobRunner(make_job(("a", Fn(lambda ctx: constant(1)), [])), local_dispatcher())
    second = JobRunner(make_job(("a", Fn(lambda ctx: constant(1)), [])), local_dispatcher())
    assert first.job_id.startswith("test-") and len(first.job_id) == len("test-") + 8
    assert first.job_id != second.job_id


def test_time_limits_fire_while_other_nodes_keep_producing_events() -> None:
    # Prepare: a blocked node with a 0.1 s limit next to a chain of 100 nodes of 10 ms each
    blocker = Blocker()

    async def step(ctx: ControllerContext) -> None:
        await asyncio.sleep(0.01)

    job = Job("busy")
    job.add(Fn(blocker), name="slow", timeout=0.1)
    for index in range(100):
        job.add(Fn(step), name=f"step{index}", after=[f"step{index - 1}"] if index else [])

    # Execute
    result = asyncio.run(asyncio.wait_for(JobRunner(job, local_dispatcher()).run(), 30))

    # Assert: the limit fired long before the chain (at least 1 s) ended
    slow = result.nodes["slow"]
    assert slow.state is NodeState.FAILED
    assert slow.duration is not None and slow.duration < 0.6
    assert result.nodes["step99"].state is NodeState.FINISHED
    assert result.nodes["step99"].finished_at > slow.finished_at  # type: ignore[operator]
