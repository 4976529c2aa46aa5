"""Checkpoints: the atomic pickle-free file format, the store, and resuming a JobRunner."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fedcell.controllers import FedAvg
from fedcell.controllers.fedopt import FedAdam
from fedcell.engine.checkpoint import CheckpointStore, read_checkpoint, write_checkpoint
from fedcell.engine.dispatcher import Controller, ControllerContext, Task
from fedcell.engine.job import Job
from fedcell.engine.job_runner import JobRunner
from fedcell.engine.local_dispatcher import LocalDispatcher, SiteHandler
from fedcell.engine.scheduler import (
    CancelNode,
    JobDone,
    JobResumed,
    JobStarted,
    JobState,
    NodeFinished,
    NodeSpec,
    NodeState,
    Scheduler,
    StartNode,
)
from fedcell.errors import CheckpointError, ConfigError, JobError
from fedcell.fl_model import FLModel, ParamsType

SITES = ("site-1", "site-2")


# ---------------------------------------------------------------------------------- file format


def test_round_trip_of_numpy_torch_and_wire_types(tmp_path: Path) -> None:
    # Prepare
    value = {
        "round": 3,
        "history": [{"round": 0, "metrics": {"loss": 0.5}, "ok": ["site-1"]}],
        "pair": (1, "two"),
        "params": {
            "w": np.arange(12, dtype=np.float64).reshape(3, 4),
            "mask": np.array([True, False]),
            "empty": np.zeros((0, 5), dtype=np.float32),
        },
        "tensors": {"t": torch.linspace(-1, 1, 7), "bf16": torch.ones(3, dtype=torch.bfloat16)},
        "model": FLModel(params={"b": np.full(2, 7.5)}, params_type=ParamsType.FULL),
    }
    path = tmp_path / "state.ckpt"
    # Execute
    write_checkpoint(path, value)
    back = read_checkpoint(path)
    # Assert
    assert back["round"] == 3 and back["history"] == value["history"] and back["pair"] == (1, "two")
    for name, array in value["params"].items():
        assert back["params"][name].dtype == array.dtype
        np.testing.assert_array_equal(back["params"][name], array)
    assert torch.equal(back["tensors"]["t"], value["tensors"]["t"])
    assert back["tensors"]["bf16"].dtype == torch.bfloat16
    assert isinstance(back["model"], FLModel) and back["model"].params_type is ParamsType.FULL
    np.testing.assert_array_equal(back["model"].params["b"], np.full(2, 7.5))
    back["params"]["w"] += 1  # arrays come back writable
    assert not path.read_bytes().count(b"pickle")


def test_unencodable_state_is_refused_and_the_old_file_stays(tmp_path: Path) -> None:
    path = tmp_path / "state.ckpt"
    write_checkpoint(path, {"round": 1})
    with pytest.raises(
        CheckpointError, match=r"cannot checkpoint to .*state\.ckpt.*payload\['f'\]"
    ):
        write_checkpoint(path, {"f": object()})
    assert read_checkpoint(path) == {"round": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["state.ckpt"]


def test_a_crash_before_the_rename_leaves_the_old_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: a good checkpoint, then a write that dies between fsync and rename
    path = tmp_path / "state.ckpt"
    write_checkpoint(path, {"round": 1, "w": np.ones(1000)})

    def power_cut(src: str, dst: str) -> None:
        raise OSError("power cut")

    monkeypatch.setattr(os, "replace", power_cut)
    # Execute
    with pytest.raises(CheckpointError, match="power cut"):
        write_checkpoint(path, {"round": 2, "w": np.zeros(1000)})
    monkeypatch.undo()
    # Assert: the old checkpoint is intact and no temporary file is left
    back = read_checkpoint(path)
    assert back["round"] == 1
    np.testing.assert_array_equal(back["w"], np.ones(1000))
    assert [p.name for p in tmp_path.iterdir()] == ["state.ckpt"]


def test_a_write_killed_halfway_leaves_a_temporary_that_loading_sweeps(tmp_path: Path) -> None:
    # Prepare: a job checkpoint, then the torn temporary file a SIGKILL mid-write leaves behind
    store = CheckpointStore(tmp_path / "checkpoint")
    snapshot = _finished_snapshot()
    store.save_job("job-1", snapshot)
    whole = store.job_file.read_bytes()
    torn = store.folder / ".job.ckpt.abc123.tmp"
    torn.write_bytes(whole[: len(whole) // 2])
    # Execute
    loaded = CheckpointStore(store.folder).load_job("job-1", ["a"])
    # Assert
    assert loaded is not None and loaded["outputs"] == {"a": 42}
    assert not torn.exists()


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        (lambda data: data[:-3], "the file has .* bytes but its header describes"),
        (lambda data: data[:10], "10 bytes is too short for a checkpoint header"),
        (lambda data: b"NOTACKPT" + data[8:], "not a fedcell checkpoint"),
        (lambda data: data[:-1] + bytes([data[-1] ^ 0xFF]), "frame 0's digest does not match"),
        (
            lambda data: data[:30] + bytes([data[30] ^ 0xFF]) + data[31:],
            "the header's digest does not match",
        ),
        (lambda data: data + b"x", "the file has .* bytes but its header describes"),
    ],
    ids=["truncated", "stub", "foreign", "flipped-array-bit", "flipped-header-bit", "trailing"],
)
def test_torn_or_corrupt_files_raise_a_clear_error(
    tmp_path: Path, damage: Callable[[bytes], bytes], problem: str
) -> None:
    path = tmp_path / "state.ckpt"
    write_checkpoint(path, {"w": np.arange(64, dtype=np.float64)})
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(CheckpointError, match=rf"checkpoint .*state\.ckpt is corrupt: {problem}"):
        read_checkpoint(path)


# ---------------------------------------------------------------------------------- the store


def _finished_snapshot() -> dict[str, Any]:
    return {
        "min_sites": 1,
        "job": {
            "state": "finished",
            "started_at": 10.0,
            "finished_at": 12.0,
            "live_sites": ["site-1"],
            "forced_end": None,
            "reason": None,
        },
        "nodes": [
            {
                "name": "a",
                "upstream": [],
                "timeout": None,
                "state": "finished",
                "started_at": 10.0,
                "finished_at": 12.0,
                "error": None,
            }
        ],
        "outputs": {"a": 42},
    }


def test_store_refuses_a_checkpoint_of_another_job(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    store.save_job("job-1", _finished_snapshot())
    with pytest.raises(CheckpointError, match="belongs to job 'job-1' with nodes \\['a'\\]"):
        store.load_job("job-2", ["a"])
    with pytest.raises(CheckpointError, match="not to job 'job-1' with nodes \\['a', 'b'\\]"):
        store.load_job("job-1", ["a", "b"])


def test_store_reports_a_missing_output_and_keeps_durations(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    store.save_job("job-1", _finished_snapshot())
    loaded = store.load_job("job-1", ["a"])
    assert loaded is not None
    node = loaded["nodes"][0]
    assert node["finished_at"] - node["started_at"] == pytest.approx(2.0)
    store.output_file("a").unlink()
    with pytest.raises(CheckpointError, match="of finished node 'a' is missing"):
        store.load_job("job-1", ["a"])


def test_store_without_checkpoints_loads_nothing(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "never-written")
    assert store.load_job("job-1", ["a"]) is None
    assert store.load_node("a") is None


# ---------------------------------------------------------------------------------- resume


@dataclass
class Counter(Controller):
    """Counts ``steps`` steps, checkpointing after each; records where each run started."""

    steps: int
    log: list[tuple[str, int]]
    block_at: int | None = None

    async def run(self, ctx: ControllerContext) -> Any:
        step = 0 if ctx.restored is None else ctx.restored["step"]
        self.log.append((ctx.node, step))
        base = sum(ctx.inputs.values())
        while step < self.steps:
            if step == self.block_at:
                await asyncio.Event().wait()  # the server "dies" here
            step += 1
            await ctx.checkpoint({"step": step})
        return base + step


def _counter_job(log: list[tuple[str, int]], block_at: int | None) -> Job:
    job = Job("chain")
    job.add(Counter(2, log), name="first")
    job.add(Counter(5, log, block_at=block_at), name="second", after=["first"])
    job.add(Counter(1, log), name="third", after=["second"])
    return job


async def _run_until_blocked(runner: JobRunner, log: list[tuple[str, int]]) -> None:
    """Run ``runner`` until node ``second`` blocks, then kill it (cancel, as a crash would)."""
    running = asyncio.create_task(runner.run())
    while not any(node == "second" for node, _ in log):
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running


def test_resume_skips_finished_nodes_and_restarts_running_ones(tmp_path: Path) -> None:
    # Prepare: a crashed run of first → second → third, dead in second's step 3
    store = CheckpointStore(tmp_path / "checkpoint")
    dispatcher = LocalDispatcher(dict.fromkeys(SITES, lambda site, task: None))
    crashed_log: list[tuple[str, int]] = []
    crashed = JobRunner(
        _counter_job(crashed_log, block_at=3), dispatcher, job_id="chain-1", checkpoint=store
    )
    asyncio.run(_run_until_blocked(crashed, crashed_log))
    # Execute
    resumed_log: list[tuple[str, int]] = []
    resumed = JobRunner(
        _counter_job(resumed_log, block_at=None),
        dispatcher,
        job_id="chain-1",
        checkpoint=CheckpointStore(store.folder),
        resume=True,
    )
    result = asyncio.run(resumed.run())
    # Assert: first is not rerun, second goes on from step 3, third starts afresh
    assert crashed_log == [("first", 0), ("second", 0)]
    assert resumed_log == [("second", 3), ("third", 0)]
    assert result.ok and result.output("first") == 2
    assert result.output("second") == 7 and result.output("third") == 8
    assert all(node.duration is not None and node.duration >= 0 for node in result.nodes.values())


def test_resuming_a_finished_job_reruns_nothing(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    dispatcher = LocalDispatcher(dict.fromkeys(SITES, lambda site, task: None))
    first_log: list[tuple[str, int]] = []
    first = asyncio.run(
        JobRunner(_counter_job(first_log, None), dispatcher, job_id="c", checkpoint=store).run()
    )
    again_log: list[tuple[str, int]] = []
    again = JobRunner(
        _counter_job(again_log, None), dispatcher, job_id="c", checkpoint=store, resume=True
    )
    result = asyncio.run(again.run())
    assert first.ok and result.ok and again_log == []
    assert result.output("third") == first.output("third") == 8


def test_resume_without_a_checkpoint_starts_afresh_and_a_fresh_run_clears_it(
    tmp_path: Path,
) -> None:
    # Prepare: stale files of an earlier run
    store = CheckpointStore(tmp_path)
    store.save_node("second", {"step": 4})
    dispatcher = LocalDispatcher(dict.fromkeys(SITES, lambda site, task: None))
    log: list[tuple[str, int]] = []
    # Execute
    runner = JobRunner(
        _counter_job(log, None), dispatcher, job_id="c", checkpoint=store, resume=True
    )
    result = asyncio.run(runner.run())
    # Assert
    assert result.ok and log == [("first", 0), ("second", 0), ("third", 0)]
    assert store.load_job("c", ["first", "second", "third"]) is not None


def test_failed_node_stays_failed_on_resume(tmp_path: Path) -> None:
    @dataclass
    class Boom(Controller):
        async def run(self, ctx: ControllerContext) -> Any:
            raise ValueError("bad config")

    job = Job("boom")
    job.add(Boom(), name="boom")
    store = CheckpointStore(tmp_path)
    dispatcher = LocalDispatcher(dict.fromkeys(SITES, lambda site, task: None))
    first = asyncio.run(JobRunner(job, dispatcher, job_id="b", checkpoint=store).run())
    again = asyncio.run(JobRunner(job, dispatcher, job_id="b", checkpoint=store, resume=True).run())
    assert first.state is again.state is JobState.FAILED
    assert again.nodes["boom"].state is NodeState.FAILED
    assert again.reason == first.reason and "bad config" in (again.reason or "")


def test_resume_needs_a_store_and_refuses_a_foreign_checkpoint(tmp_path: Path) -> None:
    dispatcher = LocalDispatcher(dict.fromkeys(SITES, lambda site, task: None))
    log: list[tuple[str, int]] = []
    with pytest.raises(ConfigError, match="resume=True needs a checkpoint store"):
        JobRunner(_counter_job(log, None), dispatcher, resume=True)
    store = CheckpointStore(tmp_path)
    asyncio.run(JobRunner(_counter_job(log, None), dispatcher, job_id="c", checkpoint=store).run())
    other = Job("other")
    other.add(Counter(1, log), name="only")
    with pytest.raises(CheckpointError, match="belongs to job 'c'"):
        asyncio.run(JobRunner(other, dispatcher, job_id="c", checkpoint=store, resume=True).run())


def test_an_output_that_cannot_be_checkpointed_stops_the_run(tmp_path: Path) -> None:
    @dataclass
    class Opaque(Controller):
        async def run(self, ctx: ControllerContext) -> Any:
            return object()

    job = Job("opaque")
    job.add(Opaque(), name="opaque")
    job.add(Counter(1, []), name="after", after=["opaque"])
    store = CheckpointStore(tmp_path)
    runner = JobRunner(
        job, LocalDispatcher(dict.fromkeys(SITES, lambda site, task: None)), checkpoint=store
    )
    with pytest.raises(CheckpointError, match=r"outputs/opaque\.ckpt: .*object"):
        asyncio.run(runner.run())
    assert not store.output_file("opaque").exists()


# ---------------------------------------------------------------------------------- ScatterGather


def _train(site: str, task: Task) -> FLModel:
    """Deterministic, non-linear local training that differs per site and round."""
    model = task.data
    shift = 0.25 if site == "site-1" else -0.5
    params = {
        name: np.tanh(value * 1.1 + shift + 0.01 * model.current_round)
        for name, value in model.params.items()
    }
    steps = 3 if site == "site-1" else 5
    return FLModel(
        params=params,
        metrics={"loss": float(abs(params["w"]).sum())},
        meta={"NUM_STEPS_CURRENT_ROUND": steps},
    )


@dataclass
class TrainAnswers:
    """The executor binding job validation asks for; LocalDispatcher's handlers do the work."""

    @property
    def task_names(self) -> tuple[str, ...]:
        return ("train",)


