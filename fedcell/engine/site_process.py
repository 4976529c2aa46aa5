"""A site as its own process: ``python -m fedcell.engine.site_process``.

Used by the simulator's ``processes`` mode (and by POC mode): the process loads an exported job
folder, builds its executors for this site, connects its cell to the server and serves the job's
tasks until the server says the job ended (channel ``fc.job_end``), the job's server stays
unreachable for ``--orphan-timeout`` seconds, or it receives SIGTERM/SIGINT. Loading the folder
imports the job's custom code: only a server this site trusts may hand it a job folder (the
simulator and POC mode run both ends; deployment checks the site policy first).

The body is :func:`serve_site`, which takes a ready (not started) cell. Here the cell is the
site's own (``--name``, child of ``--parent``, the job's server). In a deployment
(:mod:`fedcell.deploy.job_launch`) it is ``site-1.job-<id>``, secured by the site's startup kit,
child of the server daemon; the job's server ``server.job-<id>`` is another child of that daemon,
so "orphaned" means it stops answering presence pings through the daemon, not that the parent
link is down (the daemon outlives every job).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import importlib.util
import logging
import signal
import sys
from pathlib import Path

from fedcell.engine.cell_dispatcher import JOB_END_CHANNEL
from fedcell.engine.job import Job
from fedcell.engine.memory import tune_allocator_for_streams
from fedcell.engine.presence import reachable
from fedcell.engine.site_runtime import SiteRuntime
from fedcell.transports.cell import Cell
from fedcell.transports.message import Message

__all__ = ["main", "serve_site"]

logger = logging.getLogger("fedcell.site_process")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fedcell.engine.site_process", description=__doc__)
    parser.add_argument("--name", required=True, help="this site's cell name")
    parser.add_argument("--parent", required=True, help="URL of the server cell")
    parser.add_argument("--job-dir", required=True, type=Path, help="exported job folder")
    parser.add_argument("--job-id", required=True)
    parser.add_argument("--orphan-timeout", type=float, default=60.0)
    return parser.parse_args(argv)


def _preload_torch() -> None:
    """Import torch now if it is installed, before the cell connects.

    The wire codec imports torch lazily, on the event loop, when the first tensor arrives; if a
    training script is importing torch (or Lightning) on its thread at that moment, the loop
    waits on the import lock for the whole import and sends no heartbeats: under load the server
    declared such sites lost. Importing first costs the same time once, while nobody waits.
    """
    if importlib.util.find_spec("torch") is not None:
        importlib.import_module("torch")


async def serve_site(
    cell: Cell,
    job_dir: Path,
    job_id: str,
    *,
    site_name: str | None = None,
    job_server: str | None = None,
    orphan_timeout: float = 60.0,
) -> int:
    """Serve the job in ``job_dir`` from ``cell`` until it ends; return the exit status.

    0 when the job's server said the job ended or a signal asked to stop, 3 when the job's server
    stayed unreachable for ``orphan_timeout`` seconds.

    Parameters
    ----------
    cell:
        The cell serving the job, not started.
    job_dir, job_id:
        The exported job folder and the id the job's server sends tasks under.
    site_name:
        The site's name (default: the cell's name): which executors it runs, what results say.
    job_server:
        The cell name of the job's server when it is not ``cell``'s parent (pinged to tell it is
        there); ``None``: the parent is the job's server.
    orphan_timeout:
        Seconds the job's server may stay unreachable before the site leaves.

    Raises
    ------
    ConfigError
        If the job folder does not load or has no executors for the site.
    ConnectError, CellError
        If the cell cannot connect to its parent.
    """
    name = site_name or cell.name
    job = Job.load(job_dir)
    await asyncio.to_thread(_preload_torch)
    executors = job.executors_for(name)
    workspace = job_dir / "custom"  # the job's code and files, as in the simulator
    runtime = SiteRuntime(cell, site_name=name)
    ended = asyncio.Event()

    async def on_job_end(message: Message) -> None:
        if isinstance(message.payload, dict) and message.payload.get("job") == job_id:
            ended.set()

    cell.register(JOB_END_CHANNEL, on_job_end)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, ended.set)
    await runtime.add_job(job_id, executors, workspace=workspace)
    try:
        await cell.start()
        orphaned_since: float | None = None
        while not ended.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ended.wait(), 1.0)
            if ended.is_set():
                break
            if await _job_server_there(cell, job_server):
                orphaned_since = None
                continue
            orphaned_since = orphaned_since or loop.time()
            if loop.time() - orphaned_since > orphan_timeout:
                logger.error("the job's server unreachable for %.0f s: leaving", orphan_timeout)
                return 3
        return 0
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await runtime.close()
        await cell.stop()


async def _job_server_there(cell: Cell, job_server: str | None) -> bool:
    if job_server is None:
        return cell.parent is not None
    return await reachable(cell, job_server, timeout=5.0)


async def _serve(args: argparse.Namespace) -> int:
    cell = Cell(args.name, parent=args.parent)
    return await serve_site(cell, args.job_dir, args.job_id, orphan_timeout=args.orphan_timeout)


def main(argv: list[str] | None = None) -> int:
    tune_allocator_for_streams()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return asyncio.run(_serve(_parse(argv)))


if __name__ == "__main__":
    sys.exit(main())
