"""POC mode: a whole deployment - server, N sites, an admin - as real processes on this machine.

``fedcell poc prepare/start/status/stop/clean`` are thin wrappers of the functions here. A POC is
the real thing run locally: the same kits (:mod:`fedcell.deploy.provision`), the same daemons
(``python -m fedcell.deploy.participant KIT``), CurveZMQ over tcp on loopback, signed admin
commands, site policies. Only the address (``127.0.0.1`` at a free port) and the generous policy
are POC-specific; what works here works across machines with kits handed out.

Workspace (default ``$FEDCELL_POC_WORKSPACE``, else ``~/.fedcell/poc``)::

    <workspace>/
      .fedcell-poc            marker: clean removes only a folder holding it
      project.yml             project "poc": server on 127.0.0.1:<free port>, site-1..N,
                              admin "admin" (role project_admin)
      state/  kits/           what provisioning writes; kits/<site>/policy.yml is the POC policy
      logs/<participant>.log  each daemon's stdout and stderr
      poc.json                while running: each daemon's pid and process start time

The POC admin is named ``admin``: participant names are cell names (no ``@`` or dots), and the
admin's CLI cell is ``admin.cli-<8 hex>``. Each site's POC policy lets ``admin`` (and any
``project_admin``) submit jobs with source custom code, four at a time.

Process handling: :func:`start` spawns each daemon detached (its own session, stdin from
``/dev/null``, output to its log), so the daemons outlive the command that started them; it
records ``(pid, start time)`` pairs, so a pid reused by an unrelated process is never signalled.
It then waits until every site is connected (the admin client's ``sites`` command); a daemon that
exits meanwhile, or a timeout, stops everything it started and raises with the end of the log.
:func:`stop` lists each daemon's descendants (the job processes), sends SIGTERM to the daemons
(they stop their jobs), waits, then SIGKILLs whatever is left of the daemons and of those
descendants, and removes ``poc.json``. A zombie counts as gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import psutil
import yaml

from fedcell.engine.simulator import shared_cpu_environment
from fedcell.errors import ConfigError, ConnectError

if TYPE_CHECKING:
    from fedcell.deploy.protocol import SiteStatus
    from fedcell.deploy.provision import ProvisionReport

__all__ = [
    "ADMIN",
    "POC_WORKSPACE_ENV",
    "PocProcess",
    "admin_kit",
    "clean",
    "poc_workspace",
    "prepare",
    "processes",
    "start",
    "stop",
]

#: Environment variable naming the POC workspace.
POC_WORKSPACE_ENV: Final = "FEDCELL_POC_WORKSPACE"
#: The POC admin's participant name.
ADMIN: Final = "admin"
PROJECT: Final = "poc"
SERVER: Final = "server"
_MARKER: Final = ".fedcell-poc"
_STATE: Final = "poc.json"
_LOG_TAIL_LINES: Final = 15


def poc_workspace(workspace: Path | None = None) -> Path:
    """``workspace``, else ``$FEDCELL_POC_WORKSPACE``, else ``~/.fedcell/poc``."""
    if workspace is not None:
        return workspace
    configured = os.environ.get(POC_WORKSPACE_ENV)
    return Path(configured) if configured else Path.home() / ".fedcell" / "poc"


def admin_kit(workspace: Path) -> Path:
    """The POC admin's startup kit in ``workspace``."""
    return workspace / "kits" / ADMIN