def _fedadam_job() -> Job:
    job = Job("adam")
    initial = {"w": np.linspace(-1, 1, 6).reshape(2, 3), "b": np.zeros(3)}
    job.add(FedAdam(rounds=6, initial_params=initial, server_lr=0.1), name="train")
    job.add_executor(TrainAnswers())
    return job


def test_fedadam_resumed_mid_job_ends_with_the_uninterrupted_model(tmp_path: Path) -> None:
    # Prepare: the reference run, and a run whose sites hang in round 4 (the "crash")
    reference = asyncio.run(
        JobRunner(_fedadam_job(), LocalDispatcher(dict.fromkeys(SITES, _train))).run()
    )
    calls: list[int] = []

    async def hang_in_round_4(site: str, task: Task) -> FLModel:
        calls.append(task.data.current_round)
        if task.data.current_round == 3:
            await asyncio.Event().wait()
        return _train(site, task)

    store = CheckpointStore(tmp_path)
    handlers: dict[str, SiteHandler] = dict.fromkeys(SITES, hang_in_round_4)

    async def crash() -> None:
        running = asyncio.create_task(
            JobRunner(_fedadam_job(), LocalDispatcher(handlers), job_id="a", checkpoint=store).run()
        )
        while calls.count(3) < 2:
            await asyncio.sleep(0.01)
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running

    asyncio.run(crash())
    # Execute
    resumed = asyncio.run(
        JobRunner(
            _fedadam_job(),
            LocalDispatcher(dict.fromkeys(SITES, _train)),
            job_id="a",
            checkpoint=store,
            resume=True,
        ).run()
    )
    # Assert: bitwise the same model (two sites: each sum has two terms, order-free)
    want, got = reference.output("train"), resumed.output("train")
    for name in ("w", "b"):
        np.testing.assert_array_equal(got.params[name], want.params[name])
    assert got.meta["resumed_at"] == [3]
    assert [record["round"] for record in got.meta["history"]] == list(range(6))
    assert got.current_round == want.current_round == 5


