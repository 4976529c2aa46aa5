"""One job's server as its own process, resumable after a crash: ``python -m
fedcell.engine.job_process``.

::

    python -m fedcell.engine.job_process --job-dir DIR --listen tcp://127.0.0.1:PORT \\
        --sites site-1,site-2 --workspace W [--job-id ID] [--resume]

The process loads the exported job folder, listens on ``--listen`` with the server cell, waits until
every named site has connected (sites are ``python -m fedcell.engine.site_process --name site-1
--parent URL --job-dir DIR --job-id ID``, started by whoever deploys them), runs the job with
:func:`~fedcell.engine.simulator.serve_job` (the same code as the simulator's ``processes`` mode),
writes the results as the simulator does (``W/result.json``, ``W/metrics.csv``, each node's final
model, listed under ``models`` in ``result.json``) and tells the sites the job ended. Exit status: 0
when the job finished, 1 when it failed, crashed or was aborted, 2 when it could not run (bad job
folder, sites missing, unreadable checkpoint).

The body of the process is :func:`run_job`, which takes a ready (not started) cell and a
:class:`~fedcell.engine.presence.SitePresence`: here a listening cell whose neighbours the sites
are; in a deployment (:mod:`fedcell.deploy.job_launch`) a cell secured by the server's startup
kit, child of the server daemon, whose sites are ``<site>.job-<id>`` cells found by pinging them
through the server. Whatever the cell:

- SIGTERM or SIGINT **abort** the job: the runner cancels the running nodes, the job ends
  ``aborted``, the sites are told (``fc.job_end``), the results are written, exit status 1. (An
  abort while waiting for the sites aborts the job as it starts.)
- **Progress**: every progress report of a controller is written to ``W/progress.json``
  (``{"node", "step", "total", "metrics", "time"}``; atomic replace, at most one write per
  :data:`PROGRESS_INTERVAL` seconds, the last report always written), so a daemon can show how
  far the job got without talking to this process.
- A site lost while the job runs is reported to the runner (``site_lost``): the job's k-of-n
  rules decide whether it goes on; a job that cannot ends ``crashed`` naming the site. If the
  sites do not all show up within ``--join-timeout``, the ones that did are told the job ended
  and the process exits 2 naming the missing ones.

Crash and resume. The job checkpoints into ``W/checkpoint/`` (see
:mod:`fedcell.engine.checkpoint`): the scheduler after every DAG step, each controller after
every round. If the process dies (even by SIGKILL), start it again with the same arguments plus
``--resume``: it reloads the checkpoint and goes on from the last completed round or step.
Nothing needs to happen at the sites: they keep running while the server is down (their cells
reconnect by themselves to the same URL; a site process leaves only after its
``--orphan-timeout``), so the restarted server finds them connected again within a heartbeat or
two. A task that was in flight at the crash is sent again; the site's late reply to the dead
server is lost (a reply to an unknown request is dropped), so it cannot count twice. The job id
must stay the same across restarts (default: the job's name), because sites serve the job by id
and the checkpoint refuses another job's id.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Final

from fedcell.engine.cell_dispatcher import JOB_END_CHANNEL, PRESENCE_CHANNEL
from fedcell.engine.checkpoint import CheckpointStore
from fedcell.engine.job import Job
from fedcell.engine.memory import tune_allocator_for_streams
from fedcell.engine.presence import NeighbourPresence, SitePresence
from fedcell.engine.progress import ProgressEvent
from fedcell.engine.simulator import serve_job, server_config, write_results
from fedcell.errors import FedcellError, JobError
from fedcell.transports.cell import Cell
from fedcell.transports.message import Message

__all__ = [
    "DEPARTURE_GRACE",
    "PROGRESS_FILE",
    "PROGRESS_INTERVAL",
    "ProgressFile",
    "main",
    "run_job",
    "site_list",
]

logger = logging.getLogger("fedcell.job_process")

#: Seconds the server waits for the sites to leave after telling them the job ended: stopping
#: at once could drop the goodbye, and the sites would wait out their orphan timeout.
DEPARTURE_GRACE: Final = 10.0
#: The progress file in the job's workspace, and the least seconds between two writes of it.
PROGRESS_FILE: Final = "progress.json"
PROGRESS_INTERVAL: Final = 0.5


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="fedcell.engine.job_process", description="Run one job as its server process."
    )
    parser.add_argument("--job-dir", required=True, type=Path, help="exported job folder")
    parser.add_argument("--listen", required=True, help="URL the server cell listens on")
    parser.add_argument("--sites", required=True, help="comma-separated site names")
    parser.add_argument("--workspace", required=True, type=Path, help="results and checkpoints")
    parser.add_argument("--job-id", help="the id sites serve the job under (default: job name)")
    parser.add_argument("--resume", action="store_true", help="go on from the checkpoint")
    parser.add_argument(
        "--join-timeout", type=float, default=120.0, help="seconds to wait for every site"
    )
    return parser.parse_args(argv)


def site_list(sites: str) -> list[str]:
    """``"a, b"`` → ``["a", "b"]``."""
    return [name.strip() for name in sites.split(",") if name.strip()]


class ProgressFile:
    """Writes the latest :class:`~fedcell.engine.progress.ProgressEvent` to a JSON file.

    Atomic (temporary file + ``os.replace``), at most one write per ``interval`` seconds: a report
    arriving sooner is held and written when the interval is over (only the newest one held), and
    :meth:`close` writes any report still held. Call it on the event loop.
    """

    def __init__(self, path: Path, interval: float = PROGRESS_INTERVAL) -> None:
        self.path = path
        self._interval = interval
        self._written_at = -float("inf")
        self._held: ProgressEvent | None = None
        self._timer: asyncio.TimerHandle | None = None

    def __call__(self, event: ProgressEvent) -> None:
        self._held = event
        wait = self._written_at + self._interval - time.monotonic()
        if wait <= 0:
            self._flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(wait, self._flush)

    def close(self) -> None:
        """Write the report still held, if any."""
        self._flush()

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        event, self._held = self._held, None
        if event is None:
            return
        record = {
            "node": event.node,
            "step": event.step,
            "total": event.total,
            "metrics": event.metrics,
            "time": time.time(),
        }
        try:
            data = json.dumps(record, default=str).encode()
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.")
            with os.fdopen(fd, "wb") as out:
                out.write(data)
            os.replace(tmp, self.path)
        except OSError as exc:  # progress is advisory: never fail the job for it
            logger.warning("cannot write %s: %s", self.path, exc)
        self._written_at = time.monotonic()


async def run_job(
    cell: Cell,
    job: Job,
    job_id: str,
    sites: Sequence[str],
    workspace: Path,
    presence: SitePresence,
    *,
    cell_names: Mapping[str, str] | None = None,
    resume: bool = False,
    join_timeout: float = 120.0,
) -> int:
    """Start ``cell``, wait for the sites, run the job, write its results; return the exit status.

    SIGTERM/SIGINT abort the job (see the module docstring).

    Parameters
    ----------
    cell:
        The job's server cell, not started.
    job, job_id, sites:
        The job, the id its sites serve it under, and the sites (plain names).
    workspace:
        Results, checkpoints and ``progress.json`` go here.
    presence:
        Tells which sites are there, not started (built for ``cell``).
    cell_names:
        Site → the cell serving the job there (default: the site's name).
    resume:
        Go on from the checkpoint in ``workspace``.
    join_timeout:
        Seconds to wait for every site.

    Raises
    ------
    ConfigError
        If the job does not fit the sites.
    JobError
        If the sites do not all show up within ``join_timeout``.
    CheckpointError
        If ``resume`` finds a corrupt checkpoint or one of another job.
    """
    job.validate(sites)
    workspace.mkdir(parents=True, exist_ok=True)
    abort = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, abort.set)

    async def answer_presence(message: Message) -> list[str]:
        return [job_id]

    cell.register(PRESENCE_CHANNEL, answer_presence)  # sites check that the job's server is up
    progress = ProgressFile(workspace / PROGRESS_FILE)
    await cell.start()
    try:
        await presence.start()
        logger.info("job %s: waiting for sites %s", job_id, list(sites))
        if not await _joined_or_aborted(presence, abort, join_timeout):
            missing = sorted(set(sites) - presence.present)
            await _tell_job_ended(cell, job_id, [(cell_names or {}).get(s, s) for s in sites])
            raise JobError(f"sites {missing} did not connect within {join_timeout:g} s")
        result = await serve_job(
            cell,
            job,
            job_id,
            sites,
            workspace,
            progress=progress,
            checkpoint=CheckpointStore(workspace / "checkpoint"),
            resume=resume,
            cell_names=cell_names,
            presence=presence,
            abort=abort,
        )
        progress.close()
        if not await presence.wait_until(everyone=False, timeout=DEPARTURE_GRACE):
            logger.warning("sites %s did not leave after the job ended", sorted(presence.present))
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await presence.stop()
        await cell.stop()
    write_results(result, workspace)
    logger.info("job %s %s; results in %s", job_id, result.state.value, workspace)
    return 0 if result.ok else 1


async def _joined_or_aborted(presence: SitePresence, abort: asyncio.Event, timeout: float) -> bool:
    """Wait for every site or an abort (``True``: go on; the runner aborts at once if asked)."""
    joined = asyncio.ensure_future(presence.wait_until(everyone=True, timeout=timeout))
    aborted = asyncio.ensure_future(abort.wait())
    try:
        await asyncio.wait({joined, aborted}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in (joined, aborted):
            waiter.cancel()
        await asyncio.gather(joined, aborted, return_exceptions=True)
    return abort.is_set() or (joined.done() and not joined.cancelled() and joined.result())


async def _tell_job_ended(cell: Cell, job_id: str, targets: Sequence[str]) -> None:
    for target in targets:
        with contextlib.suppress(FedcellError):  # an absent site needs no goodbye
            await cell.send(target, JOB_END_CHANNEL, {"job": job_id})


async def _serve(args: argparse.Namespace) -> int:
    job = Job.load(args.job_dir)
    sites = site_list(args.sites)
    cell = Cell("server", listen=args.listen, config=server_config(len(sites)))
    presence = NeighbourPresence(cell, sites)  # before start: waiting sites connect at once
    return await run_job(
        cell,
        job,
        args.job_id or job.name,
        sites,
        args.workspace,
        presence,
        resume=args.resume,
        join_timeout=args.join_timeout,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (see the module docstring)."""
    tune_allocator_for_streams()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return asyncio.run(_serve(_parse(argv)))
    except FedcellError as exc:
        logger.error("job could not run: %s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
