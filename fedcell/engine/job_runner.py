"""``JobRunner``: the asyncio driver that executes the scheduler's commands for one job.

The :class:`~fedcell.engine.scheduler.Scheduler` decides; the runner acts. Its loop::

    commands = scheduler.handle(JobStarted(sites, now))
    until JobDone:    execute commands  →  wait for the next event  →  scheduler.handle(event)

- ``StartNode`` creates one asyncio task running ``controller.run(ctx)`` with a
  :class:`~fedcell.engine.dispatcher.ControllerContext` (``inputs`` = upstream outputs by node
  name, in a read-only mapping; ``workspace`` = ``<workspace>/<node>`` when the runner has a
  workspace; a per-node child of the runner's logger). Outputs are passed by reference, not
  copied (a global model may be large), and one output may feed several nodes at once: a
  controller must not mutate its inputs.
- The node's outcome comes back as an event, mapped here and nowhere else: a return value →
  ``NodeFinished``; :class:`~fedcell.errors.SiteCrashedError` → *crashed*;
  :class:`~fedcell.errors.TooFewResultsError` whose missing answers were all lost sites
  (crashed/timeout/cancelled, none failed) → *crashed*; :class:`~fedcell.errors.JobAbortedError`,
  or a cancellation the runner did not ask for → *aborted*; any other exception (user code,
  :class:`~fedcell.errors.TaskFailedError`) → *failed*. ``BaseException`` that is not an
  ``Exception`` (``KeyboardInterrupt``, ``SystemExit``) is not caught.
- ``CancelNode`` cancels the node's task; the scheduler has already settled the node, so the
  task's late outcome, if any, is ignored.
- Time limits: the runner waits for the next event no longer than the scheduler's
  :meth:`~fedcell.engine.scheduler.Scheduler.next_deadline` and then feeds ``Tick``.
- :meth:`JobRunner.abort`, :meth:`JobRunner.site_lost` and :meth:`JobRunner.site_joined` queue
  events; call them on the runner's event loop (from another thread use
  ``loop.call_soon_threadsafe``). ``abort()`` before ``run()`` aborts the job as it starts.

Checkpoints (:mod:`fedcell.engine.checkpoint`): with a ``checkpoint`` store the runner saves the
scheduler snapshot (finished outputs included) when the job starts and after every node that
finishes or fails, before starting the nodes that follow, and gives each node ``ctx.checkpoint``. A
fresh run clears the store first. ``resume=True`` rebuilds the scheduler from the store instead and
feeds it ``JobResumed``: finished nodes are not rerun, running ones start again with
``ctx.restored`` set to their last saved state, a job that was done ends at once; an empty store
starts afresh.

``run()`` returns only after every node task has ended (cancelled ones included), so a finished
runner leaves nothing running; cancelling ``run()`` itself cancels and awaits all node tasks.
Controllers must honour cancellation for that to be prompt. The runner works with any
:class:`~fedcell.engine.dispatcher.Dispatcher`: in-memory for tests and simulation, cells for
deployments. Timestamps are ``time.monotonic()`` seconds.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import types
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedcell.engine.checkpoint import CheckpointStore
from fedcell.engine.dispatcher import Controller, ControllerContext, Dispatcher
from fedcell.engine.job import Job, JobNode
from fedcell.engine.progress import ProgressEvent
from fedcell.engine.scheduler import (
    AbortRequested,
    CancelNode,
    Command,
    Event,
    FailureKind,
    JobDone,
    JobResumed,
    JobStarted,
    JobState,
    NodeFailed,
    NodeFinished,
    NodeState,
    Scheduler,
    SiteJoined,
    SiteLost,
    StartNode,
    Tick,
)
from fedcell.errors import (
    ConfigError,
    JobAbortedError,
    JobError,
    SiteCrashedError,
    TaskFailedError,
    TooFewResultsError,
)

__all__ = ["JobResult", "JobRunner", "NodeResult"]

_LOST_STATUSES = frozenset({"crashed", "timeout", "cancelled"})


@dataclass(frozen=True)
class NodeResult:
    """How one node ended.

    Attributes
    ----------
    state:
        The node's final state.
    output:
        What ``controller.run`` returned (``None`` unless *finished*).
    error:
        Why it did not finish (``"ValueError: ..."``, ``"upstream node 'a' failed"``, ...).
    exception:
        The exception the controller raised, when it raised one (for its traceback).
    started_at, finished_at:
        ``time.monotonic()`` timestamps; ``started_at`` is ``None`` for nodes never started.
    """

    name: str
    state: NodeState
    output: Any = None
    error: str | None = None
    exception: BaseException | None = None
    started_at: float | None = None
    finished_at: float | None = None

    @property
    def duration(self) -> float | None:
        """Seconds the node ran, or ``None`` if it never started."""
        if self.started_at is None or self.finished_at is None:
            return None
        return self.finished_at - self.started_at


@dataclass(frozen=True)
class JobResult:
    """How a job ended: its state, the reason, and every node's :class:`NodeResult`."""

    job_id: str
    state: JobState
    reason: str | None
    nodes: Mapping[str, NodeResult]
    started_at: float
    finished_at: float

    @property
    def ok(self) -> bool:
        return self.state is JobState.FINISHED

    @property
    def duration(self) -> float:
        return self.finished_at - self.started_at

    def output(self, node: str) -> Any:
        """The output of a finished node.

        Raises
        ------
        KeyError
            No node has that name.
        JobError
            The node did not finish (the message says how it ended).
        """
        result = self.nodes[node]
        if result.state is not NodeState.FINISHED:
            raise JobError(f"node {node!r} has no output: it {result.state.value} ({result.error})")
        return result.output

    def raise_for_state(self) -> None:
        """Raise unless the job finished: :class:`~fedcell.errors.TaskFailedError` for *failed*,
        :class:`~fedcell.errors.SiteCrashedError` for *crashed*,
        :class:`~fedcell.errors.JobAbortedError` for *aborted*, chained from the first
        controller exception behind it.

        Raises
        ------
        TaskFailedError, SiteCrashedError, JobAbortedError
            As above.
        """
        error_class: type[JobError]
        if self.state is JobState.FINISHED:
            return
        if self.state is JobState.FAILED:
            error_class = TaskFailedError
        elif self.state is JobState.CRASHED:
            error_class = SiteCrashedError
        else:
            error_class = JobAbortedError
        culprits = [
            r for r in self.nodes.values() if r.state.value == self.state.value and r.exception
        ]
        cause = min(culprits, key=lambda r: r.finished_at or 0.0).exception if culprits else None
        raise error_class(f"job {self.job_id!r} {self.state.value}: {self.reason}") from cause


