"""Deployed jobs end to end with real processes over loopback: the job's server process
(``server.job-<id>``, server kit) and the site job processes (``site-N.job-<id>``, started by site
daemons) find each other through the server cell that relays; the job finishes, aborts on
SIGTERM, or crashes naming a site whose process died; nothing hangs."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
from site_helpers import (
    CONFIG,
    JOB_NAME,
    archive_of,
    ask,
    deploy_request,
    deployment,
    numpy_job,
    submit_command,
    until,
)
from site_jobs import slow_add_one  # type: ignore[import-not-found]

from fedcell.controllers import FedAvg
from fedcell.deploy.job_archive import unpack_job
from fedcell.deploy.job_launch import job_cell_name, server_job_command
from fedcell.deploy.kit import StartupKit
from fedcell.engine.job import Job
from fedcell.errors import CellError, ConfigError
from fedcell.executors.numpy_executor import NumpyExecutor
from fedcell.transports.cell import Cell

pytestmark = pytest.mark.integration

SITES = ("site-1", "site-2")


@asynccontextmanager
async def running_job(
    kits: Path, tmp_path: Path, job: Job, job_id: str
) -> AsyncIterator[tuple[subprocess.Popen[bytes], dict[str, int], Cell]]:
    """Deploy ``job`` at both site daemons, start their job processes and the job's server
    process (what the server daemon does); yield it, the site pids and the relaying server."""
    archive = archive_of(job, tmp_path)
    async with deployment(kits, tmp_path / "ws", SITES) as (server, _):
        pids: dict[str, int] = {}
        for site in SITES:
            await ask(server, site, deploy_request(job_id, submit_command(kits, archive), archive))
            pids[site] = (await ask(server, site, {"op": "start", "job_id": job_id}))["pid"]
        job_dir = unpack_job(archive, tmp_path / "server-job")
        command = server_job_command(
            kits / "server", job_dir, tmp_path / "results", job_id, list(SITES)
        )
        with (tmp_path / "server.log").open("wb") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            yield process, pids, server
        finally:
            if process.poll() is None:
                process.kill()
            process.wait()


async def exited(process: subprocess.Popen[bytes], timeout: float, log: Path) -> int:
    await until(lambda: process.poll() is not None, timeout, f"job process exit: {log.read_text()}")
    return process.returncode


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def settled_states(server: Cell, job_id: str, timeout: float = 30.0) -> dict[str, str]:
    """Each site's state of the job, once no site's job process runs any more."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        replies = {site: await ask(server, site, {"op": "status"}) for site in SITES}
        states = {site: reply["jobs"][job_id]["state"] for site, reply in replies.items()}
        if "running" not in states.values() or asyncio.get_running_loop().time() > deadline:
            return states
        await asyncio.sleep(0.1)


def test_a_deployed_numpy_fedavg_job_runs_and_finishes(kits: Path, tmp_path: Path) -> None:
    async def main() -> None:
        # Prepare
        rounds = 3
        async with running_job(kits, tmp_path, numpy_job(rounds), "fin") as (job, pids, server):
            # Execute
            status = await exited(job, 90, tmp_path / "server.log")
            states = await settled_states(server, "fin")
            logs = await ask(server, "site-1", {"op": "logs", "job_id": "fin", "offset": 0})

        # Assert: the job finished with the model every site trained, under plain site names
        results = tmp_path / "results"
        assert status == 0, (tmp_path / "server.log").read_text()
        summary = json.loads((results / "result.json").read_text())
        assert summary["state"] == "finished" and summary["job_id"] == "fin"
        model = np.load(summary["models"]["train"])
        np.testing.assert_array_equal(model["w"], [rounds, rounds])
        assert [row["round"] for row in summary["metrics"]] == list(range(rounds))
        progress = json.loads((results / "progress.json").read_text())
        assert progress["node"] == "train" and progress["step"] == progress["total"] == rounds
        assert states == {"site-1": "finished", "site-2": "finished"}
        assert all(gone(pid) for pid in pids.values())
        site_log = tmp_path / "ws" / "site-1" / "jobs" / "fin" / "site.log"
        assert logs["done"] and logs["text"] == site_log.read_text()
        assert "Traceback" not in logs["text"]
        server_log = (tmp_path / "server.log").read_text()
        assert "site site-1 joined" in server_log and "site site-2 joined" in server_log

    asyncio.run(main())


