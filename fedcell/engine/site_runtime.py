"""``SiteRuntime``: a site's side of its jobs — tasks in, executor results out.

One runtime per site cell. For each job it holds the executors that answer the job's tasks
(``task name → Executor``, from :meth:`~fedcell.engine.job.Job.executors_for`), starts them once
when the job is added and stops them when it is removed. It serves two channels:

- :data:`~fedcell.engine.cell_dispatcher.TASK_CHANNEL` (request ``{"job", "task"}``): run the task
  on its executor and reply with a :class:`~fedcell.engine.dispatcher.TaskResult`, mapped by
  :func:`~fedcell.executors.base.run_task` (``ok`` / ``failed`` for user errors / ``crashed``
  when the training process was lost). A task for an unknown job or task name gets a ``failed``
  result that says so, and the site keeps serving.
- :data:`~fedcell.engine.cell_dispatcher.ABANDON_CHANNEL` (one-way): cancel that job's running
  task of that name (the controller gave up on it).
- :data:`~fedcell.engine.cell_dispatcher.PRESENCE_CHANNEL` (request): answers with the ids of
  the jobs served here, so a job's server that is not this cell's neighbour can tell it is there.

The site's name (in results and in what executors see) is the cell's name unless given: a
deployed site serves a job from the cell ``site-1.job-<id>`` under its own name ``site-1``.

Tasks of one job run one at a time per executor, in arrival order: a training script serves one
task at a time; tasks for different executors or jobs run concurrently.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedcell.engine.cell_dispatcher import ABANDON_CHANNEL, PRESENCE_CHANNEL, TASK_CHANNEL
from fedcell.engine.dispatcher import Task, TaskResult
from fedcell.engine.executor import Executor, SiteContext, run_task
from fedcell.errors import ConfigError
from fedcell.transports.cell import Cell
from fedcell.transports.message import Message

__all__ = ["SiteRuntime"]

logger = logging.getLogger(__name__)


@dataclass
class _JobAtSite:
    executors: dict[str, Executor]
    locks: dict[int, asyncio.Lock] = field(default_factory=dict)
    running: dict[str, asyncio.Task[TaskResult]] = field(default_factory=dict)

    def lock_for(self, executor: Executor) -> asyncio.Lock:
        return self.locks.setdefault(id(executor), asyncio.Lock())


class SiteRuntime:
    """Serve the tasks of one or more jobs at a site cell.

    Parameters
    ----------
    cell:
        The site's cell (started or not; handlers are registered at once).
    site_name:
        The site's name (default: the cell's name).
    """

    def __init__(self, cell: Cell, *, site_name: str | None = None) -> None:
        self._cell = cell
        self._site_name = site_name or cell.name
        self._jobs: dict[str, _JobAtSite] = {}
        cell.register(TASK_CHANNEL, self._on_task)
        cell.register(ABANDON_CHANNEL, self._on_abandon)
        cell.register(PRESENCE_CHANNEL, self._on_presence)

    @property
    def site_name(self) -> str:
        return self._site_name

    @property
    def jobs(self) -> tuple[str, ...]:
        return tuple(self._jobs)

    async def add_job(
        self,
        job_id: str,
        executors: Mapping[str, Executor],
        *,
        workspace: Path | None = None,
    ) -> None:
        """Start the job's executors (each distinct executor once) and serve its tasks.

        Raises
        ------
        ConfigError
            If the job is already served here.
        """
        if job_id in self._jobs:
            raise ConfigError(f"job {job_id!r} already runs at site {self.site_name!r}")
        context = SiteContext(
            site_name=self.site_name,
            job_id=job_id,
            workspace=workspace,
            logger=logging.getLogger(f"fedcell.site.{self.site_name}"),
        )
        started: list[Executor] = []
        try:
            for executor in _distinct(executors.values()):
                await executor.start(context)
                started.append(executor)
        except BaseException:
            for executor in started:
                await executor.stop()
            raise
        self._jobs[job_id] = _JobAtSite(dict(executors))

    async def remove_job(self, job_id: str) -> None:
        """Cancel the job's running tasks and stop its executors. Idempotent."""
        job = self._jobs.pop(job_id, None)
        if job is None:
            return
        for running in list(job.running.values()):
            running.cancel()
        for executor in _distinct(job.executors.values()):
            try:
                await executor.stop()
            except Exception:
                logger.exception("site %s: stopping %r failed", self.site_name, executor)

    async def close(self) -> None:
        """Remove every job."""
        for job_id in list(self._jobs):
            await self.remove_job(job_id)

    async def _on_task(self, message: Message) -> TaskResult:
        payload = message.payload
        if not (isinstance(payload, dict) and isinstance(payload.get("task"), Task)):
            raise ConfigError(f"malformed task request from {message.sender}")
        task: Task = payload["task"]
        job = self._jobs.get(str(payload.get("job")))
        if job is None:
            return TaskResult(
                self.site_name,
                task.name,
                "failed",
                error=f"site {self.site_name} does not run job {payload.get('job')!r}",
            )
        executor = job.executors.get(task.name)
        if executor is None:
            return TaskResult(
                self.site_name,
                task.name,
                "failed",
                error=f"site {self.site_name} has no executor for task {task.name!r}",
            )
        async with job.lock_for(executor):
            running = asyncio.ensure_future(run_task(executor, task, self.site_name))
            job.running[task.name] = running
            try:
                return await running
            except asyncio.CancelledError:
                if running.cancelled():  # abandoned by the controller, not a runtime shutdown
                    return TaskResult(
                        self.site_name, task.name, "cancelled", error="abandoned by the controller"
                    )
                raise
            finally:
                job.running.pop(task.name, None)

    async def _on_presence(self, message: Message) -> list[str]:
        return list(self._jobs)

    async def _on_abandon(self, message: Message) -> None:
        payload = message.payload
        if not isinstance(payload, dict):
            return
        job = self._jobs.get(str(payload.get("job")))
        running = job.running.get(str(payload.get("task"))) if job else None
        if running is not None:
            running.cancel()


def _distinct(executors: Any) -> list[Executor]:
    seen: dict[int, Executor] = {}
    for executor in executors:
        seen.setdefault(id(executor), executor)
    return list(seen.values())
