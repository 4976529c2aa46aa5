"""A participant's process: ``python -m fedcell.deploy.participant KIT`` (what ``start.sh`` runs).

Loads and verifies the startup kit, then runs the participant's secured cell until SIGTERM or
SIGINT:

- the **server** listens on the project's listen address; peers are admitted by their CA-signed
  curve keys and bound to their certificate names (:meth:`StartupKit.cell`);
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
from fedcell.engine.site_runtime import SiteRuntime
from fedcell.errors import ConfigError, FedcellError
from fedcell.transports.cell import Cell, CellConfig, PeerEvent

__all__ = ["main", "serve"]

logger = logging.getLogger(__name__)


async def serve(kit: StartupKit, stop: asyncio.Event, config: CellConfig | None = None) -> None:
    """Run ``kit``'s cell (and a site's runtime) until ``stop`` is set.

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
    cell: Cell = kit.cell(config=config)

    def log_peer(name: str, event: PeerEvent) -> None:
        logger.info("%s: %s %s", kit.name, name, event)

    cell.add_peer_listener(log_peer)
    runtime = SiteRuntime(cell) if kit.role == "site" else None
    try:
        await cell.start()
        where = f"listening on {cell.url}" if kit.role == "server" else f"linked to {cell.parent}"
        logger.info("%s (%s of %s) is up, %s", kit.name, kit.role, kit.project, where)
        await stop.wait()
    finally:
        if runtime is not None:
            await runtime.close()
        await cell.stop()


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``start.sh``."""
    parser = argparse.ArgumentParser(prog="fedcell.deploy.participant", description=__doc__)
    parser.add_argument("kit", type=Path, help="the startup kit folder")
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
        await serve(kit, stop, CellConfig(connect_timeout=args.connect_timeout))

    try:
        asyncio.run(run())
    except FedcellError as exc:
        logger.error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
