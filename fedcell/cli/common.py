"""What the ``fedcell`` commands share: job loading, finding the admin kit, errors as one line.

Errors: every command turns the :mod:`fedcell.errors` classes (and ``OSError``) it meets into a
:class:`click.ClickException`, which click prints as one ``Error: <message>`` line on stderr
with exit status 1 and no traceback. The message is the error's own: the errors name what went
wrong (a site's policy refusal names the site and the rule; an unknown job id names the id).

Which admin kit a job command uses (first that applies):

1. ``--kit ADMIN_KIT``;
2. the environment variable ``FEDCELL_ADMIN_KIT``;
3. the POC workspace's admin kit (``fedcell poc prepare``), if that workspace exists;
4. none: the command fails with a line saying how to pass one.
"""

from __future__ import annotations

import asyncio
import os
import runpy
import sys
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import click

if TYPE_CHECKING:
    from fedcell.engine.job import Job

__all__ = ["ADMIN_KIT_ENV", "cli_errors", "load_job_source", "resolve_admin_kit", "run_async"]

#: Environment variable naming the admin kit job commands use by default.
ADMIN_KIT_ENV = "FEDCELL_ADMIN_KIT"

T = TypeVar("T")


@contextmanager
def cli_errors() -> Iterator[None]:
    """Turn fedcell errors and OS errors raised inside into one-line CLI errors."""
    from fedcell.errors import FedcellError

    try:
        yield
    except (FedcellError, OSError) as exc:
        raise click.ClickException(str(exc) or type(exc).__name__) from exc


def run_async(make: Callable[[], Awaitable[T]]) -> T:
    """Run the coroutine ``make()`` on a fresh event loop, errors as one-line CLI errors."""

    async def main() -> T:
        return await make()

    with cli_errors():
        return asyncio.run(main())


def load_job_source(source: Path) -> Job:
    """A job from a job folder, or from a Python file defining ``job`` or ``make_job()``.

    The file's folder is put on ``sys.path`` first, as ``python file.py`` would.

    Raises
    ------
    ConfigError
        If ``source`` is neither, or the folder or file does not define a valid job.
    """
    from fedcell.engine.job import Job
    from fedcell.errors import ConfigError

    if source.is_dir():
        return Job.load(source)
    if source.suffix != ".py":
        raise ConfigError(f"{source}: expected a job folder or a Python file defining `job`")
    folder = str(source.resolve().parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    namespace = runpy.run_path(str(source), run_name="fedcell_job")
    job = namespace.get("job")
    if job is None and callable(namespace.get("make_job")):
        job = namespace["make_job"]()
    if not isinstance(job, Job):
        raise ConfigError(f"{source} defines neither `job` nor `make_job()` returning a Job")
    return job


def resolve_admin_kit(kit: Path | None) -> Path:
    """The admin kit a job command uses (see the module docstring for the order).

    Raises
    ------
    ConfigError
        If none is given and no POC workspace exists, or the chosen folder is not a kit.
    """
    from fedcell.deploy.poc import admin_kit, poc_workspace
    from fedcell.errors import ConfigError

    if kit is None and os.environ.get(ADMIN_KIT_ENV):
        kit = Path(os.environ[ADMIN_KIT_ENV])
    if kit is None:
        candidate = admin_kit(poc_workspace())
        if not candidate.is_dir():
            raise ConfigError(
                f"no admin kit: pass --kit ADMIN_KIT, set {ADMIN_KIT_ENV}=ADMIN_KIT, or prepare "
                f"a local POC with `fedcell poc prepare` (none at {poc_workspace()})"
            )
        kit = candidate
    if not (kit / "kit.json").is_file():
        raise ConfigError(f"{kit} is not a startup kit (no kit.json): pass an admin's kit folder")
    return kit
