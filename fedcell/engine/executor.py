"""The engine's side of executors: the :class:`Executor` interface a site runtime drives, the
:class:`SiteContext` it passes, and :func:`run_task`, the one place where an executor's outcome
becomes a :class:`~fedcell.engine.dispatcher.TaskResult`.

It lives in the engine because the site runtime depends on it; implementations (script runner,
numpy, torch, split learning) and the registry that names them live in :mod:`fedcell.executors`,
which re-exports these names for executor authors. Life of an executor in one job::

    await executor.start(site)        once, before the first task (launch a script, build a model)
    await executor.execute(task)      per task; returns the result data (usually an FLModel)
    await executor.stop()             once, when the job ends (idempotent)

Outcomes keep user faults apart from lost work: ``execute`` returns → ``"ok"``; it raises
:class:`~fedcell.errors.TaskFailedError` or any other exception → ``"failed"`` (with the
traceback); it raises :class:`~fedcell.errors.SiteCrashedError` → ``"crashed"``.
"""

from __future__ import annotations

import abc
import logging
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedcell.engine.dispatcher import Task, TaskResult
from fedcell.errors import SiteCrashedError, TaskFailedError

__all__ = ["Executor", "SiteContext", "run_task"]


@dataclass
class SiteContext:
    """What an executor learns about the site and job it serves.

    Attributes
    ----------
    site_name:
        This site's name (``site-1``).
    job_id:
        The running job's id.
    workspace:
        A folder the executor may write to for this job (``None``: use a temporary one).
    logger:
        The site log; executors send user-code output and log records here.
    """

    site_name: str
    job_id: str
    workspace: Path | None = None
    logger: logging.Logger = field(default_factory=lambda: logging.getLogger("fedcell.site"))


@dataclass
class Executor(abc.ABC):
    """Runs tasks at a site. Subclasses are dataclasses whose fields are their configuration."""

    @property
    @abc.abstractmethod
    def task_names(self) -> tuple[str, ...]:
        """The task names this executor answers (job validation matches them to controllers)."""

    async def start(self, site: SiteContext) -> None:
        """Prepare for the job (launch a process, build a model). Called once, before tasks."""

    @abc.abstractmethod
    async def execute(self, task: Task) -> Any:
        """Run one task and return its result data.

        Raises
        ------
        TaskFailedError
            User code raised; the message holds its traceback.
        SiteCrashedError
            The code running the task was lost (process died, script exited early).
        """

    async def stop(self) -> None:
        """Release everything ``start`` acquired. Idempotent."""


async def run_task(executor: Executor, task: Task, site_name: str) -> TaskResult:
    """Run ``task`` on ``executor`` and map the outcome to a :class:`TaskResult`.

    ``TaskFailedError`` and any other exception give status ``"failed"`` (the error text holds
    the traceback), ``SiteCrashedError`` gives ``"crashed"``. Cancellation propagates.
    """
    try:
        data = await executor.execute(task)
    except SiteCrashedError as exc:
        return TaskResult(site_name, task.name, "crashed", error=str(exc))
    except TaskFailedError as exc:
        return TaskResult(site_name, task.name, "failed", error=str(exc))
    except Exception:
        return TaskResult(site_name, task.name, "failed", error=traceback.format_exc())
    return TaskResult(site_name, task.name, "ok", data=data)