def _site_policy(site: str) -> dict[str, Any]:
    return {
        "site": site,
        "submit": {"roles": ["project_admin"], "names": [ADMIN]},
        "custom_code": {"allow": ["source"]},
        "resources": {"max_concurrent_jobs": 4},
    }


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def prepare(n_sites: int, workspace: Path, *, force: bool = False) -> ProvisionReport:
    """Write a POC project of ``n_sites`` sites into ``workspace`` and provision its kits.

    Parameters
    ----------
    n_sites:
        How many sites (``site-1`` .. ``site-N``).
    workspace:
        The POC workspace (see the module docstring).
    force:
        Remove an existing POC workspace first (refused while its POC runs).

    Raises
    ------
    ConfigError
        ``n_sites`` below 1; the workspace exists and ``force`` is not set; it runs; or it is
        a folder that is not a POC workspace.
    OSError
        If the workspace cannot be written.
    """
    from fedcell.deploy.project import load_project
    from fedcell.deploy.provision import provision

    if n_sites < 1:
        raise ConfigError(f"a POC needs at least one site, not {n_sites}")
    if workspace.exists() and any(workspace.iterdir()):
        if not (workspace / _MARKER).is_file():
            raise ConfigError(
                f"{workspace} is not empty and not a POC workspace: choose another --workspace"
            )
        if not force:
            raise ConfigError(
                f"{workspace} is already prepared: `fedcell poc prepare --force` prepares it "
                "again from scratch (new keys), `fedcell poc start` runs it"
            )
        clean(workspace)
    workspace.mkdir(parents=True, exist_ok=True)
    (workspace / _MARKER).write_text("a fedcell POC workspace (fedcell poc clean removes it)\n")
    sites = [f"site-{i}" for i in range(1, n_sites + 1)]
    project = {
        "project": PROJECT,
        "server": {
            "name": SERVER,
            "host": "127.0.0.1",
            "port": _free_port(),
            "listen_host": "127.0.0.1",
        },
        "sites": sites,
        "admins": [{"name": ADMIN, "role": "project_admin"}],
    }
    project_file = workspace / "project.yml"
    project_file.write_text(
        "# A fedcell POC: every participant on this machine (fedcell poc prepare).\n"
        + yaml.safe_dump(project, sort_keys=False),
        encoding="utf-8",
    )
    report = provision(load_project(project_file), workspace)
    for site in sites:
        (report.kits / site / "policy.yml").write_text(
            "# POC site policy (fedcell poc prepare): the POC admin may submit jobs with code.\n"
            + yaml.safe_dump(_site_policy(site), sort_keys=False),
            encoding="utf-8",
        )
    return report


@dataclass(frozen=True, slots=True)
class PocProcess:
    """A POC daemon as recorded in ``poc.json``, and whether it still runs."""

    name: str
    pid: int
    started_at: float
    running: bool
    log: Path


def _participants(workspace: Path) -> list[str]:
    from fedcell.deploy.project import load_project

    project = load_project(_prepared(workspace) / "project.yml")
    return [project.server.name, *(site.name for site in project.sites)]


def _prepared(workspace: Path) -> Path:
    if not (workspace / _MARKER).is_file() or not (workspace / "project.yml").is_file():
        raise ConfigError(
            f"{workspace} is not a prepared POC workspace: run `fedcell poc prepare -n 2` first"
        )
    return workspace


def _process(pid: int, started_at: float) -> psutil.Process | None:
    """The live process ``pid`` if it is the one started at ``started_at`` (not a reused pid)."""
    try:
        process = psutil.Process(pid)
        if abs(process.create_time() - started_at) > 1.0:
            return None
        if process.status() == psutil.STATUS_ZOMBIE:
            _reap(pid)
            return None
    except psutil.Error:
        return None
    return process


