"""The simulator: a job's server and N sites on one machine.

Two modes, one code path (a :class:`~fedcell.transports.cell.Cell` per participant, a
:class:`~fedcell.engine.cell_dispatcher.CellDispatcher` on the server, a
:class:`~fedcell.engine.site_runtime.SiteRuntime` per site):

``threads`` (default)
    Every cell lives on this process's event loop, connected over ``inproc://``; user training
    scripts run on threads (``ScriptRunner(mode="thread")``). No serialization shortcuts: every
    task and result still crosses the wire codec. Cheap enough for 1000 sites with a tiny model.
``processes``
    The job is exported to a job folder; each site is a child process
    (``python -m fedcell.engine.site_process``) that loads it and connects to the server cell
    over ``ipc://`` (or ``tcp://`` when asked) — what POC mode and deployment do, on one machine.

Both modes export the job to ``<workspace>/job`` first: its ``custom/`` folder (the job's code and
added files) is every site's workspace, so a ``ScriptRunner(script="train.py")`` finds the script
that ``job.add_file("train.py")`` shipped, exactly as a deployed site would.

A run writes a results folder::

    <workspace>/
        job/                  the exported job (config + custom/)
        result.json           job and node states, timings, the metrics table, node outputs
                              that are plain data (e.g. a cross-site evaluation matrix)
        metrics.csv           one row per node and round: the metrics each controller reported
        <node>.model.pt|npz   the final model of every node whose output is an FLModel
        <site>.log            per-site logs (sites.log for more than 64 in-process sites)
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import csv
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from fedcell.engine.cell_dispatcher import JOB_END_CHANNEL, CellDispatcher
from fedcell.engine.checkpoint import CheckpointStore
from fedcell.engine.gil_turns import turn_taking_loop
from fedcell.engine.job import Job
from fedcell.engine.job_runner import JobResult, JobRunner
from fedcell.engine.memory import tune_allocator_for_streams
from fedcell.engine.presence import NeighbourPresence, SitePresence
from fedcell.engine.progress import ProgressEvent, ProgressSink
from fedcell.engine.site_runtime import SiteRuntime
from fedcell.errors import ConfigError, JobError
from fedcell.fl_model import FLModel
from fedcell.transports.cell import Cell, CellConfig
from fedcell.transports.stream import StreamConfig

__all__ = [
    "SERVER_INBOUND_BYTES",
    "SimulationResult",
    "run_simulation",
    "serve_job",
    "server_config",
    "simulate",
    "site_names",
    "write_results",
]

logger = logging.getLogger(__name__)

SimulationMode = Literal["threads", "processes"]


def site_names(n_clients: int) -> list[str]:
    """``site-1`` … ``site-N``."""
    if n_clients < 1:
        raise ConfigError(f"n_clients must be >= 1, got {n_clients}")
    return [f"site-{i}" for i in range(1, n_clients + 1)]


@dataclass
class SimulationResult:
    """What a simulation produced: the job's result and where its files are."""

    job: JobResult
    workspace: Path
    model_files: dict[str, Path]
    metrics_file: Path

    @property
    def ok(self) -> bool:
        return self.job.ok


def simulate(
    job: Job,
    n_clients: int | None = None,
    *,
    sites: Sequence[str] | None = None,
    mode: SimulationMode = "threads",
    workspace: str | Path | None = None,
    progress: bool | Callable[[ProgressEvent], None] = False,
    transport: Literal["ipc", "tcp"] = "ipc",
) -> SimulationResult:
    """Run ``job`` on simulated sites and return its result (sync facade of :func:`run_simulation`).

    Parameters
    ----------
    job:
        The job to run.
    n_clients:
        Number of sites, named ``site-1`` … ``site-N`` (or pass ``sites``).
    sites:
        Explicit site names.
    mode:
        ``"threads"`` (one process, inproc cells) or ``"processes"`` (a process per site).
    workspace:
        The results folder (default: ``./results/<job name>-<run id>``).
    progress:
        ``True``: show a live progress display of each node's rounds; a callable: receive
        each :class:`~fedcell.engine.progress.ProgressEvent` instead (benchmarks time rounds so).
    transport:
        ``processes`` mode only: how sites reach the server.

    Raises
    ------
    ConfigError
        If the job is invalid for the sites, or the arguments are.
    """
    # threads mode: the loop takes turns with the sites' script threads (see gil_turns)
    with asyncio.Runner(loop_factory=turn_taking_loop if mode == "threads" else None) as runner:
        return runner.run(
            run_simulation(
                job,
                n_clients,
                sites=sites,
                mode=mode,
                workspace=workspace,
                progress=progress,
                transport=transport,
            )
        )


