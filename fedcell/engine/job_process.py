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
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from fedcell.engine.checkpoint import CheckpointStore
from fedcell.engine.job import Job
from fedcell.engine.memory import keep_large_allocations_returnable
from fedcell.engine.simulator import serve_job, server_config, write_results
from fedcell.errors import FedcellError, JobError
from fedcell.transports.cell import Cell, PeerEvent

__all__ = ["main", "serve"]

logger = logging.getLogger("fedcell.job_process")


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


class _Presence:
    """Peer listener: which of the job's sites are connected right now."""

    def __init__(self, names: Sequence[str]) -> None:
        self._names = frozenset(names)
        self.connected: set[str] = set()
        self._changed = asyncio.Event()

    def __call__(self, name: str, event: PeerEvent) -> None:
        if name not in self._names:
            return
        if event == "joined":
            self.connected.add(name)
        else:
            self.connected.discard(name)
        self._changed.set()

    async def wait_until(self, everyone: bool, timeout: float) -> bool:
        """Wait until every site is connected (``everyone``) or none is; ``False`` on timeout."""
        target = set(self._names) if everyone else set()
        deadline = asyncio.get_running_loop().time() + timeout
        while self.connected != target:
            self._changed.clear()
            remaining = deadline - asyncio.get_running_loop().time()
            try:
                await asyncio.wait_for(self._changed.wait(), max(remaining, 0))
            except TimeoutError:
                return False
        return True


#: Seconds the server waits for the sites to leave after telling them the job ended: stopping
#: at once could drop the goodbye, and the sites would wait out their orphan timeout.
DEPARTURE_GRACE = 10.0


async def serve(args: argparse.Namespace) -> int:
    """Run the job described by the parsed command line; return the exit status.

    Raises
    ------
    ConfigError
        If the job folder is invalid or the job does not fit the sites.
    JobError
        If the sites do not all connect within ``--join-timeout``.
    CheckpointError
        If ``--resume`` finds a corrupt checkpoint or one of another job.
    """
    job = Job.load(args.job_dir)
    names = [name.strip() for name in args.sites.split(",") if name.strip()]
    job.validate(names)
    job_id = args.job_id or job.name
    root: Path = args.workspace
    root.mkdir(parents=True, exist_ok=True)
    server = Cell("server", listen=args.listen, config=server_config(len(names)))
    presence = _Presence(names)
    server.add_peer_listener(presence)  # before start: sites already running connect at once
    await server.start()
    try:
        logger.info("job %s: waiting for sites %s on %s", job_id, names, server.url)
        if not await presence.wait_until(everyone=True, timeout=args.join_timeout):
            missing = sorted(set(names) - presence.connected)
            raise JobError(f"sites {missing} did not connect within {args.join_timeout:g} s")
        result = await serve_job(
            server,
            job,
            job_id,
            names,
            root,
            checkpoint=CheckpointStore(root / "checkpoint"),
            resume=args.resume,
        )
        if not await presence.wait_until(everyone=False, timeout=DEPARTURE_GRACE):
            logger.warning("sites %s did not leave after the job ended", sorted(presence.connected))
    finally:
        await server.stop()
    write_results(result, root)
    logger.info("job %s %s; results in %s", job_id, result.state.value, root)
    return 0 if result.ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (see the module docstring)."""
    keep_large_allocations_returnable()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return asyncio.run(serve(_parse(argv)))
    except FedcellError as exc:
        logger.error("job could not run: %s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
