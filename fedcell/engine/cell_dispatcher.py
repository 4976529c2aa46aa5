"""``CellDispatcher``: the :class:`~fedcell.engine.dispatcher.Dispatcher` over cells.

The server side of a job. Each dispatched task is one cell broadcast (a request per target, the payload encoded
once) on channel :data:`TASK_CHANNEL`, answered by that site's :class:`~fedcell.engine.site_runtime.SiteRuntime`
with a :class:`~fedcell.engine.dispatcher.TaskResult`. Requests run concurrently and each reply is
handed to the :class:`~fedcell.engine.dispatcher.TaskHandle` the moment it arrives, so a
controller folds results in as they come (in-time aggregation); a reply too large for one message
arrives through the stream layer straight into preallocated arrays, and the stream layer's inbound
budget bounds how many such replies assemble at once.

Outcome mapping (kept apart as the engine requires):

- the site ran the task → its ``TaskResult`` as sent (``ok``, or ``failed`` when user code raised);
- the site is unknown or was lost while working (``UnreachableError``, the cell's heartbeats
  detect it within the peer timeout) → ``crashed``;
- the cell request timed out → ``timeout`` (the handle's own deadline normally comes first);
- anything else the site's runtime answered with an error → ``failed`` with the remote message.

Abandoned targets (deadline, cancel) get a one-way :data:`ABANDON_CHANNEL` message so they stop
working on the task; their late replies are dropped by the handle.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from fedcell.engine.dispatcher import Dispatcher, Task, TaskHandle, TaskResult
from fedcell.errors import (
    ConfigError,
    FedcellError,
    RequestTimeoutError,
    UnreachableError,
)
from fedcell.transports.cell import Cell

__all__ = ["ABANDON_CHANNEL", "JOB_END_CHANNEL", "TASK_CHANNEL", "CellDispatcher"]

TASK_CHANNEL = "fc.task"
JOB_END_CHANNEL = "fc.job_end"
ABANDON_CHANNEL = "fc.abandon"

#: Cell request timeout for tasks without one: liveness comes from heartbeats, not a clock.
NO_DEADLINE = 30 * 24 * 3600.0

logger = logging.getLogger(__name__)


class CellDispatcher(Dispatcher):
    """Dispatch a job's tasks to site cells through the server's cell.

    Parameters
    ----------
    cell:
        The server's (started) cell.
    job_id:
        Sent with every task so a site serving several jobs routes it to the right executors.
    sites:
        The job's sites, by cell name.
    """

    def __init__(self, cell: Cell, job_id: str, sites: Sequence[str]) -> None:
        if not sites:
            raise ConfigError(f"job {job_id!r} has no sites")
        self._cell = cell
        self._job_id = job_id
        self._sites = tuple(sites)

    @property
    def sites(self) -> Sequence[str]:
        return self._sites

    def broadcast(self, task: Task, targets: Sequence[str] | None = None) -> TaskHandle:
        chosen = tuple(self._sites if targets is None else targets)
        unknown = [site for site in chosen if site not in self._sites]
        if unknown:
            raise ConfigError(
                f"task {task.name!r}: {unknown} are not sites of job {self._job_id!r}"
            )
        handle = _CellTaskHandle(self._cell, self._job_id, task, chosen)
        handle.launch()
        return handle


class _CellTaskHandle(TaskHandle):
    def __init__(self, cell: Cell, job_id: str, task: Task, targets: Sequence[str]) -> None:
        super().__init__(task, targets)
        self._cell = cell
        self._job_id = job_id
        self._gathering: asyncio.Task[None] | None = None

    def launch(self) -> None:
        self._gathering = asyncio.ensure_future(self._gather())

    async def _gather(self) -> None:
        # One broadcast: the task (a large model too) is encoded, hashed and compressed once
        # whatever the number of sites; replies are handed over as each arrives and forgotten.
        payload = {"job": self._job_id, "task": self.task}
        replies = self._cell.broadcast_replies(
            self.targets, TASK_CHANNEL, payload, timeout=self.task.timeout or NO_DEADLINE
        )
        async for site, reply in replies:
            self.deliver(self._result(site, reply))
            del reply  # hold no result while waiting for the next one

    def _result(self, site: str, reply: object) -> TaskResult:
        name = self.task.name
        if isinstance(reply, UnreachableError):
            return TaskResult(site, name, "crashed", error=f"site lost: {reply}")
        if isinstance(reply, RequestTimeoutError):
            return TaskResult(site, name, "timeout", error=str(reply))
        if isinstance(reply, BaseException):
            return TaskResult(site, name, "failed", error=f"{type(reply).__name__}: {reply}")
        if not isinstance(reply, TaskResult) or reply.site != site:
            return TaskResult(site, name, "failed", error=f"malformed task reply from {site}")
        return reply

    async def abandon(self, sites: tuple[str, ...]) -> None:
        # Called once, for every target still pending: stop waiting for all of them.
        if self._gathering is not None:
            self._gathering.cancel()
        for site in sites:
            try:
                await self._cell.send(
                    site, ABANDON_CHANNEL, {"job": self._job_id, "task": self.task.name}
                )
            except FedcellError as exc:  # best effort: the site may be gone already
                logger.debug("could not tell %s to abandon %s: %s", site, self.task.name, exc)
