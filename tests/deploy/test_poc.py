"""POC mode: prepare, start, status, stop and clean a local deployment of real processes."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import yaml
from click.testing import CliRunner, Result

from fedcell.cli import main as cli
from fedcell.deploy.kit import StartupKit
from fedcell.deploy.poc import ADMIN, admin_kit, processes, stop
from fedcell.engine.policy import JobMeta, SitePolicy, Submitter
from fedcell.errors import PolicyError


@pytest.fixture
def workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A POC workspace that is the default one (so no test touches ~/.fedcell); whatever a test
    leaves running is stopped."""
    folder = tmp_path / "poc"
    monkeypatch.setenv("FEDCELL_POC_WORKSPACE", str(folder))
    monkeypatch.delenv("FEDCELL_ADMIN_KIT", raising=False)
    yield folder
    if (folder / "poc.json").exists():
        poc(["stop"])


def poc(args: list[str]) -> Result:
    return CliRunner().invoke(cli, ["poc", *args], env={"COLUMNS": "200"})


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_prepare_writes_a_provisioned_project_with_poc_policies(workspace: Path) -> None:
    # Execute
    prepared = poc(["prepare", "-n", "3"])

    # Assert: the project, the kits, the admin
    assert prepared.exit_code == 0, prepared.output
    project = yaml.safe_load((workspace / "project.yml").read_text())
    assert project["server"]["host"] == "127.0.0.1" and 1024 < project["server"]["port"] < 65536
    assert project["sites"] == ["site-1", "site-2", "site-3"]
    assert project["admins"] == [{"name": ADMIN, "role": "project_admin"}]
    kits = workspace / "kits"
    assert sorted(p.name for p in kits.iterdir()) == [ADMIN, "server", "site-1", "site-2", "site-3"]
    admin = StartupKit.load(admin_kit(workspace))
    assert admin.is_admin and admin.role == "project_admin"
    # Assert: each site's policy admits the POC admin with source code, nobody else
    policy = SitePolicy.load(kits / "site-2" / "policy.yml")
    with_code = JobMeta("job", custom_code=frozenset({"source"}))
    policy.check_submission(Submitter(ADMIN, frozenset({"project_admin"}), authenticated=True),
                            with_code, running_jobs=0)  # fmt: skip
    with pytest.raises(PolicyError, match="site-2"):
        policy.check_submission(Submitter("mallory", frozenset({"member"}), authenticated=True),
                                with_code, running_jobs=0)  # fmt: skip
    assert processes(workspace) == []


def test_prepare_again_is_refused_unless_forced(workspace: Path) -> None:
    # Prepare
    assert poc(["prepare", "-n", "1"]).exit_code == 0
    first_key = (admin_kit(workspace) / "participant.key").read_bytes()

    # Execute
    again = poc(["prepare", "-n", "2"])
    forced = poc(["prepare", "-n", "2", "--force"])

    # Assert
    assert again.exit_code == 1 and again.output.startswith("Error: ")
    assert "already prepared" in again.output and "--force" in again.output
    assert forced.exit_code == 0, forced.output
    assert yaml.safe_load((workspace / "project.yml").read_text())["sites"] == ["site-1", "site-2"]
    assert (admin_kit(workspace) / "participant.key").read_bytes() != first_key


def test_clean_removes_only_a_poc_workspace(workspace: Path, tmp_path: Path) -> None:
    # Prepare
    assert poc(["prepare"]).exit_code == 0
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "data.csv").write_text("1,2\n")

    # Execute
    refused = poc(["clean", "--workspace", str(precious)])
    not_prepared = poc(["prepare", "--force", "--workspace", str(precious)])
    cleaned = poc(["clean"])

    # Assert
    assert refused.exit_code == 1 and "is not a POC workspace" in refused.output
    assert not_prepared.exit_code == 1 and "not a POC workspace" in not_prepared.output
    assert [p.name for p in precious.iterdir()] == ["data.csv"]
    assert cleaned.exit_code == 0 and not workspace.exists()


def test_commands_on_an_unprepared_workspace_say_what_to_do(workspace: Path) -> None:
    for command in (["start"], ["status"], ["stop"]):
        outcome = poc(command)
        assert outcome.exit_code == 1, outcome.output
        assert outcome.output.startswith("Error: ") and "fedcell poc prepare" in outcome.output
        assert "Traceback" not in outcome.output


