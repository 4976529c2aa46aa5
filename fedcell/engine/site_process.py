"""A site as its own process: ``python -m fedcell.engine.site_process``.

Used by the simulator's ``processes`` mode (and by POC mode): the process loads an exported job
folder, builds its executors for this site, connects its cell to the server and serves the job's
tasks until the server says the job ended (channel ``fc.job_end``), the parent stays unreachable
for ``--orphan-timeout`` seconds, or it receives SIGTERM/SIGINT. Loading the folder imports the
job's custom code: only a server this site trusts may hand it a job folder (the simulator and POC
mode run both ends; deployment checks the site policy first).
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
from fedcell.engine.memory import keep_large_allocations_returnable
from fedcell.engine.site_runtime import SiteRuntime
from fedcell.transports.cell import Cell
from fedcell.transports.message import Message


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


async def serve(args: argparse.Namespace) -> int:
    job = Job.load(args.job_dir)
    await asyncio.to_thread(_preload_torch)
    executors = job.executors_for(args.name)
    workspace = args.job_dir / "custom"  # the job's code and files, as in the simulator
    cell = Cell(args.name, parent=args.parent)
    runtime = SiteRuntime(cell)
    ended = asyncio.Event()

    async def on_job_end(message: Message) -> None:
        if isinstance(message.payload, dict) and message.payload.get("job") == args.job_id:
            ended.set()

    cell.register(JOB_END_CHANNEL, on_job_end)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, ended.set)
    await runtime.add_job(args.job_id, executors, workspace=workspace)
    try:
        await cell.start()
        orphaned_since: float | None = None
        while not ended.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ended.wait(), 1.0)
            if cell.parent is None:
                orphaned_since = orphaned_since or loop.time()
                if loop.time() - orphaned_since > args.orphan_timeout:
                    logging.error("server unreachable for %.0f s: leaving", args.orphan_timeout)
                    return 3
            else:
                orphaned_since = None
        return 0
    finally:
        await runtime.close()
        await cell.stop()


def main(argv: list[str] | None = None) -> int:
    keep_large_allocations_returnable()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return asyncio.run(serve(_parse(argv)))


if __name__ == "__main__":
    sys.exit(main())
