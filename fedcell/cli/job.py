"""``fedcell job ...``: job templates, and jobs on a deployment through the admin client.

``templates`` and ``create`` work offline (:mod:`fedcell.templates`). Every other command signs
one admin command with an admin kit (:mod:`fedcell.cli.common` says which kit) and sends it to
the server daemon through :class:`~fedcell.deploy.admin.AdminClient`:

=========================================  ==================================================
command                                    prints
=========================================  ==================================================
``submit DIR|FILE.py [--sites a,b]``       the new job's id and state
``list [--json]``                          id, name, state, submitter, submitted, duration,
                                           progress; newest first
``status ID [--json] [--watch]``           the job, each site's state, progress and metrics;
                                           ``--watch`` redraws until the job ends and exits
                                           non-zero unless it finished
``abort ID``                               the job after its processes stopped
``download ID [-o DIR]``                   where ``DIR/<id>/`` (results, logs) was written
``logs ID [--site S] [--follow]``          the server's (or site S's) job log; ``--follow``
                                           polls until the job ended and all was read
=========================================  ==================================================

A refused submission, an unknown id, an unreachable server or a refused kit is one
``Error: ...`` line on stderr and exit status 1. ``--json`` prints the server's records as they
are (``JobInfo`` fields) for scripts.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click
from rich import box
from rich.console import Console, Group, RenderableType
from rich.progress_bar import ProgressBar
from rich.table import Table

from fedcell.cli.common import cli_errors, load_job_source, resolve_admin_kit, run_async

if TYPE_CHECKING:
    from fedcell.deploy.admin import AdminClient
    from fedcell.deploy.protocol import JobInfo

__all__ = ["job"]

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

#: Seconds between two status (or log) polls of ``--watch`` / ``--follow``.
POLL_INTERVAL = 1.0

_STATE_STYLES = {
    "finished": "green",
    "running": "cyan",
    "deploying": "cyan",
    "failed": "red",
    "crashed": "red",
    "refused": "red",
    "aborted": "yellow",
}


@click.group()
def job() -> None:
    """Create jobs from templates; submit and follow jobs on a deployment."""


def kit_option(command: F) -> F:
    """The ``--kit ADMIN_KIT`` option every deployment command takes."""
    return click.option(
        "--kit",
        type=click.Path(file_okay=False, path_type=Path),
        default=None,
        help="Admin startup kit (default: $FEDCELL_ADMIN_KIT, else the POC's admin kit).",
    )(command)


def with_admin(kit: Path | None, action: Callable[[AdminClient], Awaitable[T]]) -> T:
    """Run ``await action(admin)`` with a connected admin client of ``kit``."""

    async def main() -> T:
        from fedcell.deploy.admin import AdminClient

        async with AdminClient(resolve_admin_kit(kit)) as admin:
            return await action(admin)

    return run_async(main)


# ---------------------------------------------------------------------------- templates


@job.command()
def templates() -> None:
    """List the job templates `fedcell job create` writes."""
    from fedcell.templates import TEMPLATES

    table = Table(title="job templates", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("name", style="bold", no_wrap=True)
    table.add_column("description", min_width=30)
    table.add_column("nodes")
    for template in TEMPLATES.values():
        table.add_row(template.name, template.description, template.nodes)
    Console().print(table)


@job.command()
@click.option("-t", "--template", "template_name", required=True, help="See `job templates`.")
@click.argument("directory", metavar="DIR", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--format",
    "config_format",
    type=click.Choice(["json", "yaml", "toml"]),
    default="json",
    show_default=True,
)
@click.option(
    "--sites",
    default=None,
    help="A count (the job's min_sites) or comma-separated names (the job runs exactly there).",
)
def create(template_name: str, directory: Path, config_format: str, sites: str | None) -> None:
    """Write a job folder DIR from a template."""
    from fedcell.templates import create as write
    from fedcell.templates import parse_sites

    with cli_errors():
        chosen = parse_sites(sites)
        config = write(
            template_name,
            directory,
            format=config_format,  # type: ignore[arg-type]
            sites=chosen,
        )
    console = Console()
    console.print(f"wrote {config} and {directory / 'custom'}/")
    if not isinstance(chosen, tuple):  # named sites: the simulator's site-1.. would not match
        console.print(f"run it:    fedcell simulate {directory} -n {max(2, chosen or 0)}")
    console.print(f"submit it: fedcell job submit {directory}")


# ---------------------------------------------------------------------------- deployment


@job.command()
@click.argument("source", metavar="DIR|FILE.py", type=click.Path(exists=True, path_type=Path))
@click.option("--sites", default=None, help="Comma-separated sites (default: the job's, or all).")
@kit_option
def submit(source: Path, sites: str | None, kit: Path | None) -> None:
    """Submit a job folder (or a Python file defining `job`/`make_job()`)."""
    names = [name.strip() for name in sites.split(",") if name.strip()] if sites else None
    with tempfile.TemporaryDirectory(prefix="fedcell-submit-") as scratch:
        folder = source
        if not source.is_dir():
            folder = Path(scratch) / "job"
            with cli_errors():
                load_job_source(source).export(folder)
        info: JobInfo = with_admin(kit, lambda admin: admin.submit(folder, sites=names))
    console = Console()
    console.print(f"submitted {info.name}: job {info.job_id} is {_state(info.state)}")
    console.print(f"follow it: fedcell job status {info.job_id} --watch")


@job.command(name="list")
@click.option("--json", "as_json", is_flag=True, help="The records as JSON.")
@kit_option
def list_jobs(as_json: bool, kit: Path | None) -> None:
    """List the jobs on the server, newest first."""
    infos: list[JobInfo] = with_admin(kit, lambda admin: admin.list_jobs())
    if as_json:
        click.echo(json.dumps([info.to_json() for info in infos], indent=2))
        return
    table = Table(
        title=f"{len(infos)} job(s)", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True
    )
    table.add_column("id", no_wrap=True, min_width=10)
    table.add_column("name", min_width=14, overflow="fold")
    table.add_column("state", no_wrap=True)
    table.add_column("submitter", min_width=9, overflow="fold")
    table.add_column("submitted", no_wrap=True)
    table.add_column("duration", justify="right", no_wrap=True)
    table.add_column("progress")
    for info in infos:
        table.add_row(
            info.job_id,
            info.name,
            _state(info.state),
            info.submitter,
            _clock(info.submitted_at),
            _duration(info),
            _progress_text(info.progress),
        )
    Console().print(table)


@job.command()
@click.argument("job_id", metavar="ID")
@click.option("--json", "as_json", is_flag=True, help="The record as JSON.")
@click.option("--watch", is_flag=True, help="Redraw until the job ends; exit 1 unless finished.")
@kit_option
def status(job_id: str, as_json: bool, watch: bool, kit: Path | None) -> None:
    """Show one job: state, sites, progress and metrics."""
    console = Console()
    if not watch:
        info: JobInfo = with_admin(kit, lambda admin: admin.status(job_id))
        if as_json:
            click.echo(json.dumps(info.to_json(), indent=2))
        else:
            console.print(_status_view(info))
        return

    async def follow(admin: AdminClient) -> JobInfo:
        from rich.live import Live

        current = await admin.status(job_id)
        with Live(_status_view(current), console=console, auto_refresh=False) as live:
            while not current.ended:
                await asyncio.sleep(POLL_INTERVAL)
                current = await admin.status(job_id)
                live.update(_status_view(current), refresh=True)
        return current

    ended: JobInfo = with_admin(kit, follow)
    if as_json:
        click.echo(json.dumps(ended.to_json(), indent=2))
    if ended.state != "finished":
        raise SystemExit(1)


@job.command()
@click.argument("job_id", metavar="ID")
@kit_option
def abort(job_id: str, kit: Path | None) -> None:
    """Abort a job; returns once its processes stopped."""
    info: JobInfo = with_admin(kit, lambda admin: admin.abort(job_id))
    Console().print(f"job {info.job_id} ({info.name}) is {_state(info.state)}")


@job.command()
@click.argument("job_id", metavar="ID")
@click.option(
    "-o",
    "--output",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("."),
    show_default=True,
    help="Folder to write ID/ into.",
)
@kit_option
def download(job_id: str, output: Path, kit: Path | None) -> None:
    """Download a job's results and logs into OUTPUT/ID/."""
    folder: Path = with_admin(kit, lambda admin: admin.download(job_id, output))
    console = Console()
    console.print(f"job {job_id} downloaded to {folder}")
    for path in sorted(folder.iterdir()):
        console.print(f"  {path.name}{'/' if path.is_dir() else ''}")