def _reap(pid: int) -> None:
    """Collect ``pid``'s exit status if it is this process's child (a zombie otherwise stays)."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def processes(workspace: Path) -> list[PocProcess]:
    """The daemons ``poc.json`` records (empty when the POC was never started or was stopped).

    Raises
    ------
    ConfigError
        If ``workspace`` is not a POC workspace or ``poc.json`` is damaged.
    """
    if not (workspace / _MARKER).is_file():
        raise ConfigError(f"{workspace} is not a POC workspace: run `fedcell poc prepare` first")
    state_file = workspace / _STATE
    if not state_file.is_file():
        return []
    try:
        recorded = json.loads(state_file.read_text(encoding="utf-8"))["processes"]
        return [
            PocProcess(
                name,
                int(entry["pid"]),
                float(entry["started_at"]),
                _process(int(entry["pid"]), float(entry["started_at"])) is not None,
                workspace / "logs" / f"{name}.log",
            )
            for name, entry in recorded.items()
        ]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(f"{state_file} is damaged ({exc}); remove it after stopping") from exc


def _spawn(command: list[str], log: Path, env: dict[str, str]) -> psutil.Process:
    """Start ``command`` detached (own session) with ``env``, output appended to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    actions = [
        (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
        (os.POSIX_SPAWN_OPEN, 1, str(log), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644),
        (os.POSIX_SPAWN_DUP2, 1, 2),
    ]
    pid = os.posix_spawn(command[0], command, env, file_actions=actions, setsid=True)
    return psutil.Process(pid)


def _log_tail(log: Path) -> str:
    try:
        lines = log.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(lines[-_LOG_TAIL_LINES:]) or "(empty log)"


async def start(workspace: Path, *, timeout: float = 60.0) -> list[SiteStatus]:
    """Start the server and site daemons of the POC in ``workspace``; wait for every site.

    Returns
    -------
    list[SiteStatus]
        The connected sites, as the server reports them.

    Raises
    ------
    ConfigError
        If the workspace is not prepared or its POC already runs.
    ConnectError
        If a daemon exits or the sites are not all connected within ``timeout`` seconds
        (everything started is stopped again; the message holds the end of the log).
    """
    names = _participants(workspace)
    running = [p.name for p in processes(workspace) if p.running]
    if running:
        raise ConfigError(f"the POC in {workspace} already runs ({', '.join(running)})")
    kits, logs = workspace / "kits", workspace / "logs"
    started: dict[str, psutil.Process] = {}
    # The sites share this machine: each one's job processes get its share of the cores for
    # their torch/OpenMP pools (left alone, every pool spins on all cores and starves the others).
    env = {**shared_cpu_environment(len(names) - 1), **os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        for name in names:
            command = [sys.executable, "-m", "fedcell.deploy.participant", str(kits / name)]
            started[name] = _spawn(command, logs / f"{name}.log", env)
            _write_state(workspace, started)
        return await _wait_for_sites(workspace, names[1:], started, timeout)
    except BaseException:
        if started:
            stop(workspace, grace=5.0)
        raise


def _write_state(workspace: Path, started: dict[str, psutil.Process]) -> None:
    state = {
        "processes": {
            name: {"pid": process.pid, "started_at": process.create_time()}
            for name, process in started.items()
        }
    }
    temporary = workspace / f".{_STATE}.tmp"
    temporary.write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
    os.replace(temporary, workspace / _STATE)


async def _wait_for_sites(
    workspace: Path, sites: list[str], started: dict[str, psutil.Process], timeout: float
) -> list[SiteStatus]:
    from fedcell.deploy.admin import AdminClient

    deadline = time.monotonic() + timeout
    missing = list(sites)
    while True:
        for name, process in started.items():
            if not process.is_running() or process.status() == psutil.STATUS_ZOMBIE:
                log = workspace / "logs" / f"{name}.log"
                raise ConnectError(
                    f"POC {name} exited during start; the end of {log}:\n{_log_tail(log)}"
                )
        try:
            async with AdminClient(admin_kit(workspace), timeout=5.0) as admin:
                connected = await admin.sites()
            missing = [site for site in sites if site not in {s.name for s in connected}]
            if not missing:
                return connected
        except ConnectError:
            pass  # the server is not listening yet
        if time.monotonic() > deadline:
            raise ConnectError(
                f"POC sites {missing} did not connect within {timeout:g} s; logs in "
                f"{workspace / 'logs'}"
            )
        await asyncio.sleep(0.3)


def stop(workspace: Path, *, grace: float = 15.0) -> list[PocProcess]:
    """Stop the POC daemons (and their job processes); return the daemons that were running.

    Raises
    ------
    ConfigError
        If ``workspace`` is not a prepared POC workspace.
    """
    recorded = processes(workspace)
    daemons = [
        p for p in (_process(r.pid, r.started_at) for r in recorded if r.running) if p is not None
    ]
    descendants: list[psutil.Process] = []
    for daemon in daemons:
        try:
            descendants += daemon.children(recursive=True)
        except psutil.Error:
            continue
    _signal(daemons, signal.SIGTERM)
    survivors = _wait_gone(daemons + descendants, grace)
    _signal(survivors, signal.SIGKILL)
    _wait_gone(survivors, 5.0)
    (workspace / _STATE).unlink(missing_ok=True)
    return [r for r in recorded if r.running]


def _signal(targets: Iterable[psutil.Process], sig: signal.Signals) -> None:
    for process in targets:
        try:
            process.send_signal(sig)
        except psutil.Error:
            continue


def _gone(process: psutil.Process) -> bool:
    try:
        if process.status() != psutil.STATUS_ZOMBIE:
            return False
    except psutil.Error:
        return True
    _reap(process.pid)
    return True


def _wait_gone(targets: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Wait up to ``timeout`` s for ``targets`` to exit; return those still there."""
    deadline = time.monotonic() + timeout
    left = [p for p in targets if not _gone(p)]
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = [p for p in left if not _gone(p)]
    return left


def clean(workspace: Path, *, force: bool = False) -> None:
    """Remove the POC workspace (kits, keys, logs, job workspaces).

    Raises
    ------
    ConfigError
        If the folder is not a POC workspace, or its POC runs and ``force`` is not set
        (``force`` stops it first).
    OSError
        If the folder cannot be removed.
    """
    if not (workspace / _MARKER).is_file():
        raise ConfigError(f"{workspace} is not a POC workspace (no {_MARKER}); not removing it")
    running = [p.name for p in processes(workspace) if p.running]
    if running:
        if not force:
            raise ConfigError(
                f"the POC in {workspace} runs ({', '.join(running)}): `fedcell poc stop` first, "
                "or `fedcell poc clean --force`"
            )
        stop(workspace)
    shutil.rmtree(workspace)
