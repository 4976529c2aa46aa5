"""``fedcell poc ...``: a whole deployment as real processes on this machine.

The logic is :mod:`fedcell.deploy.poc`; these commands print what it did. Every command takes
``--workspace DIR`` (default ``$FEDCELL_POC_WORKSPACE``, else ``~/.fedcell/poc``); the job
commands find the POC's admin kit in the same place, so after ``fedcell poc start`` a plain
``fedcell job submit DIR`` submits to the POC.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import click
from rich.console import Console
from rich.table import Table

from fedcell.cli.common import cli_errors, run_async

if TYPE_CHECKING:
    from fedcell.deploy.poc import PocProcess
    from fedcell.deploy.protocol import SiteStatus

__all__ = ["poc"]


@click.group()
def poc() -> None:
    """Run a server and N sites as local processes (proof of concept)."""


workspace_option = click.option(
    "-w",
    "--workspace",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="POC workspace (default: $FEDCELL_POC_WORKSPACE, else ~/.fedcell/poc).",
)


def _workspace(workspace: Path | None) -> Path:
    from fedcell.deploy.poc import poc_workspace

    return poc_workspace(workspace)


@poc.command()
@click.option("-n", "--n-sites", type=click.IntRange(min=1), default=2, show_default=True)
@workspace_option
@click.option("--force", is_flag=True, help="Remove an existing POC workspace first.")
def prepare(n_sites: int, workspace: Path | None, force: bool) -> None:
    """Write a POC project (server, site-1..N, admin) and provision its kits."""
    from fedcell.deploy.poc import prepare as run

    folder = _workspace(workspace)
    with cli_errors():
        report = run(n_sites, folder, force=force)
    console = Console()
    console.print(f"POC workspace {folder}: project.yml, kits in {report.kits}")
    console.print(f"participants: {', '.join(report.created)}")
    console.print("start it: fedcell poc start")


@poc.command()
@workspace_option
@click.option("--timeout", type=float, default=60.0, show_default=True,
              help="Seconds to wait for every site to connect.")  # fmt: skip
def start(workspace: Path | None, timeout: float) -> None:
    """Start the server and the sites; wait until every site is connected."""
    from fedcell.deploy.poc import processes
    from fedcell.deploy.poc import start as run

    folder = _workspace(workspace)
    sites: list[SiteStatus] = run_async(lambda: run(folder, timeout=timeout))
    with cli_errors():
        _print_processes(folder, {site.name: site for site in sites}, processes(folder))


@poc.command()
@workspace_option
def status(workspace: Path | None) -> None:
    """Show the POC's processes and which sites are connected."""
    from fedcell.deploy.poc import processes

    folder = _workspace(workspace)
    with cli_errors():
        recorded = processes(folder)
    if not recorded:
        Console().print(f"the POC in {folder} is not running (start it: fedcell poc start)")
        return
    connected: dict[str, SiteStatus] = {}
    if any(p.running and p.name == "server" for p in recorded):
        connected = {site.name: site for site in run_async(lambda: _sites(folder))}
    _print_processes(folder, connected, recorded)


async def _sites(folder: Path) -> list[SiteStatus]:
    from fedcell.deploy.admin import AdminClient
    from fedcell.deploy.poc import admin_kit

    async with AdminClient(admin_kit(folder), timeout=10.0) as admin:
        return await admin.sites()


def _print_processes(
    folder: Path, connected: dict[str, SiteStatus], recorded: list[PocProcess]
) -> None:
    table = Table(title=f"POC in {folder}")
    for column in ("participant", "pid", "process", "connected since", "jobs", "log"):
        table.add_column(column)
    for process in recorded:
        site = connected.get(process.name)
        since = time.strftime("%H:%M:%S", time.localtime(site.connected_since)) if site else "-"
        table.add_row(
            process.name,
            str(process.pid),
            "[green]running[/]" if process.running else "[red]exited[/]",
            "(listening)" if process.name == "server" and process.running else since,
            ", ".join(site.jobs) if site and site.jobs else "-",
            str(process.log.relative_to(folder)),
        )
    Console().print(table)


@poc.command()
@workspace_option
def stop(workspace: Path | None) -> None:
    """Stop the POC's processes (SIGTERM, then SIGKILL) and their jobs."""
    from fedcell.deploy.poc import stop as run

    folder = _workspace(workspace)
    with cli_errors():
        stopped = run(folder)
    if stopped:
        Console().print(f"stopped {', '.join(p.name for p in stopped)}")
    else:
        Console().print(f"the POC in {folder} was not running")


@poc.command()
@workspace_option
@click.option("--force", is_flag=True, help="Stop a running POC first.")
def clean(workspace: Path | None, force: bool) -> None:
    """Remove the POC workspace (kits, keys, logs, job results)."""
    from fedcell.deploy.poc import clean as run

    folder = _workspace(workspace)
    with cli_errors():
        run(folder, force=force)
    Console().print(f"removed {folder}")