@job.command()
@click.argument("job_id", metavar="ID")
@click.option("--site", default=None, help="A site's job log (default: the server's).")
@click.option("--follow", is_flag=True, help="Keep printing until the job ended.")
@kit_option
def logs(job_id: str, site: str | None, follow: bool, kit: Path | None) -> None:
    """Print a job's log: the server's job process, or one site's."""

    async def read(admin: AdminClient) -> None:
        offset = 0
        while True:
            chunk = await admin.logs(job_id, site=site, offset=offset)
            if chunk.text:
                click.echo(chunk.text, nl=False)
            offset = chunk.offset
            if chunk.done or (not chunk.text and not follow):
                return
            if not chunk.text:
                await asyncio.sleep(POLL_INTERVAL)

    with_admin(kit, read)


# ---------------------------------------------------------------------------- rendering


def _state(state: str) -> str:
    return f"[{_STATE_STYLES.get(state, 'white')}]{state}[/]"


def _clock(stamp: float | None) -> str:
    if stamp is None:
        return "-"
    local = time.localtime(stamp)
    today = time.localtime()
    if local[:3] == today[:3]:
        return time.strftime("%H:%M:%S", local)
    return time.strftime("%Y-%m-%d %H:%M", local)


def _duration(info: JobInfo) -> str:
    begun = info.started_at if info.started_at is not None else info.submitted_at
    end = info.ended_at if info.ended_at is not None else time.time()
    seconds = max(0.0, end - begun)
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {seconds:02d}s"