def test_early_stopped_node_resumed_from_its_last_checkpoint_does_not_train_again() -> None:
    trained: list[int] = []

    def learn(site: str, task: Task) -> FLModel:
        trained.append(task.data.current_round)
        return FLModel(params=task.data.params, metrics={"accuracy": 0.9})

    saved: dict[str, Any] = {}

    async def keep(state: Any) -> None:
        saved["state"] = state

    controller = FedAvg(rounds=5, initial_params={"w": [0.0]}, stop_when=("accuracy", ">=", 0.5))
    dispatcher = LocalDispatcher(dict.fromkeys(SITES, learn))
    first = asyncio.run(
        controller.run(ControllerContext("j", "train", dispatcher, checkpointer=keep))
    )
    again = asyncio.run(
        controller.run(ControllerContext("j", "train", dispatcher, restored=saved["state"]))
    )
    assert trained == [0, 0]
    assert first.meta["stopped_early"] and again.meta["stopped_early"]
    assert again.current_round == first.current_round == 0
    assert again.meta["resumed_at"] == [1]


def test_a_restored_state_that_is_not_scatter_gather_is_refused() -> None:
    controller = FedAvg(rounds=2, initial_params={"w": [0.0]})
    ctx = ControllerContext(
        "j", "train", LocalDispatcher(dict.fromkeys(SITES, _train)), restored={"step": 1}
    )
    with pytest.raises(CheckpointError, match="node 'train': its checkpoint is not a scatter"):
        asyncio.run(controller.run(ctx))


