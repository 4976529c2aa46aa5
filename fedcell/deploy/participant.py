"""A participant's process: ``python -m fedcell.deploy.participant KIT`` (what ``start.sh`` runs).

Loads and verifies the startup kit, then runs the participant's daemon until SIGTERM or SIGINT,
with its workspace in ``--workspace`` (default: ``<kit>/workspace``):

- the **server** runs :class:`~fedcell.deploy.server_daemon.ServerDaemon`: it listens on the
  project's listen address (peers are admitted by their CA-signed curve keys and bound to their
  certificate names, :meth:`StartupKit.cell`), takes admin commands and runs jobs; stopping it
  aborts its running jobs;
- a **site** runs :class:`~fedcell.deploy.site_daemon.SiteDaemon`: it connects to the server,
  takes the jobs its policy (``--policy``, default ``<kit>/policy.yml``) admits and runs their
  site job processes; stopping it stops them.

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
from fedcell.deploy.site_daemon import SiteDaemon
from fedcell.engine.memory import tune_allocator_for_streams
from fedcell.errors import ConfigError, FedcellError
from fedcell.transports.cell import CellConfig

__all__ = ["main", "serve"]

logger = logging.getLogger(__name__)


async def serve(
    kit: StartupKit,
    stop: asyncio.Event,
    config: CellConfig | None = None,
    workspace: Path | None = None,
    policy: Path | None = None,
) -> None:
    """Run ``kit``'s daemon until ``stop`` is set (workspace default: ``<kit>/workspace``;
    ``policy``: a site's policy file, default the one in its kit).

    Raises
    ------
    ConfigError
        If ``kit`` is an admin's kit.
    ConnectError
        If the server cannot listen, or a site's server does not answer the handshake (a site's
        key it does not admit looks the same: the handshake never completes).
    CellError
        If the server refuses the site's hello.
    """
    if kit.role not in ("server", "site"):
        raise ConfigError(f"{kit.name!r} is an admin ({kit.role}): admin kits run no process")
    workspace = workspace or kit.folder / "workspace"
    if kit.role == "server":
        await ServerDaemon(kit, workspace, config=config).run(stop)
    else:
        await SiteDaemon(kit, workspace, policy, config=config).run(stop)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``start.sh``."""
    parser = argparse.ArgumentParser(prog="fedcell.deploy.participant", description=__doc__)
    parser.add_argument("kit", type=Path, help="the startup kit folder")
    parser.add_argument("--workspace", type=Path, help="jobs and logs (default: KIT/workspace)")
    parser.add_argument("--policy", type=Path, help="a site's policy file (default: in KIT)")
    parser.add_argument("--connect-timeout", type=float, default=30.0)
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    tune_allocator_for_streams()
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        kit = StartupKit.load(args.kit)
        config = CellConfig(connect_timeout=args.connect_timeout)
        await serve(kit, stop, config, args.workspace, args.policy)

    try:
        asyncio.run(run())
    except FedcellError as exc:
        logger.error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
