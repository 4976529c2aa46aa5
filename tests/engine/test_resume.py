"""Resume after a server crash: a job server killed with SIGKILL mid-job and started again with
``--resume`` ends with the model of an uninterrupted run, without redoing the finished rounds."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import IO

import numpy as np
import pytest
from resume_training import train_site_1, train_site_2  # type: ignore[import-not-found]

from fedcell.controllers.fedopt import FedAdam
from fedcell.engine.checkpoint import CheckpointStore, read_checkpoint
from fedcell.engine.job import Job
from fedcell.engine.simulator import simulate
from fedcell.executors.numpy_executor import NumpyExecutor

ROUNDS = 8
SITES = ["site-1", "site-2"]
JOB_ID = "resume-job"


def seeded_job() -> Job:
    job = Job("resume")
    initial = {"w": [0.0] * 5, "b": [0.0]}
    job.add(FedAdam(rounds=ROUNDS, initial_params=initial, server_lr=0.05), name="train")
    job.add_executor(NumpyExecutor(train=train_site_1), sites=["site-1"])
    job.add_executor(NumpyExecutor(train=train_site_2), sites=["site-2"])
    return job


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _spawn(args: list[str], log: IO[bytes]) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", *args], stdout=log, stderr=subprocess.STDOUT, env=env
    )


@contextmanager
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Children started inside are killed and reaped on the way out, whatever happened."""
    children: list[subprocess.Popen[bytes]] = []
    try:
        yield children
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
            child.wait()


def site_args(site: str, url: str, job_dir: Path) -> list[str]:
    return [
        "fedcell.engine.site_process", "--name", site, "--parent", url,
        "--job-dir", str(job_dir), "--job-id", JOB_ID, "--orphan-timeout", "60",
    ]  # fmt: skip


def completed_rounds(store: CheckpointStore) -> int:
    state = store.load_node("train")
    return 0 if state is None else int(state["next_round"])


@pytest.mark.integration
def test_sigkilled_server_resumes_and_ends_with_the_uninterrupted_model(tmp_path: Path) -> None:
    # Prepare: the reference model of an uninterrupted run, and a job folder for the processes
    reference = simulate(seeded_job(), sites=SITES, workspace=tmp_path / "reference")
    assert reference.ok, reference.job.reason
    want = reference.job.output("train").params
    job_dir = tmp_path / "job"
    seeded_job().export(job_dir)
    workspace = tmp_path / "server"
    url = f"tcp://127.0.0.1:{free_port()}"
    kill_after = random.Random().randint(2, ROUNDS - 2)  # rounds completed before the kill
    server_args = [
        "fedcell.engine.job_process", "--job-dir", str(job_dir), "--listen", url,
        "--sites", ",".join(SITES), "--workspace", str(workspace), "--job-id", JOB_ID,
    ]  # fmt: skip
    store = CheckpointStore(workspace / "checkpoint")
    with processes() as children, ExitStack() as logs:
        first_log = logs.enter_context((tmp_path / "server-1.log").open("wb"))
        first = _spawn(server_args, first_log)
        children.append(first)
        for site in SITES:
            site_log = logs.enter_context((tmp_path / f"{site}.log").open("wb"))
            children.append(_spawn(site_args(site, url, job_dir), site_log))
        # Execute: SIGKILL the server once `kill_after` rounds are checkpointed
        deadline = time.monotonic() + 90
        while completed_rounds(store) < kill_after:
            assert first.poll() is None, (tmp_path / "server-1.log").read_text()
            assert time.monotonic() < deadline, "the job made no progress"
            time.sleep(0.02)
        first.send_signal(signal.SIGKILL)
        assert first.wait(10) == -signal.SIGKILL
        resumed_from = completed_rounds(store)
        assert resumed_from < ROUNDS, "the job ended before the kill; rounds are too short"
        second_log = logs.enter_context((tmp_path / "server-2.log").open("wb"))
        second = _spawn([*server_args, "--resume"], second_log)
        children.append(second)
        status = second.wait(90)
        sites_status = [child.wait(30) for child in children[1:3]]
    # Assert: the same model as the uninterrupted run, bitwise (two sites: order-free sums)
    server_2 = (tmp_path / "server-2.log").read_text()
    assert status == 0, server_2
    assert sites_status == [0, 0], "sites should leave when the job ends"
    summary = json.loads((workspace / "result.json").read_text())
    got = np.load(summary["models"]["train"])
    for name, array in want.items():
        np.testing.assert_array_equal(got[name], array, err_msg=f"kill after round {kill_after}")
    final = read_checkpoint(store.output_file("train"))["output"]
    assert final.meta["resumed_at"] == [resumed_from]
    assert [record["round"] for record in final.meta["history"]] == list(range(ROUNDS))
    # the resumed server trained only the remaining rounds
    assert f"round {resumed_from + 1}/{ROUNDS}" in server_2
    assert f"round {resumed_from}/{ROUNDS}" not in server_2
    assert summary["state"] == "finished"
    assert [row["round"] for row in summary["metrics"]] == list(range(ROUNDS))


@pytest.mark.integration
def test_job_process_gives_up_on_sites_that_never_connect(tmp_path: Path) -> None:
    # Prepare
    job_dir = tmp_path / "job"
    seeded_job().export(job_dir)
    args = [
        "fedcell.engine.job_process", "--job-dir", str(job_dir),
        "--listen", f"tcp://127.0.0.1:{free_port()}", "--sites", ",".join(SITES),
        "--workspace", str(tmp_path / "server"), "--join-timeout", "1",
    ]  # fmt: skip
    # Execute
    with processes() as children, (tmp_path / "server.log").open("wb") as log:
        children.append(_spawn(args, log))
        status = children[0].wait(60)
    # Assert
    output = (tmp_path / "server.log").read_text()
    assert status == 2, output
    assert "sites ['site-1', 'site-2'] did not connect within 1 s" in output
