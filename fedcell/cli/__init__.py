"""The ``fedcell`` command line.

``fedcell simulate JOB -n N`` runs a job on simulated sites. ``JOB`` is either a job folder
(``job.json``/``job.yaml``/``job.toml`` + ``custom/``, as :meth:`Job.export` writes it) or a
Python file that defines a module-level ``job`` (a :class:`~fedcell.engine.job.Job`) or a
``make_job()`` function returning one; the file's folder is put on ``sys.path`` first, as
``python file.py`` would.

``fedcell provision project.yml`` writes one startup kit per participant
(:mod:`fedcell.deploy.provision`).

``fedcell job ...`` (:mod:`fedcell.cli.job`) writes job folders from templates and submits,
lists, follows, aborts and downloads jobs on a deployment; ``fedcell poc ...``
(:mod:`fedcell.cli.poc`) runs a whole deployment as processes on this machine.
Errors print as one ``Error: ...`` line with exit status 1 (:mod:`fedcell.cli.common`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from fedcell import __version__
from fedcell.cli.common import load_job_source
from fedcell.cli.job import job as job_commands
from fedcell.cli.poc import poc as poc_commands

__all__ = ["main"]


@click.group()
@click.version_option(__version__, prog_name="fedcell")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
def main(verbose: int) -> None:
    """fedcell: federated-learning workflows as DAG jobs over cells."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")


@main.command()
@click.argument("job_source", metavar="JOB", type=click.Path(exists=True, path_type=Path))
@click.option("-n", "--n-clients", type=click.IntRange(min=1), default=2, show_default=True)
@click.option(
    "--mode",
    type=click.Choice(["threads", "processes"]),
    default="threads",
    show_default=True,
    help="Sites as threads over inproc, or as processes over ipc.",
)
@click.option(
    "-w",
    "--workspace",
    type=click.Path(path_type=Path),
    default=None,
    help="Results folder (default: ./results/<job>-<id>).",
)
@click.option("--quiet", is_flag=True, help="No live progress display.")
def simulate(
    job_source: Path, n_clients: int, mode: str, workspace: Path | None, quiet: bool
) -> None:
    """Run JOB on N simulated sites and print the metrics table."""
    from fedcell.engine.simulator import simulate as run
    from fedcell.errors import FedcellError

    console = Console()
    try:
        job = load_job_source(job_source)
        result = run(job, n_clients, mode=mode, workspace=workspace, progress=not quiet)  # type: ignore[arg-type]
    except FedcellError as exc:
        raise click.ClickException(str(exc)) from exc
    table = Table(title=f"{job.name}: {result.job.state.value} in {result.job.duration:.2f} s")
    table.add_column("node")
    table.add_column("state")
    table.add_column("seconds", justify="right")
    table.add_column("final metrics")
    for name, node in result.job.nodes.items():
        metrics = getattr(node.output, "metrics", None) or {}
        shown = ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()
        )
        seconds = f"{node.duration:.2f}" if node.duration is not None else "-"
        table.add_row(name, node.state.value, seconds, shown or (node.error or ""))
    console.print(table)
    console.print(f"results: {result.workspace}")
    if not result.ok:
        raise SystemExit(1)


@main.command()
@click.argument("project_file", metavar="PROJECT_YML", type=click.Path(exists=True, path_type=Path))
@click.option(
    "-w",
    "--workspace",
    type=click.Path(path_type=Path),
    default=None,
    help="Holds state/ (CA and keys, kept across runs) and kits/ (default: the file's folder).",
)
def provision(project_file: Path, workspace: Path | None) -> None:
    """Write a startup kit per participant of PROJECT_YML (again: only what changed)."""
    from fedcell.deploy.project import load_project
    from fedcell.deploy.provision import provision as run
    from fedcell.errors import FedcellError

    console = Console()
    try:
        report = run(load_project(project_file), workspace or project_file.resolve().parent)
    except (FedcellError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    table = Table(title=f"startup kits in {report.kits}")
    table.add_column("participant")
    table.add_column("kit")
    table.add_column("certificate")
    rows = [(name, "new") for name in report.created]
    rows += [(name, "updated: " + ", ".join(files)) for name, files in report.updated.items()]
    rows += [(name, "unchanged") for name in report.unchanged]
    rows += [(name, "stale: no longer in the project") for name in report.stale]
    for name, kit in rows:
        table.add_row(name, kit, "issued" if name in report.issued else "kept")
    console.print(table)


main.add_command(job_commands)
main.add_command(poc_commands)