async def run_simulation(
    job: Job,
    n_clients: int | None = None,
    *,
    sites: Sequence[str] | None = None,
    mode: SimulationMode = "threads",
    workspace: str | Path | None = None,
    progress: bool | Callable[[ProgressEvent], None] = False,
    transport: Literal["ipc", "tcp"] = "ipc",
) -> SimulationResult:
    """Async form of :func:`simulate`."""
    tune_allocator_for_streams()
    names = list(sites) if sites is not None else site_names(n_clients or 2)
    if mode not in ("threads", "processes"):
        raise ConfigError(f"simulation mode must be 'threads' or 'processes', not {mode!r}")
    job.validate(names)
    job_id = f"{job.name}-{uuid.uuid4().hex[:8]}"
    root = Path(workspace) if workspace is not None else Path("results") / job_id
    root.mkdir(parents=True, exist_ok=True)
    job.export(root / "job")
    with (
        _shared_cpus(len(names)),
        ProgressSink(
            enabled=progress is True, forward=None if isinstance(progress, bool) else progress
        ) as sink,
    ):
        if mode == "threads":
            result = await _run_threads(job, job_id, names, root, sink)
        else:
            result = await _run_processes(job, job_id, names, root, sink, transport)
    return write_results(result, root)


#: Thread-pool variables of the numeric libraries sites use (torch/OpenMP, MKL, OpenBLAS).
_THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def _threads_per_site(n_sites: int) -> int:
    return max(1, (os.cpu_count() or 1) // n_sites)


def shared_cpu_environment(n_sites: int) -> dict[str, str]:
    """The thread-pool variables that give each of ``n_sites`` site processes on this machine
    its share of the cores (what :func:`simulate` and POC mode set where the user did not)."""
    per_site = str(_threads_per_site(n_sites))
    return {name: per_site for name in _THREAD_VARIABLES}


@contextlib.contextmanager
def _shared_cpus(n_sites: int) -> Iterator[None]:
    """Give each simulated site its share of the cores while the simulation runs.

    Simulated sites share one machine: left alone, every site's torch/OpenMP pool sizes itself
    to all cores, and their spinning workers starve each other (measured: 180 ms instead of
    6 ms per round with two site processes on two cores). Child processes inherit the
    thread-pool variables (unless the user set them); in-process sites share one torch pool,
    sized the same way and restored afterwards.
    """
    shares = shared_cpu_environment(n_sites)
    saved_env = {name: os.environ.get(name) for name in _THREAD_VARIABLES}
    for name, share in shares.items():
        os.environ.setdefault(name, share)
    torch = sys.modules.get("torch")
    saved_threads = torch.get_num_threads() if torch is not None else None
    if torch is not None and saved_env["OMP_NUM_THREADS"] is None:
        torch.set_num_threads(int(shares["OMP_NUM_THREADS"]))
    try:
        yield
    finally:
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        if torch is not None and saved_threads is not None:
            torch.set_num_threads(saved_threads)


#: The server's inbound stream budget. FedAvg results are folded as they stream in, each
#: holding up to a stream window (32 MiB) in flight at the server; three at a time keep the
#: server busy (folding is its work, not the network's), and the global model + aggregate +
#: 96 MiB + the interpreter (~80 MiB) stay within the 2·S + 256 MiB budget whatever the number
#: of sites (8 sites, 1 GiB model: 2159 MiB peak with 96 MiB, 2239-2376 MiB with 256 MiB).
SERVER_INBOUND_BYTES = 96 * 1024 * 1024


def server_config(n_sites: int) -> CellConfig:
    """The server cell's settings for a job of ``n_sites`` sites.

    Results of all sites stream in at once; :data:`SERVER_INBOUND_BYTES` bounds what they hold
    in flight (a result that is assembled instead, a model above the budget, is admitted alone).
    """
    # Many in-process sites share one core: space heartbeats out so they stay cheap.
    interval = 1.0 if n_sites <= 64 else 5.0
    return CellConfig(
        heartbeat_interval=interval,
        peer_timeout=interval * 10,
        stream=StreamConfig(max_inbound_bytes=SERVER_INBOUND_BYTES),
    )


async def _run_threads(
    job: Job, job_id: str, names: list[str], root: Path, sink: ProgressSink
) -> JobResult:
    config = server_config(len(names))
    async with AsyncExitStack() as stack:
        server = Cell("server", listen=f"inproc://fedcell-sim-{job_id}", config=config)
        await server.start()
        stack.push_async_callback(server.stop)
        cells = [Cell(name, parent=server.url, config=config) for name in names]
        for batch in range(0, len(cells), 100):
            await asyncio.gather(*(cell.start() for cell in cells[batch : batch + 100]))
        for cell in cells:
            stack.push_async_callback(cell.stop)
        runtimes = [SiteRuntime(cell) for cell in cells]
        for runtime in runtimes:
            stack.push_async_callback(runtime.close)
        stack.enter_context(_site_logs(root, names))
        workspace = _site_workspace(root)
        for runtime, name in zip(runtimes, names, strict=True):
            executors = copy.deepcopy(job.executors_for(name))  # a site's own instances
            await runtime.add_job(job_id, executors, workspace=workspace)
        dispatcher = CellDispatcher(server, job_id, names)
        runner = JobRunner(
            job, dispatcher, job_id=job_id, workspace=root / "nodes", progress=sink.report
        )
        return await runner.run()
    raise AssertionError("unreachable")  # pragma: no cover


async def _run_processes(
    job: Job,
    job_id: str,
    names: list[str],
    root: Path,
    sink: ProgressSink,
    transport: Literal["ipc", "tcp"],
) -> JobResult:
    job_dir = root / "job"
    if transport == "ipc":
        sock_dir = Path(tempfile.mkdtemp(prefix="fedcell-"))
        url = f"ipc://{sock_dir}/server.ipc"
    else:
        sock_dir = None
        url = "tcp://127.0.0.1:0"
    server = Cell("server", listen=url, config=server_config(len(names)))
    await server.start()
    joined: asyncio.Queue[str] = asyncio.Queue()
    server.add_peer_listener(
        lambda name, event: joined.put_nowait(name) if event == "joined" else None
    )
    children: dict[str, subprocess.Popen[bytes]] = {}
    logs = []
    try:
        for name in names:
            log = open(root / f"{name}.log", "wb")  # noqa: SIM115 - closed in finally
            logs.append(log)
            children[name] = _spawn_site(name, server.url, job_dir, job_id, log)
        await _wait_for_sites(joined, set(names), children)
        return await serve_job(server, job, job_id, names, root, progress=sink.report)
    finally:
        await _reap(children)
        await server.stop()
        for log in logs:
            log.close()
        if sock_dir is not None:
            for leftover in sock_dir.iterdir():
                leftover.unlink(missing_ok=True)
            sock_dir.rmdir()


async def serve_job(
    server: Cell,
    job: Job,
    job_id: str,
    names: Sequence[str],
    root: Path,
    *,
    progress: Callable[[ProgressEvent], None] | None = None,
    checkpoint: CheckpointStore | None = None,
    resume: bool = False,
    cell_names: Mapping[str, str] | None = None,
    presence: SitePresence | None = None,
    abort: asyncio.Event | None = None,
) -> JobResult:
    """Run ``job`` from the started ``server`` cell on the connected sites ``names``, then tell
    them the job ended. Sites that leave are reported to the runner (and ones that come back).

    Used by the simulator's ``processes`` mode and by :mod:`fedcell.engine.job_process`; the
    node workspaces are ``<root>/nodes/<node>``; ``checkpoint`` and ``resume`` as for
    :class:`~fedcell.engine.job_runner.JobRunner`.

    Parameters
    ----------
    cell_names:
        Site → the cell serving the job there (default: the site's name); results, records and
        metrics keep the plain site names.
    presence:
        Where site losses and returns come from, already started (default: the server cell's
        peer events).
    abort:
        Setting it aborts the job (running nodes cancelled; the job ends ``aborted``).

    Raises
    ------
    ConfigError
        If the job is invalid for the sites.
    CheckpointError
        As :meth:`~fedcell.engine.job_runner.JobRunner.run` raises it.
    """
    dispatcher = CellDispatcher(server, job_id, names, cell_names)
    runner = JobRunner(
        job,
        dispatcher,
        job_id=job_id,
        workspace=root / "nodes",
        progress=progress,
        checkpoint=checkpoint,
        resume=resume,
    )

    def on_site(site: str, event: str) -> None:
        if event == "left":
            runner.site_lost(site)
        else:
            runner.site_joined(site)

    watching = presence
    if watching is None:
        watching = NeighbourPresence(server, names, cell_names)
        await watching.start()  # the sites connected so far are present (no event: they joined)
    watching.add_listener(on_site)
    aborting = None if abort is None else asyncio.ensure_future(_abort_when(abort, runner))
    try:
        result = await runner.run()
    finally:
        watching.remove_listener(on_site)
        if presence is None:
            await watching.stop()
        if aborting is not None:
            aborting.cancel()
    for name in names:
        target = (cell_names or {}).get(name, name)
        try:
            await server.send(target, JOB_END_CHANNEL, {"job": job_id})
        except Exception as exc:  # a lost site needs no goodbye
            logger.debug("could not end job at %s: %s", name, exc)
    return result


async def _abort_when(event: asyncio.Event, runner: JobRunner) -> None:
    await event.wait()
    runner.abort("aborted on request")


#: Above this many in-process sites, their logs share one file instead of one file each.
MAX_SITE_LOG_FILES = 64


@contextlib.contextmanager
def _site_logs(root: Path, names: list[str]) -> Iterator[None]:
    """Send each in-process site's log (its scripts' output included) to ``<root>/<site>.log``
    (or all to ``sites.log`` past :data:`MAX_SITE_LOG_FILES` sites) instead of the console."""
    formatter = logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s")
    shared = len(names) > MAX_SITE_LOG_FILES
    handlers: list[logging.Handler] = []
    if shared:
        handlers.append(logging.FileHandler(root / "sites.log"))
    loggers = []
    for index, name in enumerate(names):
        if not shared:
            handlers.append(logging.FileHandler(root / f"{name}.log"))
        handler = handlers[0] if shared else handlers[index]
        handler.setFormatter(formatter)
        site_logger = logging.getLogger(f"fedcell.site.{name}")
        site_logger.addHandler(handler)
        site_logger.setLevel(logging.INFO)
        site_logger.propagate = False
        loggers.append((site_logger, handler))
    try:
        yield
    finally:
        for site_logger, handler in loggers:
            site_logger.removeHandler(handler)
            site_logger.propagate = True
        for handler in handlers:
            handler.close()


def _site_workspace(root: Path) -> Path:
    custom = root / "job" / "custom"
    custom.mkdir(parents=True, exist_ok=True)
    return custom


def _spawn_site(
    name: str, url: str, job_dir: Path, job_id: str, log: Any
) -> subprocess.Popen[bytes]:
    command = [
        sys.executable, "-m", "fedcell.engine.site_process",
        "--name", name, "--parent", url, "--job-dir", str(job_dir), "--job-id", job_id,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)


async def _wait_for_sites(
    joined: asyncio.Queue[str], expected: set[str], children: dict[str, subprocess.Popen[bytes]]
) -> None:
    missing = set(expected)
    deadline = time.monotonic() + 120.0
    while missing:
        dead = [name for name, child in children.items() if child.poll() is not None]
        if dead:
            raise JobError(f"site process(es) {sorted(dead)} exited before joining; see their logs")
        if time.monotonic() > deadline:
            raise JobError(f"sites {sorted(missing)} did not connect within 120 s")
        try:
            missing.discard(await asyncio.wait_for(joined.get(), 0.5))
        except TimeoutError:
            continue


async def _reap(children: dict[str, subprocess.Popen[bytes]]) -> None:
    deadline = time.monotonic() + 15.0
    while any(child.poll() is None for child in children.values()) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    for child in children.values():
        if child.poll() is None:
            child.kill()
            child.wait()


def write_results(result: JobResult, root: Path) -> SimulationResult:
    """Write ``result.json``, ``metrics.csv`` and each node's final model under ``root``."""
    model_files: dict[str, Path] = {}
    rows: list[dict[str, Any]] = []
    for name, node in result.nodes.items():
        output = node.output
        if isinstance(output, FLModel) and output.params is not None:
            model_files[name] = _save_model(output, root / f"{name}.model")
        history = output.meta.get("history", []) if isinstance(output, FLModel) else []
        for record in history:
            metrics = {
                k: v for k, v in record.get("metrics", {}).items() if k not in ("node", "round")
            }
            rows.append({"node": name, "round": record.get("round"), **metrics})
    metrics_file = root / "metrics.csv"
    columns = list(dict.fromkeys(key for row in rows for key in row)) or ["node", "round"]
    with metrics_file.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    summary = {
        "job_id": result.job_id,
        "state": result.state.value,
        "reason": result.reason,
        "duration_s": result.duration,
        "nodes": {
            name: {
                "state": node.state.value,
                "error": node.error,
                "duration_s": node.duration,
                **_plain_output(node.output),
            }
            for name, node in result.nodes.items()
        },
        "metrics": rows,
        "models": {name: str(path) for name, path in model_files.items()},
    }
    (root / "result.json").write_text(json.dumps(summary, indent=2, default=str))
    return SimulationResult(result, root, model_files, metrics_file)


def _plain_output(output: Any) -> dict[str, Any]:
    """``{"output": output}`` when a node's output is plain JSON data (a metrics matrix, a
    table); models are saved to their own files instead."""
    if output is None or isinstance(output, FLModel):
        return {}
    try:
        json.dumps(output)
    except (TypeError, ValueError):
        return {}
    return {"output": output}


def _save_model(model: FLModel, stem: Path) -> Path:
    params = model.params
    torch = sys.modules.get("torch")
    if (
        torch is not None
        and isinstance(params, dict)
        and any(isinstance(v, torch.Tensor) for v in params.values())
    ):
        path = stem.with_suffix(".pt")
        torch.save(params, path)
        return path
    import numpy as np

    path = stem.with_suffix(".npz")
    arrays: dict[str, Any] = {str(k): np.asarray(v) for k, v in dict(params).items()}
    np.savez(path, **arrays)
    return path