def _metrics_text(metrics: object) -> str:
    if not isinstance(metrics, dict):
        return ""
    return "  ".join(
        f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}"
        for key, value in metrics.items()
    )


def _progress_text(progress: dict[str, Any]) -> str:
    if not progress:
        return "-"
    total = progress.get("total")
    step = f"{progress.get('step')}/{total}" if total else f"{progress.get('step')}"
    return f"{progress.get('node', '?')} {step}"


def _status_view(info: JobInfo) -> RenderableType:
    summary = Table.grid(padding=(0, 2))
    summary.add_column(style="bold")
    summary.add_column()
    summary.add_row("job", f"{info.job_id} ({info.name})")
    summary.add_row("state", _state(info.state))
    summary.add_row("submitter", info.submitter)
    summary.add_row("submitted", _clock(info.submitted_at))
    summary.add_row("started", _clock(info.started_at))
    summary.add_row("ended", _clock(info.ended_at))
    summary.add_row("duration", _duration(info))
    if info.message:
        summary.add_row("message", info.message)
    parts: list[RenderableType] = [summary]
    if info.progress:
        progress = Table(title="progress", title_justify="left")
        for column in ("node", "step", "", "metrics"):
            progress.add_column(column)
        total, step = info.progress.get("total"), info.progress.get("step", 0)
        bar: RenderableType = (
            ProgressBar(total=float(total), completed=float(step), width=30)
            if isinstance(total, int | float) and isinstance(step, int | float) and total
            else ""
        )
        progress.add_row(
            str(info.progress.get("node", "?")),
            _progress_text(info.progress).rpartition(" ")[2],
            bar,
            _metrics_text(info.progress.get("metrics")),
        )
        parts.append(progress)
    if info.sites:
        sites = Table(title="sites", title_justify="left")
        sites.add_column("site")
        sites.add_column("state")
        for name, state in sorted(info.sites.items()):
            sites.add_row(name, _state(state))
        parts.append(sites)
    return Group(*parts)
