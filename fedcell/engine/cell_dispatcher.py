"""``CellDispatcher``: the :class:`~fedcell.engine.dispatcher.Dispatcher` over cells.

The server side of a job. Each dispatched task is one cell broadcast (a request per target, the payload encoded
once) on channel :data:`TASK_CHANNEL`, answered by that site's :class:`~fedcell.engine.site_runtime.SiteRuntime`
with a :class:`~fedcell.engine.dispatcher.TaskResult`. Requests run concurrently and each reply is
handed to the :class:`~fedcell.engine.dispatcher.TaskHandle` the moment it arrives, so a
controller folds results in as they come (in-time aggregation); a reply too large for one message
arrives through the stream layer straight into preallocated arrays, and the stream layer's inbound
budget bounds how many such replies assemble at once.

With a :class:`~fedcell.engine.dispatcher.StreamingFold` (``broadcast(..., fold=...)``), a
streamed reply is not assembled at all: the cell request's ``reply_sink`` hands the reply's
skeleton (a ``TaskResult`` whose arrays are dtype/shape specs) to ``fold.open_stream`` at the
stream's ``OPEN`` if it is an ok result of a pending target, and the sink it returns folds each
verified chunk as it arrives; once the stream verified, the handle yields what the sink's
``finish`` returned. A reply the fold rejects fails that target's request at ``OPEN`` (recorded
``failed``, the site is told to stop sending); a reply stream that breaks fails it with the
stream's error (``crashed`` when the site was lost). Once the handle stops waiting for a target
(deadline, cancel), its sink takes no further chunk.

Outcome mapping (kept apart as the engine requires):

- the site ran the task → its ``TaskResult`` as sent (``ok``, or ``failed`` when user code raised);
- the site is unknown or was lost while working (``UnreachableError``, the cell's heartbeats
  detect it within the peer timeout) → ``crashed``;
- the cell request timed out → ``timeout`` (the handle's own deadline normally comes first);
- anything else the site's runtime answered with an error → ``failed`` with the remote message.

Abandoned targets (deadline, cancel) get a one-way :data:`ABANDON_CHANNEL` message so they stop
working on the task; their late replies are dropped by the handle.

Sites and their cells. Controllers, results, records and metrics speak of plain site names
(``site-1``). Where a site serves the job from a cell of another name (a deployed site's job
process is ``site-1.job-<id>``), ``cell_names`` maps site → cell; requests go to the cell, and
the site's runtime answers under its plain site name. Site runtimes also answer
:data:`PRESENCE_CHANNEL` requests: how a job's server that is not the sites' neighbour learns
they are there (:mod:`fedcell.engine.presence`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from fedcell.engine.dispatcher import Dispatcher, StreamingFold, Task, TaskHandle, TaskResult
from fedcell.errors import (
    ConfigError,
    FedcellError,
    RequestTimeoutError,
    UnreachableError,
)
from fedcell.transports.array_sink import ArraySink
from fedcell.transports.cell import Cell

__all__ = [
    "ABANDON_CHANNEL",
    "JOB_END_CHANNEL",
    "PRESENCE_CHANNEL",
    "TASK_CHANNEL",
    "CellDispatcher",
]

TASK_CHANNEL = "fc.task"
JOB_END_CHANNEL = "fc.job_end"
ABANDON_CHANNEL = "fc.abandon"
PRESENCE_CHANNEL = "fc.presence"

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
        The job's sites.
    cell_names:
        Site → the cell that serves the job there (default: the site's own name).
    """

    def __init__(
        self,
        cell: Cell,
        job_id: str,
        sites: Sequence[str],
        cell_names: Mapping[str, str] | None = None,
    ) -> None:
        if not sites:
            raise ConfigError(f"job {job_id!r} has no sites")
        self._cell = cell
        self._job_id = job_id
        self._sites = tuple(sites)
        self._cell_names = {site: (cell_names or {}).get(site, site) for site in self._sites}

    @property
    def sites(self) -> Sequence[str]:
        return self._sites

    def broadcast(
        self,
        task: Task,
        targets: Sequence[str] | None = None,
        *,
        fold: StreamingFold | None = None,
    ) -> TaskHandle:
        chosen = tuple(self._sites if targets is None else targets)
        unknown = [site for site in chosen if site not in self._sites]
        if unknown:
            raise ConfigError(
                f"task {task.name!r}: {unknown} are not sites of job {self._job_id!r}"
            )
        handle = _CellTaskHandle(self._cell, self._job_id, task, chosen, self._cell_names, fold)
        handle.launch()
        return handle


class _CellTaskHandle(TaskHandle):
    def __init__(
        self,
        cell: Cell,
        job_id: str,
        task: Task,
        targets: Sequence[str],
        cell_names: Mapping[str, str],
        fold: StreamingFold | None,
    ) -> None:
        super().__init__(task, targets)
        self._cell = cell
        self._job_id = job_id
        self._cell_names = cell_names
        self._site_of = {cell_names[site]: site for site in self.targets}
        self._fold = fold
        self._gathering: asyncio.Task[None] | None = None

    def launch(self) -> None:
        self._gathering = asyncio.ensure_future(self._gather())

    async def _gather(self) -> None:
        # One broadcast: the task (a large model too) is encoded, hashed and compressed once
        # whatever the number of sites; replies are handed over as each arrives and forgotten.
        site_of = self._site_of
        replies = self._cell.broadcast_replies(
            list(site_of),
            TASK_CHANNEL,
            {"job": self._job_id, "task": self.task},
            timeout=self.task.timeout or NO_DEADLINE,
            reply_sink=None if self._fold is None else self._reply_sink,
            on_handed_over=self._handed_over,
        )
        async for cell_name, reply in replies:
            self.deliver(self._result(site_of[cell_name], reply))
            del reply  # hold no result while waiting for the next one

    def _handed_over(self) -> None:
        # The cell holds the encoded task until every site has it: this handle keeps only the
        # task's name and deadline, and the fold's owner may let go of the data too.
        self.task = replace(self.task, data=None)
        if self._fold is not None:
            self._fold.task_handed_over()

    def _reply_sink(self, cell_name: str, skeleton: Any) -> ArraySink | None:
        # Only an ok result of a target still waited for is folded while it streams in; any
        # other reply is assembled and judged whole by ``_result``.
        site = self._site_of.get(cell_name)
        if self._fold is None or site not in self.pending:
            return None
        if not (isinstance(skeleton, TaskResult) and skeleton.site == site and skeleton.ok):
            return None
        return self._fold.open_stream(skeleton)

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
        # Called once, for every target still pending: stop waiting for all of them. The handle
        # lets go of the cancelled task: its CancelledError's traceback holds the frames that
        # hold this handle (the task, the fold and the model), a cycle only the cyclic garbage
        # collector would free.
        gathering, self._gathering = self._gathering, None
        if gathering is not None:
            gathering.cancel()
        for site in sites:
            try:
                await self._cell.send(
                    self._cell_names[site],
                    ABANDON_CHANNEL,
                    {"job": self._job_id, "task": self.task.name},
                )
            except FedcellError as exc:  # best effort: the site may be gone already
                logger.debug("could not tell %s to abandon %s: %s", site, self.task.name, exc)