@pytest.mark.integration
def test_lifecycle_start_status_stop_leaves_no_process(workspace: Path) -> None:
    # Prepare
    assert poc(["prepare", "-n", "2"]).exit_code == 0

    # Execute: start, then everything the CLI can see
    started = poc(["start"])
    recorded = processes(workspace)
    command_lines = {p.name: psutil.Process(p.pid).cmdline() for p in recorded}
    status = poc(["status"])
    twice = poc(["start"])
    refused_clean = poc(["clean"])
    stopped = poc(["stop"])

    # Assert: up, every site connected, each daemon its own detached process
    assert started.exit_code == 0, started.output
    assert [p.name for p in recorded] == ["server", "site-1", "site-2"]
    assert all(p.running for p in recorded)
    for process in recorded:
        assert process.log.is_file()
        assert "fedcell.deploy.participant" in command_lines[process.name]
        assert str(workspace / "kits" / process.name) in command_lines[process.name]
    assert status.exit_code == 0, status.output
    for line in status.output.splitlines():
        if "site-1" in line or "site-2" in line:
            assert "running" in line and ":" in line.split("│")[4], status.output
    # Assert: a second start and a clean while running are refused
    assert twice.exit_code == 1 and "already runs" in twice.output
    assert refused_clean.exit_code == 1 and "poc stop" in refused_clean.output
    # Assert: stopped for real, and the state file is gone
    assert stopped.exit_code == 0, stopped.output
    assert "server" in stopped.output and "site-2" in stopped.output
    assert all(gone(p.pid) for p in recorded)
    assert not (workspace / "poc.json").exists()
    assert "not running" in poc(["status"]).output
    assert poc(["clean"]).exit_code == 0 and not workspace.exists()


@pytest.mark.integration
def test_clean_force_stops_a_running_poc(workspace: Path) -> None:
    # Prepare
    assert poc(["prepare", "-n", "1"]).exit_code == 0
    assert poc(["start"]).exit_code == 0
    pids = [p.pid for p in processes(workspace)]

    # Execute
    cleaned = poc(["clean", "--force"])

    # Assert
    assert cleaned.exit_code == 0, cleaned.output
    assert len(pids) == 2 and all(gone(pid) for pid in pids)
    assert not workspace.exists()


@pytest.mark.integration
def test_a_site_that_cannot_start_fails_start_and_stops_the_rest(workspace: Path) -> None:
    # Prepare: site-2's kit no longer loads (its certificate is not the CA's any more)
    assert poc(["prepare", "-n", "2"]).exit_code == 0
    site_2 = workspace / "kits" / "site-2"
    (site_2 / "participant.pem").write_bytes((workspace / "kits" / "site-1" / "participant.pem")
                                             .read_bytes())  # fmt: skip

    # Execute
    started = poc(["start", "--timeout", "30"])

    # Assert: the error names the site and shows its log; nothing is left running
    assert started.exit_code == 1
    assert started.output.startswith("Error: POC site-2 exited during start")
    assert "site-2.log" in started.output
    assert not (workspace / "poc.json").exists()
    state = json.dumps([p.pid for p in psutil.process_iter() if _runs_from(p, workspace)])
    assert state == "[]"


def _runs_from(process: psutil.Process, workspace: Path) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE and any(
            str(workspace) in part for part in process.cmdline()
        )
    except psutil.Error:
        return False


@pytest.mark.integration
def test_stop_kills_a_daemon_that_ignores_sigterm(workspace: Path) -> None:
    # Prepare: site-1's daemon is frozen, so SIGTERM stays pending
    assert poc(["prepare", "-n", "1"]).exit_code == 0
    assert poc(["start"]).exit_code == 0
    recorded = {p.name: p.pid for p in processes(workspace)}
    psutil.Process(recorded["site-1"]).suspend()

    # Execute
    stopped = stop(workspace, grace=1.0)

    # Assert
    assert sorted(p.name for p in stopped) == ["server", "site-1"]
    assert all(gone(pid) for pid in recorded.values())
    assert not (workspace / "poc.json").exists()


@pytest.mark.integration
def test_stop_ends_the_running_jobs_processes_too(workspace: Path, tmp_path: Path) -> None:
    # Prepare: a POC running a job that would go on for a long time
    assert poc(["prepare", "-n", "1"]).exit_code == 0
    assert poc(["start"]).exit_code == 0
    runner = CliRunner()
    folder = tmp_path / "long"
    assert runner.invoke(cli, ["job", "create", "-t", "fedavg-pytorch", str(folder)]).exit_code == 0
    config = json.loads((folder / "job.json").read_text())
    config["nodes"][0]["controller"]["args"]["rounds"] = 10_000
    (folder / "job.json").write_text(json.dumps(config))
    submitted = runner.invoke(cli, ["job", "submit", str(folder)])
    assert submitted.exit_code == 0, submitted.output
    job_id = submitted.output.split("job ", 1)[1].split()[0]
    deadline = time.monotonic() + 60
    while len(_job_processes(job_id)) < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    running = _job_processes(job_id)

    # Execute
    stopped = poc(["stop"])

    # Assert: the job's server process and its site process ran, and are gone with the daemons
    assert len(running) == 2, [p.cmdline() for p in running]
    assert stopped.exit_code == 0, stopped.output
    assert _job_processes(job_id) == []


def _job_processes(job_id: str) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter():
        try:
            if process.status() != psutil.STATUS_ZOMBIE and job_id in " ".join(process.cmdline()):
                found.append(process)
        except psutil.Error:
            continue
    return found
