"""The job processes of a deployment, secured by startup kits: ``python -m fedcell.deploy.job_launch``.

::

    python -m fedcell.deploy.job_launch server --kit SERVER_KIT --job-dir D --workspace W \\
        --job-id ID --sites site-1,site-2 [--resume] [--join-timeout S]
    python -m fedcell.deploy.job_launch site --kit SITE_KIT --job-dir D --job-id ID \\
        [--orphan-timeout S]

The server daemon spawns the first for each job (:func:`server_job_command`), each site daemon
the second (:func:`site_job_command`). Both connect to the one server address with their
participant's kit: the job's server is the cell ``server.job-<ID>`` (the server's kit; the server
daemon admits its own key and sub-cells), each site's side is ``site-1.job-<ID>`` (the site's
kit); the server daemon relays between them. What runs inside is the engine's:
:func:`fedcell.engine.job_process.run_job` (results, checkpoints and ``progress.json`` in ``W``;
SIGTERM aborts; exit 0 finished, 1 failed/crashed/aborted, 2 could not run) with a
:class:`~fedcell.engine.presence.RemotePresence` that finds the site cells by pinging them
through the server, and :func:`fedcell.engine.site_process.serve_site`, which serves the job under
the site's plain name and leaves when ``fc.job_end`` comes, on SIGTERM, or when the job's server
stopped answering for ``--orphan-timeout`` seconds.

Why a module here and not a ``--kit`` flag on the engine's ``job_process``/``site_process``:
the engine must not import :mod:`fedcell.deploy` (layering: deployment builds on the engine, and
``tests/test_layering.py`` checks it), and a kit is a deployment notion (certificates, the CA
chain, the server's address). So the engine's processes take a ready cell, and this module, which
may import both, builds the secured cell from the kit and hands it over. The engine's own command
lines (``--listen``, ``--name --parent``) stay what the simulator and plain multi-process runs use.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from fedcell.deploy.kit import StartupKit
from fedcell.engine.job import Job
from fedcell.engine.job_process import run_job, site_list
from fedcell.engine.memory import tune_allocator_for_streams
from fedcell.engine.presence import RemotePresence
from fedcell.engine.simulator import server_config
from fedcell.engine.site_process import serve_site
from fedcell.errors import ConfigError, FedcellError
from fedcell.transports.cell_routing import validate_cell_name

__all__ = ["job_cell_name", "main", "server_job_command", "site_job_command"]

logger = logging.getLogger("fedcell.job_launch")


def job_cell_name(participant: str, job_id: str) -> str:
    """The cell of ``participant``'s side of job ``job_id``: ``site-1.job-<id>``.

    Raises
    ------
    ConfigError
        If ``job_id`` is not one cell-name label (letters, digits, ``_``, ``-``).
    """
    if "." in job_id:
        raise ConfigError(f"job id {job_id!r} must be one label, without dots")
    return validate_cell_name(f"{participant}.job-{job_id}")


def server_job_command(
    kit: Path,
    job_dir: Path,
    workspace: Path,
    job_id: str,
    sites: Sequence[str],
    *,
    resume: bool = False,
) -> list[str]:
    """The command line of a job's server process (what the server daemon spawns)."""
    command = [
        sys.executable, "-m", "fedcell.deploy.job_launch", "server", "--kit", str(kit),
        "--job-dir", str(job_dir), "--workspace", str(workspace), "--job-id", job_id,
        "--sites", ",".join(sites),
    ]  # fmt: skip
    return [*command, "--resume"] if resume else command


def site_job_command(kit: Path, job_dir: Path, job_id: str) -> list[str]:
    """The command line of a site's job process (what the site daemon spawns)."""
    return [
        sys.executable, "-m", "fedcell.deploy.job_launch", "site", "--kit", str(kit),
        "--job-dir", str(job_dir), "--job-id", job_id,
    ]  # fmt: skip


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fedcell.deploy.job_launch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sides = parser.add_subparsers(dest="side", required=True)
    server = sides.add_parser("server", help="the job's server side (server kit)")
    site = sides.add_parser("site", help="a site's side of the job (site kit)")
    for side in (server, site):
        side.add_argument("--kit", required=True, type=Path, help="the participant's startup kit")
        side.add_argument("--job-dir", required=True, type=Path, help="the unpacked job folder")
        side.add_argument("--job-id", required=True)
    server.add_argument("--workspace", required=True, type=Path, help="results and checkpoints")
    server.add_argument("--sites", required=True, help="comma-separated site names")
    server.add_argument("--resume", action="store_true", help="go on from the checkpoint")
    server.add_argument("--join-timeout", type=float, default=120.0)
    site.add_argument("--orphan-timeout", type=float, default=60.0)
    return parser.parse_args(argv)


async def _run_server_side(args: argparse.Namespace) -> int:
    kit = StartupKit.load(args.kit)
    if kit.role != "server":
        raise ConfigError(f"{args.kit} is the kit of {kit.name!r} ({kit.role}), not the server's")
    sites = site_list(args.sites)
    job = Job.load(args.job_dir)
    config = server_config(len(sites))
    cell = kit.cell(name=job_cell_name(kit.name, args.job_id), config=config)
    cell_names = {site: job_cell_name(site, args.job_id) for site in sites}
    presence = RemotePresence(
        cell, sites, cell_names, interval=config.heartbeat_interval, timeout=config.peer_timeout
    )
    return await run_job(
        cell,
        job,
        args.job_id,
        sites,
        args.workspace,
        presence,
        cell_names=cell_names,
        resume=args.resume,
        join_timeout=args.join_timeout,
    )


async def _run_site_side(args: argparse.Namespace) -> int:
    kit = StartupKit.load(args.kit)
    if kit.role != "site":
        raise ConfigError(f"{args.kit} is the kit of {kit.name!r} ({kit.role}), not a site's")
    return await serve_site(
        kit.cell(name=job_cell_name(kit.name, args.job_id)),
        args.job_dir,
        args.job_id,
        site_name=kit.name,
        job_server=job_cell_name(kit.server.name, args.job_id),
        orphan_timeout=args.orphan_timeout,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (2: the job could not run)."""
    tune_allocator_for_streams()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = _parse(argv)
    run = _run_server_side if args.side == "server" else _run_site_side
    try:
        return asyncio.run(run(args))
    except FedcellError as exc:
        logger.error("job %s could not run: %s", args.job_id, exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
