"""A whole deployment as real processes on loopback: the server daemon and two site daemons
started as ``start.sh`` does, an admin submitting a numpy FedAvg job that finishes and one that
is aborted."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from daemon_helpers import until
from deploy_helpers import free_port, project_tree, provision_tree
from e2e_functions import add_one, slow_add_one

from fedcell.controllers import FedAvg
from fedcell.deploy.admin import AdminClient
from fedcell.engine.job import Job
from fedcell.errors import PolicyError
from fedcell.executors.numpy_executor import NumpyExecutor

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


def fedavg_job(root: Path, name: str, rounds: int, train: object) -> Path:
    job = Job(name, min_sites=2)
    job.add(FedAvg(rounds=rounds, initial_params={"w": [[0.0] * 4] * 3}), name="train")
    job.add_executor(NumpyExecutor(train=train), tasks=("train",))  # type: ignore[arg-type]
    job.export(root / name)
    return root / name


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[Path]:
    """Provisioned kits, a server daemon and two site daemons as processes; yields the kits."""
    provision_tree(project_tree(port=free_port()), tmp_path)
    kits = tmp_path / "kits"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO),
                                                                     os.environ.get("PYTHONPATH")]))}  # fmt: skip
    processes: list[subprocess.Popen[bytes]] = []
    try:
        for name in ("server", "site-1", "site-2"):
            log = (tmp_path / f"{name}.log").open("wb")
            processes.append(subprocess.Popen(
                [sys.executable, "-m", "fedcell.deploy.participant", str(kits / name)],
                env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path,
            ))  # fmt: skip
            log.close()
        yield kits
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=40)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def processes_of(job_id: str) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        if job_id in (process.info["cmdline"] or []):
            found.append(process)
    return found


def test_a_job_runs_across_daemons_and_an_abort_stops_every_job_process(
    deployment: Path, tmp_path: Path
) -> None:
    async def main() -> None:
        async with AdminClient(deployment / "alice", timeout=60) as admin:
            await until(lambda: _sites_connected(admin), timeout=60)

            # Execute: a short job runs to its end
            info = await admin.submit(fedavg_job(tmp_path / "jobs", "short", 3, add_one))
            await until(lambda: _ended(admin, info.job_id), timeout=120)
            finished = await admin.status(info.job_id)
            folder = await admin.download(info.job_id, tmp_path / "downloads")
            site_log = await admin.logs(info.job_id, site="site-1")

            # Assert
            assert finished.state == "finished", finished.message
            assert finished.sites == {"site-1": "finished", "site-2": "finished"}
            result = json.loads((folder / "results" / "result.json").read_text())
            assert result["state"] == "finished"
            assert (folder / "server.log").stat().st_size > 0
            assert site_log.text

            # Execute / Assert: bob (a member) is refused by both sites' default policy
            with pytest.raises(PolicyError) as refused:
                async with AdminClient(deployment / "bob", timeout=60) as bob:
                    await bob.submit(fedavg_job(tmp_path / "jobs", "bobs", 1, add_one))
            assert "site-1:" in str(refused.value) and "site-2:" in str(refused.value)

            # Execute: a long job is aborted while it runs
            long = await admin.submit(fedavg_job(tmp_path / "jobs", "long", 1000, slow_add_one))
            await until(lambda: _progressed(admin, long.job_id), timeout=120)
            assert processes_of(long.job_id), "the job processes should be running"
            aborted = await admin.abort(long.job_id)

            # Assert: no process of the job is left, at the server or at the sites
            assert aborted.state == "aborted"
            await until(lambda: not processes_of(long.job_id), timeout=30)

    asyncio.run(main())


async def _sites_connected(admin: AdminClient) -> bool:
    return [s.name for s in await admin.sites()] == ["site-1", "site-2"]


async def _ended(admin: AdminClient, job_id: str) -> bool:
    return (await admin.status(job_id)).ended


async def _progressed(admin: AdminClient, job_id: str) -> bool:
    return bool((await admin.status(job_id)).progress)