def test_sigterm_aborts_the_job_process_which_writes_results_and_releases_the_sites(
    kits: Path, tmp_path: Path
) -> None:
    async def main() -> None:
        # Prepare: a long job (half a second per round)
        job = numpy_job(200, train=slow_add_one)
        async with running_job(kits, tmp_path, job, "abo") as (process, pids, server):
            progress = tmp_path / "results" / "progress.json"
            await until(progress.exists, 90, "a first round")
            # Execute
            process.send_signal(signal.SIGTERM)
            status = await exited(process, 30, tmp_path / "server.log")
            states = await settled_states(server, "abo")

        # Assert
        assert status == 1, (tmp_path / "server.log").read_text()
        summary = json.loads((tmp_path / "results" / "result.json").read_text())
        assert summary["state"] == "aborted"
        assert json.loads(progress.read_text())["step"] < 200
        assert states == {"site-1": "finished", "site-2": "finished"}  # told the job ended
        assert all(gone(pid) for pid in pids.values())

    asyncio.run(main())


def test_a_site_job_process_killed_mid_job_crashes_the_job_naming_the_site(
    kits: Path, tmp_path: Path
) -> None:
    async def main() -> None:
        # Prepare: a long job that needs both sites every round
        job = numpy_job(200, train=slow_add_one)
        async with running_job(kits, tmp_path, job, "cra") as (process, pids, server):
            await until((tmp_path / "results" / "progress.json").exists, 90, "a first round")
            # Execute
            psutil.Process(pids["site-2"]).kill()
            status = await exited(process, 60, tmp_path / "server.log")
            states = await settled_states(server, "cra")

        # Assert: crashed (a lost site), not failed, and the site is named
        assert status == 1
        summary = json.loads((tmp_path / "results" / "result.json").read_text())
        assert summary["state"] == "crashed", summary
        assert "site-2" in json.dumps(summary["nodes"]["train"]) + (summary["reason"] or "")
        assert states["site-2"] == "failed: exit status -9"
        assert states["site-1"] == "finished"

    asyncio.run(main())


def test_a_job_that_needs_one_site_per_round_goes_on_without_a_killed_site(
    kits: Path, tmp_path: Path
) -> None:
    async def main() -> None:
        # Prepare: k-of-n with k = 1
        job = Job(JOB_NAME)
        job.add(FedAvg(rounds=6, min_clients=1, initial_params={"w": [0.0]}), name="train")
        job.add_executor(NumpyExecutor(train=slow_add_one), tasks=("train",))
        async with running_job(kits, tmp_path, job, "kon") as (process, pids, server):
            await until((tmp_path / "results" / "progress.json").exists, 90, "a first round")
            # Execute
            psutil.Process(pids["site-2"]).kill()
            status = await exited(process, 60, tmp_path / "server.log")
            states = await settled_states(server, "kon")

        # Assert: finished; the rounds after the loss had one result each
        assert status == 0, (tmp_path / "server.log").read_text()
        summary = json.loads((tmp_path / "results" / "result.json").read_text())
        assert summary["state"] == "finished"
        assert np.load(summary["models"]["train"])["w"].tolist() == [6.0]
        assert states == {"site-1": "finished", "site-2": "failed: exit status -9"}

    asyncio.run(main())


def test_the_server_kit_starts_job_cells_under_the_server_and_no_one_else_can(
    kits: Path, tmp_path: Path
) -> None:
    async def main() -> None:
        # Prepare
        server_kit = StartupKit.load(kits / "server")
        site_kit = StartupKit.load(kits / "site-1")
        async with deployment(kits, tmp_path / "ws"):
            job_cell = server_kit.cell(name=job_cell_name("server", "7"), config=CONFIG)
            site_job = site_kit.cell(name=job_cell_name("site-1", "7"), config=CONFIG)
            impostor = Cell("server.job-8", parent=site_kit.server.url,
                            config=site_kit.cell_config(CONFIG))  # fmt: skip
            try:
                # Execute: the job cells talk through the server; site-1 cannot be server.job-8
                await job_cell.start()
                await site_job.start()

                async def echo(message: Any) -> Any:
                    return message.envelope.sender

                site_job.register("echo", echo)
                reply = await job_cell.request("site-1.job-7", "echo", None, timeout=10)
                with pytest.raises(CellError, match=r"'site-1' .* may not speak as 'server\.job-8'"):
                    await impostor.start()
            finally:
                for cell in (impostor, site_job, job_cell):
                    await cell.stop()

        # Assert
        assert reply == "server.job-7"
        with pytest.raises(ConfigError, match="without dots"):
            job_cell_name("site-1", "a.b")

    asyncio.run(main())
