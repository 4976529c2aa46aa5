"""The job CLI against a real POC deployment: submit, follow, download, logs, abort, refusals.

One POC (server and two site daemons as processes on loopback) serves the module's tests; the
commands run in-process through click's runner, exactly as ``fedcell job ...`` parses them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import yaml
from click.testing import CliRunner, Result

from fedcell.cli import main as cli
from fedcell.deploy.poc import admin_kit

pytestmark = pytest.mark.integration


@dataclass(frozen=True)
class Poc:
    workspace: Path
    kit: Path


def invoke(args: list[str]) -> Result:
    return CliRunner().invoke(cli, args, env={"COLUMNS": "200"})


def job(poc: Poc, args: list[str]) -> Result:
    return invoke(["job", *args, "--kit", str(poc.kit)])


def started_poc(workspace: Path, n_sites: int) -> Poc:
    prepared = invoke(["poc", "prepare", "-n", str(n_sites), "--workspace", str(workspace)])
    assert prepared.exit_code == 0, prepared.output
    started = invoke(["poc", "start", "--workspace", str(workspace)])
    assert started.exit_code == 0, started.output
    return Poc(workspace, admin_kit(workspace))


@pytest.fixture(scope="module")
def poc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Poc]:
    deployment = started_poc(tmp_path_factory.mktemp("deployment") / "poc", 2)
    yield deployment
    invoke(["poc", "stop", "--workspace", str(deployment.workspace)])


def one_error_line(outcome: Result, *fragments: str) -> None:
    """The command failed with exit status 1 and one ``Error:`` line holding ``fragments``."""
    assert outcome.exit_code == 1, outcome.output
    assert outcome.output.startswith("Error: ") and outcome.output.count("\n") == 1, outcome.output
    assert "Traceback" not in outcome.output
    for fragment in fragments:
        assert fragment in outcome.output, outcome.output


def submitted_id(outcome: Result) -> str:
    assert outcome.exit_code == 0, outcome.output
    return outcome.output.split("job ", 1)[1].split()[0]


def status_of(poc: Poc, job_id: str) -> dict[str, object]:
    shown = job(poc, ["status", job_id, "--json"])
    assert shown.exit_code == 0, shown.output
    record: dict[str, object] = json.loads(shown.output)
    return record


def job_processes(job_id: str) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter():
        try:
            if process.status() != psutil.STATUS_ZOMBIE and any(
                job_id in part for part in process.cmdline()
            ):
                found.append(process)
        except psutil.Error:
            continue
    return found


# ---------------------------------------------------------------------------- no deployment


def test_without_a_kit_the_error_says_how_to_pass_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: no --kit, no FEDCELL_ADMIN_KIT, no POC workspace
    monkeypatch.delenv("FEDCELL_ADMIN_KIT", raising=False)
    monkeypatch.setenv("FEDCELL_POC_WORKSPACE", str(tmp_path / "none"))

    # Execute
    outcome = invoke(["job", "list"])
    not_a_kit = invoke(["job", "list", "--kit", str(tmp_path)])

    # Assert
    one_error_line(outcome, "no admin kit", "--kit", "FEDCELL_ADMIN_KIT", "fedcell poc prepare")
    one_error_line(not_a_kit, f"{tmp_path} is not a startup kit")


def test_a_server_that_is_not_running_is_one_error_line(tmp_path: Path) -> None:
    # Prepare: a POC prepared, not started
    workspace = tmp_path / "poc"
    assert invoke(["poc", "prepare", "-n", "1", "--workspace", str(workspace)]).exit_code == 0

    # Execute
    outcome = invoke(["job", "list", "--kit", str(admin_kit(workspace))])

    # Assert
    one_error_line(outcome, "did not answer")


# ---------------------------------------------------------------------------- one POC


def test_unknown_job_ids_are_one_error_line(poc: Poc) -> None:
    for command in (["status", "0123456789"], ["abort", "0123456789"],
                    ["download", "0123456789"], ["logs", "0123456789"]):  # fmt: skip
        one_error_line(job(poc, command), "0123456789")


def test_the_kit_comes_from_the_environment_when_not_given(
    poc: Poc, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    monkeypatch.setenv("FEDCELL_ADMIN_KIT", str(poc.kit))

    # Execute
    listed = invoke(["job", "list", "--json"])

    # Assert
    assert listed.exit_code == 0, listed.output
    assert isinstance(json.loads(listed.output), list)


@pytest.mark.slow
def test_template_job_runs_end_to_end(poc: Poc, tmp_path: Path) -> None:
    # Prepare
    folder = tmp_path / "fedavg"
    created = invoke(["job", "create", "-t", "fedavg-pytorch", str(folder)])
    assert created.exit_code == 0, created.output

    # Execute
    job_id = submitted_id(job(poc, ["submit", str(folder)]))
    followed = job(poc, ["logs", job_id, "--follow"])  # returns once the job ended
    watched = job(poc, ["status", job_id, "--watch"])
    listed = job(poc, ["list"])
    shown = job(poc, ["status", job_id])
    downloaded = job(poc, ["download", job_id, "-o", str(tmp_path / "downloads")])
    server_log = job(poc, ["logs", job_id])
    site_log = job(poc, ["logs", job_id, "--site", "site-1"])

    # Assert: finished, and every view says so
    assert watched.exit_code == 0, watched.output
    record = status_of(poc, job_id)
    assert record["state"] == "finished", record
    assert record["sites"] == {"site-1": "finished", "site-2": "finished"}, record
    progress = record["progress"]
    assert isinstance(progress, dict) and progress["node"] == "train" and progress["step"] == 3
    row = next(line for line in listed.output.splitlines() if job_id in line)
    assert "fedavg-pytorch" in row and "finished" in row and "admin" in row and "train 3/3" in row
    assert "finished" in shown.output and "site-2" in shown.output and "accuracy=" in shown.output
    # Assert: the download holds the results and the model
    assert downloaded.exit_code == 0, downloaded.output
    results = tmp_path / "downloads" / job_id / "results"
    result = json.loads((results / "result.json").read_text())
    assert result["state"] == "finished"
    assert Path(result["models"]["train"]).name == "train.pt"
    assert (results / "train.pt").stat().st_size > 0
    # Assert: the server's log (followed while the job ran, and read again) and a site's log
    assert followed.exit_code == 0 and f"job {job_id} finished" in followed.output
    assert server_log.exit_code == 0 and server_log.output == followed.output
    assert site_log.exit_code == 0 and "round 2: accuracy" in site_log.output


@pytest.mark.slow
def test_the_hello_pytorch_example_runs_on_the_poc_as_written(poc: Poc, tmp_path: Path) -> None:
    # Prepare: the README's example, submitted as its Python file (the same file simulate runs)
    example = Path(__file__).resolve().parents[2] / "examples" / "hello-pytorch" / "job.py"

    # Execute
    job_id = submitted_id(job(poc, ["submit", str(example)]))
    watched = job(poc, ["status", job_id, "--watch"])
    downloaded = job(poc, ["download", job_id, "-o", str(tmp_path / "downloads")])

    # Assert: five rounds at both sites, and the final model came back
    assert watched.exit_code == 0, watched.output
    assert downloaded.exit_code == 0, downloaded.output
    record = status_of(poc, job_id)
    assert record["name"] == "hello-pytorch" and record["state"] == "finished", record
    assert record["sites"] == {"site-1": "finished", "site-2": "finished"}, record
    results = tmp_path / "downloads" / job_id / "results"
    result = json.loads((results / "result.json").read_text())
    assert result["state"] == "finished"
    assert (results / "train.pt").stat().st_size > 0
    rounds = [line for line in (results / "metrics.csv").read_text().splitlines()[1:] if line]
    assert len(rounds) == 5, rounds


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_same_job_finishes_in_every_config_format(poc: Poc, tmp_path: Path) -> None:
    # Prepare: fedavg-pytorch in yaml and toml (json: the test above; toml bound to site-2 only),
    # and two other workflows: cyclic from a Python file defining `job`, split learning (custom
    # code referenced as functions)
    invoke(["job", "create", "-t", "fedavg-pytorch", str(tmp_path / "yaml"), "--format", "yaml"])
    invoke(["job", "create", "-t", "fedavg-pytorch", str(tmp_path / "toml"), "--format", "toml",
            "--sites", "site-2"])  # fmt: skip
    python_job = tmp_path / "cyclic_job.py"
    python_job.write_text(
        "from fedcell.templates import TEMPLATES\n\njob = TEMPLATES['cyclic'].build(None)\n"
    )
    invoke(["job", "create", "-t", "split-learning", str(tmp_path / "split")])
    sources = [tmp_path / "yaml", tmp_path / "toml", python_job, tmp_path / "split"]

    # Execute: all four run at once
    ids = [submitted_id(job(poc, ["submit", str(source)])) for source in sources]
    watched = [job(poc, ["status", job_id, "--watch"]) for job_id in ids]

    # Assert
    records = [status_of(poc, job_id) for job_id in ids]
    for outcome, record in zip(watched, records, strict=True):
        assert outcome.exit_code == 0 and record["state"] == "finished", (outcome.output, record)
    assert [r["name"] for r in records] == [
        "fedavg-pytorch", "fedavg-pytorch", "cyclic", "split-learning"
    ]  # fmt: skip
    assert all(isinstance(r["progress"], dict) and r["progress"] for r in records)
    assert records[1]["sites"] == {"site-2": "finished"}  # the sites its executors name
    assert records[0]["sites"] == records[2]["sites"] == records[3]["sites"] == {
        "site-1": "finished", "site-2": "finished"
    }  # fmt: skip


@pytest.mark.slow
def test_abort_stops_every_job_process(poc: Poc, tmp_path: Path) -> None:
    # Prepare: a job that would run for a long time
    folder = tmp_path / "long"
    invoke(["job", "create", "-t", "fedavg-pytorch", str(folder)])
    config = json.loads((folder / "job.json").read_text())
    config["nodes"][0]["controller"]["args"]["rounds"] = 10_000
    (folder / "job.json").write_text(json.dumps(config))
    job_id = submitted_id(job(poc, ["submit", str(folder)]))
    deadline = time.monotonic() + 60
    while not status_of(poc, job_id)["progress"] and time.monotonic() < deadline:
        time.sleep(0.5)
    running = job_processes(job_id)

    # Execute
    aborted = job(poc, ["abort", job_id])
    watched = job(poc, ["status", job_id, "--watch"])

    # Assert: the server's job process and one per site ran; none is left
    assert len(running) >= 3, [p.cmdline() for p in running]
    assert aborted.exit_code == 0 and "aborted" in aborted.output, aborted.output
    assert status_of(poc, job_id)["state"] == "aborted"
    assert watched.exit_code == 1  # --watch: the job did not finish
    assert job_processes(job_id) == []


def test_a_site_policy_refusal_reaches_the_submitter(tmp_path: Path) -> None:
    # Prepare: a POC whose site-1 admits only someone else
    workspace = tmp_path / "poc"
    assert invoke(["poc", "prepare", "-n", "1", "--workspace", str(workspace)]).exit_code == 0
    policy_file = workspace / "kits" / "site-1" / "policy.yml"
    policy = yaml.safe_load(policy_file.read_text())
    policy["submit"] = {"names": ["carol"]}
    policy_file.write_text(yaml.safe_dump(policy))
    started = invoke(["poc", "start", "--workspace", str(workspace)])
    assert started.exit_code == 0, started.output
    invoke(["job", "create", "-t", "fedavg-pytorch", str(tmp_path / "job")])

    # Execute
    try:
        refused = invoke(["job", "submit", str(tmp_path / "job"), "--kit",
                          str(admin_kit(workspace))])  # fmt: skip
    finally:
        invoke(["poc", "stop", "--workspace", str(workspace)])

    # Assert
    one_error_line(refused, "refused", "site-1", "admin")
