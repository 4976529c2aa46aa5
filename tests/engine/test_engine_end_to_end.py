"""The engine pieces together: a DAG of real FedAvg nodes with NumpyExecutors, run by the
JobRunner over the in-memory dispatcher, before and after a trip through a job folder."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedcell.controllers.scatter_gather import FedAvg
from fedcell.engine.dispatcher import Task
from fedcell.engine.job import Job
from fedcell.engine.job_runner import JobResult, JobRunner
from fedcell.engine.local_dispatcher import LocalDispatcher
from fedcell.engine.scheduler import JobState
from fedcell.executors.numpy_executor import NumpyExecutor
from fedcell.fl_model import FLModel

SITES = ("site-1", "site-2", "site-3")


def add_one(params: dict[str, np.ndarray], config: dict[str, Any]) -> Any:
    """Local training stand-in: every site moves each weight up by one."""
    return {name: value + 1 for name, value in params.items()}, {"loss": 0.5}, 10


def build_job() -> Job:
    job = Job("two-stage", min_sites=2)
    warmup = job.add(FedAvg(rounds=1, initial_params={"w": [0.0, 0.0]}), name="warmup")
    job.add(FedAvg(rounds=2), name="main", after=[warmup])
    job.add(FedAvg(rounds=1, initial_params={"w": [10.0]}), name="side")
    job.add_executor(NumpyExecutor(train=add_one))
    return job


def run_on_sites(job: Job) -> JobResult:
    """Run ``job`` with each site answering through the executors the job binds to it."""

    async def handle(site: str, task: Task) -> Any:
        return await job.executors_for(site)[task.name].execute(task)

    dispatcher = LocalDispatcher(dict.fromkeys(SITES, handle))
    return asyncio.run(JobRunner(job, dispatcher).run())


def test_a_two_stage_fedavg_dag_passes_the_model_downstream() -> None:
    # Execute
    result = run_on_sites(build_job())

    # Assert: warmup (1 round) then main (2 rounds) continue from the same model
    assert result.state is JobState.FINISHED, result.reason
    warmup, main, side = (result.output(name) for name in ("warmup", "main", "side"))
    assert isinstance(main, FLModel)
    np.testing.assert_allclose(warmup.params["w"], [1.0, 1.0])
    np.testing.assert_allclose(main.params["w"], [3.0, 3.0])
    np.testing.assert_allclose(side.params["w"], [11.0])


@pytest.mark.parametrize("format", ["json", "yaml", "toml"])
def test_a_job_loaded_from_its_folder_runs_the_same(
    format: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    monkeypatch.setattr(sys, "path", list(sys.path))  # Job.load adds custom/ to sys.path
    build_job().export(tmp_path / "job", format=format)

    # Execute
    result = run_on_sites(Job.load(tmp_path / "job"))

    # Assert
    assert result.state is JobState.FINISHED, result.reason
    np.testing.assert_allclose(result.output("main").params["w"], [3.0, 3.0])