class JobRunner:
    """Run one :class:`~fedcell.engine.job.Job` against a dispatcher.

    Parameters
    ----------
    job:
        The job; it is validated against ``dispatcher.sites`` when :meth:`run` starts.
    dispatcher:
        Reaches the sites; handed to every controller.
    job_id:
        Default: ``<job name>-<8 hex digits>``.
    workspace:
        A folder under which each node gets ``<workspace>/<node>`` (created on start).
    logger:
        Default: ``fedcell.job.<job_id>``; each node logs to a child named after it.
    progress:
        Receives the :class:`~fedcell.engine.progress.ProgressEvent` s controllers report.
    checkpoint:
        Where to save the job's progress so a restarted server can resume it.
    resume:
        Resume from ``checkpoint`` instead of starting afresh (needs ``checkpoint``).

    Raises
    ------
    ConfigError
        ``resume`` without a ``checkpoint`` store.
    """

    def __init__(
        self,
        job: Job,
        dispatcher: Dispatcher,
        *,
        job_id: str | None = None,
        workspace: str | Path | None = None,
        logger: logging.Logger | None = None,
        progress: Callable[[ProgressEvent], None] | None = None,
        checkpoint: CheckpointStore | None = None,
        resume: bool = False,
    ) -> None:
        if resume and checkpoint is None:
            raise ConfigError("JobRunner: resume=True needs a checkpoint store to resume from")
        self.job = job
        self._progress = progress
        self.dispatcher = dispatcher
        self.job_id = job_id or f"{job.name}-{uuid.uuid4().hex[:8]}"
        self._workspace = None if workspace is None else Path(workspace)
        self._logger = logger or logging.getLogger(f"fedcell.job.{self.job_id}")
        self._events: asyncio.Queue[Event] = asyncio.Queue()
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._cancelled: set[str] = set()
        self._exceptions: dict[str, BaseException] = {}
        self._scheduler: Scheduler | None = None
        self._nodes: Mapping[
            str, JobNode
        ] = {}  # job.nodes as of run(); Job.nodes is built per call
        self._started = False
        self._checkpoint = checkpoint
        self._resume = resume
        self._restored: dict[str, Any] = {}  # node → state it saved before the crash

    @property
    def state(self) -> JobState:
        """The job's current state (``pending`` before :meth:`run`)."""
        return JobState.PENDING if self._scheduler is None else self._scheduler.job_state

    def abort(self, reason: str = "aborted on request") -> None:
        """Abort the job: running nodes are cancelled, pending ones never start."""
        self._events.put_nowait(AbortRequested(reason, time.monotonic()))

    def site_lost(self, site: str) -> None:
        """Report a lost site; the job crashes when fewer than ``job.min_sites`` remain."""
        self._events.put_nowait(SiteLost(site, time.monotonic()))

    def site_joined(self, site: str) -> None:
        """Report a site that (re)connected."""
        self._events.put_nowait(SiteJoined(site, time.monotonic()))

    async def run(self) -> JobResult:
        """Run the job to its end and return how it went (a failed job returns, it does not
        raise; see :meth:`JobResult.raise_for_state`).

        Raises
        ------
        ConfigError
            The job is invalid for the dispatcher's sites (nothing was started).
        JobError
            ``run`` was called twice.
        CheckpointError
            Resuming: the checkpoint is corrupt or belongs to another job (nothing was
            started). Running: a checkpoint could not be written (the job's nodes are
            cancelled: a run that cannot be resumed as asked is not carried on).
        """
        if self._started:
            raise JobError(f"job {self.job_id!r}: JobRunner.run() was already called")
        self._started = True
        sites = tuple(self.dispatcher.sites)
        self.job.validate(sites)
        self._nodes = self.job.nodes
        scheduler, commands = await self._begin(sites)
        self._scheduler = scheduler
        try:
            await self._save(scheduler)
            while not self._execute(commands):
                event = await self._next_event(scheduler)
                commands = scheduler.handle(event)
                if isinstance(event, NodeFinished | NodeFailed) or any(
                    isinstance(command, JobDone) for command in commands
                ):
                    await self._save(scheduler)
        finally:
            await self._cancel_all("the job runner stopped")
        self._logger.info(
            "job %s %s%s",
            self.job_id,
            scheduler.job_state.value,
            f": {scheduler.job_reason}" if scheduler.job_reason else "",
        )
        return self._result(scheduler)

    async def _begin(self, sites: tuple[str, ...]) -> tuple[Scheduler, list[Command]]:
        """A fresh scheduler and its first commands, or the checkpointed one when resuming."""
        specs = self.job.node_specs()
        store = self._checkpoint
        if store is not None and self._resume:
            snapshot = await asyncio.to_thread(
                store.load_job, self.job_id, [spec.name for spec in specs]
            )
            if snapshot is not None:
                scheduler = Scheduler.from_snapshot(snapshot)
                running = [
                    name for name, r in scheduler.nodes.items() if r.state is NodeState.RUNNING
                ]
                for name in running:
                    self._restored[name] = await asyncio.to_thread(store.load_node, name)
                self._logger.info(
                    "job %s resuming on sites %s: finished %s, restarting %s",
                    self.job_id,
                    list(sites),
                    sorted(scheduler.outputs),
                    running,
                )
                return scheduler, scheduler.handle(JobResumed(sites, time.monotonic()))
            self._logger.info("job %s has no checkpoint yet: starting afresh", self.job_id)
        if store is not None:
            await asyncio.to_thread(store.clear)
        scheduler = Scheduler(specs, min_sites=self.job.min_sites)
        self._logger.info("job %s starting on sites %s", self.job_id, list(sites))
        return scheduler, scheduler.handle(JobStarted(sites, time.monotonic()))

    async def _save(self, scheduler: Scheduler) -> None:
        if self._checkpoint is not None:
            await asyncio.to_thread(self._checkpoint.save_job, self.job_id, scheduler.snapshot())

    async def _save_node(self, node: str, state: Any) -> None:
        if self._checkpoint is not None:
            await asyncio.to_thread(self._checkpoint.save_node, node, state)

    # ------------------------------------------------------------------ command execution

    def _execute(self, commands: list[Command]) -> bool:
        """Carry out ``commands``; return True once the job is done."""
        done = False
        for command in commands:
            if isinstance(command, StartNode):
                self._start(command)
            elif isinstance(command, CancelNode):
                self._logger.warning("cancelling node %s: %s", command.node, command.reason)
                self._cancel(command.node)
            elif isinstance(command, JobDone):
                done = True
        return done

    def _start(self, command: StartNode) -> None:
        node = self._nodes[command.node]
        workspace = None
        if self._workspace is not None:
            workspace = self._workspace / command.node
            workspace.mkdir(parents=True, exist_ok=True)
        ctx = ControllerContext(
            job_id=self.job_id,
            node=command.node,
            dispatcher=self.dispatcher,
            inputs=types.MappingProxyType(dict(command.inputs)),
            workspace=workspace,
            logger=self._logger.getChild(command.node),
            progress=self._progress,
            restored=self._restored.pop(command.node, None),
            checkpointer=None
            if self._checkpoint is None
            else functools.partial(self._save_node, command.node),
        )
        self._logger.info(
            "%s node %s", "resuming" if ctx.restored is not None else "starting", command.node
        )
        self._tasks[command.node] = asyncio.create_task(
            self._run_node(command.node, node.controller, ctx),
            name=f"fedcell-node-{self.job_id}-{command.node}",
        )

    def _cancel(self, node: str) -> None:
        task = self._tasks.get(node)
        if task is not None and not task.done():
            self._cancelled.add(node)
            task.cancel()

    async def _cancel_all(self, reason: str) -> None:
        pending = [name for name, task in self._tasks.items() if not task.done()]
        for name in pending:
            self._logger.debug("cancelling node %s: %s", name, reason)
            self._cancel(name)
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)

    async def _run_node(self, name: str, controller: Controller, ctx: ControllerContext) -> None:
        event: Event
        try:
            output = await controller.run(ctx)
        except asyncio.CancelledError:
            if name in self._cancelled:
                raise
            event = NodeFailed(name, "aborted", "its run was cancelled", time.monotonic())
        except Exception as exc:
            self._exceptions[name] = exc
            kind = _failure_kind(exc)
            self._logger.warning("node %s %s", name, kind, exc_info=exc)
            event = NodeFailed(name, kind, f"{type(exc).__name__}: {exc}", time.monotonic())
        else:
            self._logger.info("node %s finished", name)
            event = NodeFinished(name, output, time.monotonic())
        self._events.put_nowait(event)

    async def _next_event(self, scheduler: Scheduler) -> Event:
        deadline = scheduler.next_deadline()
        if deadline is None:
            return await self._events.get()
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return Tick(time.monotonic())
        try:
            return await asyncio.wait_for(self._events.get(), timeout=remaining)
        except asyncio.TimeoutError:  # the builtin TimeoutError from Python 3.11 on
            return Tick(time.monotonic())

    def _result(self, scheduler: Scheduler) -> JobResult:
        nodes = {
            name: NodeResult(
                name=name,
                state=record.state,
                output=scheduler.outputs.get(name),
                error=record.error,
                exception=self._exceptions.get(name),
                started_at=record.started_at,
                finished_at=record.finished_at,
            )
            for name, record in scheduler.nodes.items()
        }
        started_at = scheduler.job_started_at
        finished_at = scheduler.job_finished_at
        assert started_at is not None and finished_at is not None  # the job is done
        return JobResult(
            self.job_id, scheduler.job_state, scheduler.job_reason, nodes, started_at, finished_at
        )


def _failure_kind(exc: Exception) -> FailureKind:
    """Failed (user code, retrying will not help) vs crashed (sites lost) vs aborted."""
    if isinstance(exc, JobAbortedError):
        return "aborted"
    if isinstance(exc, SiteCrashedError):
        return "crashed"
    if isinstance(exc, TooFewResultsError):
        missing = [r for r in exc.results if getattr(r, "status", "ok") != "ok"]
        if missing and all(getattr(r, "status", None) in _LOST_STATUSES for r in missing):
            return "crashed"
    return "failed"