_WRITER = """
import sys
import numpy as np
from fedcell.engine.checkpoint import write_checkpoint

for i in range(1, 10_000):
    write_checkpoint(sys.argv[1], {"i": i, "w": np.full(1_000_000, float(i))})
    print(i, flush=True)
"""


@pytest.mark.integration
def test_sigkill_while_writing_never_leaves_a_torn_checkpoint(tmp_path: Path) -> None:
    # Prepare: a process rewriting an 8 MB checkpoint in a loop
    path = tmp_path / "state.ckpt"
    writer = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(path)], stdout=subprocess.PIPE, text=True
    )
    assert writer.stdout is not None
    try:
        done = [int(writer.stdout.readline()) for _ in range(3)]
        time.sleep(random.uniform(0.0, 0.05))
        # Execute
        writer.send_signal(signal.SIGKILL)
    finally:
        writer.wait()
        writer.stdout.close()
    # Assert: the last completed write or the one after it, whole
    back = read_checkpoint(path)
    assert back["i"] >= done[-1]
    np.testing.assert_array_equal(back["w"], np.full(1_000_000, float(back["i"])))


# ---------------------------------------------------------------------------------- scheduler


def _mid_job_scheduler() -> Scheduler:
    """a → b and a → c, with a finished and b, c running; rebuilt from its snapshot."""
    scheduler = Scheduler([NodeSpec("a"), NodeSpec("b", ("a",), 5.0), NodeSpec("c", ("a",))])
    scheduler.handle(JobStarted(SITES, 0.0))
    scheduler.handle(NodeFinished("a", "model-a", 1.0))
    return Scheduler.from_snapshot(scheduler.snapshot())


def test_job_resumed_restarts_running_nodes_with_their_inputs_and_clock() -> None:
    scheduler = _mid_job_scheduler()
    commands = scheduler.handle(JobResumed(SITES, 100.0))
    assert commands == [StartNode("b", {"a": "model-a"}), StartNode("c", {"a": "model-a"})]
    assert scheduler.next_deadline() == 105.0  # b's time limit starts again
    assert scheduler.handle(NodeFinished("b", 1, 101.0)) == []
    assert scheduler.handle(NodeFinished("c", 2, 102.0)) == [JobDone(JobState.FINISHED)]


def test_job_resumed_with_too_few_sites_crashes_and_needs_a_started_job() -> None:
    scheduler = _mid_job_scheduler()
    commands = scheduler.handle(JobResumed((), 100.0))
    assert [type(command) for command in commands] == [CancelNode, CancelNode, JobDone]
    assert scheduler.job_state is JobState.CRASHED
    assert scheduler.handle(JobResumed(SITES, 101.0)) == [
        JobDone(JobState.CRASHED, scheduler.job_reason)
    ]
    with pytest.raises(JobError, match="whose job never started"):
        Scheduler([NodeSpec("a")]).handle(JobResumed(SITES, 0.0))
