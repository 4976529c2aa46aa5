"""The simulator and the runtimes over cells: jobs end to end on simulated sites."""

from __future__ import annotations

import asyncio
import csv
import json
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sim_functions import add_one, always_fail  # type: ignore[import-not-found]

from fedcell.controllers import FedAvg
from fedcell.engine.cell_dispatcher import CellDispatcher
from fedcell.engine.dispatcher import Task
from fedcell.engine.job import Job
from fedcell.engine.simulator import simulate, site_names
from fedcell.engine.site_runtime import SiteRuntime
from fedcell.errors import ConfigError
from fedcell.executors.base import Executor
from fedcell.executors.numpy_executor import NumpyExecutor
from fedcell.transports.cell import Cell, CellConfig

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def numpy_job(rounds: int, **fedavg: object) -> Job:
    job = Job("numpy-fedavg")
    job.add(FedAvg(rounds=rounds, initial_params={"w": [[0.0] * 4] * 3}, **fedavg), name="train")  # type: ignore[arg-type]
    job.add_executor(NumpyExecutor(train=add_one), tasks=("train",))
    return job


def test_site_names_and_bad_counts() -> None:
    assert site_names(3) == ["site-1", "site-2", "site-3"]
    with pytest.raises(ConfigError, match="n_clients must be >= 1"):
        site_names(0)


def test_numpy_fedavg_on_threads_writes_results(tmp_path: Path) -> None:
    # Execute
    result = simulate(numpy_job(rounds=4), 3, workspace=tmp_path)
    # Assert
    assert result.ok, result.job.reason
    final = result.job.output("train").params["w"]
    np.testing.assert_array_equal(final, np.full((3, 4), 4.0))
    saved = np.load(result.model_files["train"])
    np.testing.assert_array_equal(saved["w"], final)
    with result.metrics_file.open() as fh:
        rows = list(csv.DictReader(fh))
    assert [(row["round"], row["seen_round"]) for row in rows] == [
        (str(i), f"{i}.0") for i in range(4)
    ]
    summary = json.loads((tmp_path / "result.json").read_text())
    assert summary["state"] == "finished" and summary["nodes"]["train"]["state"] == "finished"
    assert (tmp_path / "job" / "job.json").exists()


def test_thousand_sites_with_a_tiny_model(tmp_path: Path) -> None:
    result = simulate(numpy_job(rounds=2), 1000, workspace=tmp_path)
    assert result.ok, result.job.reason
    np.testing.assert_array_equal(result.job.output("train").params["w"], np.full((3, 4), 2.0))
    assert len(result.job.output("train").meta["history"][-1]["ok"]) == 1000


def test_failing_user_code_is_recorded_and_the_round_proceeds(tmp_path: Path) -> None:
    # Prepare: site-2 runs user code that raises; FedAvg needs 2 of 3.
    job = Job("partly-failing")
    job.add(FedAvg(rounds=2, min_clients=2, initial_params={"w": [0.0, 0.0]}), name="train")
    job.add_executor(NumpyExecutor(train=add_one), tasks=("train",), sites=["site-1", "site-3"])
    job.add_executor(NumpyExecutor(train=always_fail), tasks=("train",), sites=["site-2"])
    # Execute
    result = simulate(job, 3, workspace=tmp_path)
    # Assert
    assert result.ok
    history = result.job.output("train").meta["history"]
    assert all(sorted(record["ok"]) == ["site-1", "site-3"] for record in history)
    dropped = history[0]["dropped"][0]
    assert dropped["site"] == "site-2" and dropped["status"] == "failed"
    assert "bad batch in user code" in dropped["error"]


def test_hello_pytorch_example_trains_with_client_api_scripts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: the example as a user runs it (its folder on sys.path, the job from job.py).
    folder = EXAMPLES / "hello-pytorch"
    monkeypatch.syspath_prepend(str(folder))
    job = runpy.run_path(str(folder / "job.py"), run_name="example")["make_job"](rounds=2)
    # Execute
    result = job.simulate(n_clients=2, workspace=tmp_path)
    # Assert
    assert result.ok, result.job.reason
    state = torch.load(result.model_files["train"], weights_only=True)
    assert set(state) == {f"layers.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")}
    history = result.job.output("train").meta["history"]
    assert [len(record["ok"]) for record in history] == [2, 2]
    assert 0.0 <= history[-1]["metrics"]["accuracy"] <= 1.0
    # Each site's log holds its script's output.
    assert "round 1: accuracy" in (tmp_path / "site-2.log").read_text()
    assert not (folder / "results").exists()  # results go to the workspace, not the example
    sys.modules.pop("model", None)  # the example's module must not leak into other tests


class _HangingExecutor(Executor):
    @property
    def task_names(self) -> tuple[str, ...]:
        return ("train",)

    async def execute(self, task: Task) -> object:
        await asyncio.Event().wait()
        return None


def test_lost_site_is_crashed_not_failed_and_unknown_job_is_refused() -> None:
    async def main() -> None:
        config = CellConfig(heartbeat_interval=0.05, peer_timeout=0.3)
        server = Cell("server", listen="inproc://test-lost-site", config=config)
        await server.start()
        site = Cell("site-1", parent=server.url, config=config)
        await site.start()
        runtime = SiteRuntime(site)
        await runtime.add_job("job-1", {"train": _HangingExecutor()})
        try:
            # A task for a job the site does not run: failed, with the reason.
            other = CellDispatcher(server, "job-2", ["site-1"])
            [refused] = await other.broadcast_and_wait(Task("train"), min_responses=0)
            assert refused.status == "failed" and "does not run job 'job-2'" in str(refused.error)
            # The site dies while working: crashed, promptly.
            dispatcher = CellDispatcher(server, "job-1", ["site-1"])
            handle = dispatcher.broadcast(Task("train"))
            await asyncio.sleep(0.1)
            await runtime.close()
            await site.stop()
            started = asyncio.get_running_loop().time()
            [lost] = [result async for result in handle]
            assert lost.status == "crashed"
            assert asyncio.get_running_loop().time() - started < 2.0
        finally:
            await runtime.close()
            await site.stop()
            await server.stop()

    asyncio.run(main())


@pytest.mark.integration
@pytest.mark.parametrize("transport", ["ipc", "tcp"])
def test_sites_as_real_processes(tmp_path: Path, transport: str) -> None:
    # Execute: each site is a child process that loads the exported job folder.
    result = simulate(
        numpy_job(rounds=3), 2, mode="processes", transport=transport, workspace=tmp_path
    )  # type: ignore[arg-type]
    # Assert
    assert result.ok, result.job.reason
    np.testing.assert_array_equal(result.job.output("train").params["w"], np.full((3, 4), 3.0))
    for site in ("site-1", "site-2"):
        log = (tmp_path / f"{site}.log").read_text()
        assert f"{site}: linked to 'server'" in log


@pytest.mark.integration
def test_hello_pytorch_with_site_processes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = EXAMPLES / "hello-pytorch"
    monkeypatch.syspath_prepend(str(folder))
    job = runpy.run_path(str(folder / "job.py"), run_name="example")["make_job"](rounds=2)
    result = job.simulate(n_clients=2, mode="processes", workspace=tmp_path)
    assert result.ok, result.job.reason
    assert [len(r["ok"]) for r in result.job.output("train").meta["history"]] == [2, 2]
    sys.modules.pop("model", None)
