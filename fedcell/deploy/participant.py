"""A participant's process: ``python -m fedcell.deploy.participant KIT`` (what ``start.sh`` runs).

Loads and verifies the startup kit, then runs the participant's daemon until SIGTERM or SIGINT,
with its workspace in ``--workspace`` (default: ``<kit>/workspace``):

- the **server** runs :class:`~fedcell.deploy.server_daemon.ServerDaemon`: it listens on the
  project's listen address (peers are admitted by their CA-signed curve keys and bound to their
  certificate names, :meth:`StartupKit.cell`), takes admin commands and runs jobs; stopping it
  aborts its running jobs;
- a **site** connects to the server and serves tasks through a
  :class:`~fedcell.engine.site_runtime.SiteRuntime` (the job layer adds jobs to it).

Joins and leaves are logged. Exit status: 0 after a signal, 2 when the kit is invalid or the server
refuses or does not answer (``--connect-timeout``); a supervisor restarts the process. Admin kits
run no process: they sign commands (:func:`~fedcell.deploy.commands.sign_command`).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from pathlib import Path

from fedcell.deploy.kit import StartupKit
from fedcell.deploy.server_daemon import ServerDaemon
from fedcell.engine.site_runtime import SiteRuntime
from fedcell.errors import ConfigError, FedcellError
from fedcell.transports.cell import Cell, CellConfig, PeerEvent

__all__ = ["main", "serve"]

logger = logging.getLogger(__name__)


async def serve(
    kit: StartupKit,
    stop: asyncio.Event,
    config: CellConfig | None = None,
    workspace: Path | None = None,
) -> None:
    """Run ``kit``'s daemon until ``stop`` is set (workspace default: ``<kit>/workspace``).

    Raises
    ------
    ConfigError
        If ``kit`` is an admin's kit.
    ConnectError
        If the server does not answer the handshake (a site's key it does not admit looks
        the same: the handshake never completes).
    CellError
        If the server refuses the site's hello.
    """
    if kit.role not in ("server", "site"):
        raise ConfigError(f"{kit.name!r} is an admin ({kit.role}): admin kits run no process")
    workspace = workspace or kit.folder / "workspace"
    if kit.role == "server":
        await ServerDaemon(kit, workspace, config=config).run(stop)
        return
    cell: Cell = kit.cell(config=config)

    def log_peer(name: str, event: PeerEvent) -> None:
        logger.info("%s: %s %s", kit.name, name, event)

    cell.add_peer_listener(log_peer)
    runtime = SiteRuntime(cell)
    try:
        await cell.start()
        logger.info("%s (site of %s) is up, linked to %s", kit.name, kit.project, cell.parent)
        await stop.wait()
    finally:
        await runtime.close()
        await cell.stop()


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``start.sh``."""
    parser = argparse.ArgumentParser(prog="fedcell.deploy.participant", description=__doc__)
    parser.add_argument("kit", type=Path, help="the startup kit folder")
    parser.add_argument("--workspace", type=Path, help="jobs and logs (default: KIT/workspace)")
    parser.add_argument("--connect-timeout", type=float, default=30.0)
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        kit = StartupKit.load(args.kit)
        await serve(kit, stop, CellConfig(connect_timeout=args.connect_timeout), args.workspace)

    try:
        asyncio.run(run())
    except FedcellError as exc:
        logger.error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
