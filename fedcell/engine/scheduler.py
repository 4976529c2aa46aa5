"""The job scheduler: a pure state machine, events in, commands out.

Modelled on dask/distributed's ``worker_state_machine``: :meth:`Scheduler.handle` takes one
:class:`Event` and returns the :class:`Command` objects the driver must execute. The scheduler does
no I/O, starts no tasks, reads no clock (every event carries ``now``), so every decision can be
tested by feeding events, and its state is plain data (:meth:`Scheduler.snapshot`).
:class:`~fedcell.engine.job_runner.JobRunner` is the asyncio driver that executes the commands.

Node life cycle::

    pending ──► running ──► finished
       │           ├──────► failed    user code raised, or the node ran past its time limit
       │           ├──────► crashed   the node lost its sites (SiteCrashedError, or SiteLost)
       │           └──────► aborted   AbortRequested, or the node's run was cancelled
       ├──────────────────► skipped   an upstream node did not finish, so it never starts
       └──────────────────► aborted   the job was aborted before it started

Rules, chosen to match what workflow users expect (Airflow's ``upstream_failed``, Prefect):

- A node starts once every upstream node *finished*; it receives their outputs as ``inputs``.
  Ready nodes start in the job's topological order, so runs are deterministic.
- When a node fails, crashes or aborts itself, its transitive dependents become *skipped* and
  never start. **Independent branches keep running to completion**: their work (an evaluation,
  a second model) is still reported. The job ends once nothing is running.
- A node with a time limit that is still running at ``Tick(now)`` past ``started_at + timeout``
  is cancelled and *failed* (its algorithm did not finish in time), with the same consequences.
- ``AbortRequested`` cancels every running node and aborts every pending one; the job is
  *aborted* at once.
- ``SiteLost`` drops a site from the live set; when fewer than ``min_sites`` remain, every running
  node is cancelled as *crashed*, pending ones are *skipped*, and the job is *crashed* at once.
  (A single lost site is otherwise the controllers' business: they see *crashed* task results.)
- The final job state is, in order of precedence: *aborted* (requested), *crashed* (too few
  sites), *failed* (any node failed: retrying will not help), *crashed* (any node crashed:
  retrying may help), *aborted* (a node aborted itself), else *finished*.
- Once the job is done, :class:`JobDone` is emitted exactly once. Events about nodes that are no
  longer running (a result racing a cancel) and all events after the job is done are ignored.
  Events naming an unknown node, or arriving before :class:`JobStarted`, are driver bugs and
  raise :class:`~fedcell.errors.JobError`.
- Resume after a server crash (:mod:`fedcell.engine.checkpoint`): a scheduler rebuilt with
  :meth:`Scheduler.from_snapshot` takes :class:`JobResumed` instead of :class:`JobStarted`. Nodes
  the snapshot shows *running* start again (``StartNode``, their clock restarted); finished nodes
  keep their outputs and are not rerun; a job the snapshot shows done emits its ``JobDone``
  again (once per scheduler), so the resumed driver ends at once.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from fedcell.errors import JobError

__all__ = [
    "AbortRequested",
    "CancelNode",
    "Command",
    "Event",
    "FailureKind",
    "JobDone",
    "JobResumed",
    "JobStarted",
    "JobState",
    "NodeFailed",
    "NodeFinished",
    "NodeRecord",
    "NodeSpec",
    "NodeState",
    "Scheduler",
    "SiteJoined",
    "SiteLost",
    "StartNode",
    "Tick",
]


class NodeState(str, enum.Enum):
    """Where a DAG node is in its life cycle (see the module docstring)."""

    PENDING = "pending"
    RUNNING = "running"
    FINISHED = "finished"
    FAILED = "failed"
    CRASHED = "crashed"
    ABORTED = "aborted"
    SKIPPED = "skipped"

    def __str__(self) -> str:
        return self.value


class JobState(str, enum.Enum):
    """Where a whole job is; the terminal ones are finished, failed, crashed and aborted."""

    PENDING = "pending"
    RUNNING = "running"
    FINISHED = "finished"
    FAILED = "failed"
    CRASHED = "crashed"
    ABORTED = "aborted"

    def __str__(self) -> str:
        return self.value


FailureKind = Literal["failed", "crashed", "aborted"]

_TERMINAL_NODE_STATES = frozenset(
    {NodeState.FINISHED, NodeState.FAILED, NodeState.CRASHED, NodeState.ABORTED, NodeState.SKIPPED}
)


@dataclass(frozen=True)
class NodeSpec:
    """What the scheduler needs to know about one node: its name, the nodes it waits for, and
    its time limit in seconds (``None``: no limit)."""

    name: str
    upstream: tuple[str, ...] = ()
    timeout: float | None = None


# --------------------------------------------------------------------------- events


@dataclass(frozen=True)
class JobStarted:
    """The driver starts the job with these live sites."""

    sites: tuple[str, ...]
    now: float


@dataclass(frozen=True)
class JobResumed:
    """The driver resumes a job restored from a snapshot, with these live sites."""

    sites: tuple[str, ...]
    now: float


@dataclass(frozen=True)
class NodeFinished:
    """A node's run returned ``output``."""

    node: str
    output: Any
    now: float


@dataclass(frozen=True)
class NodeFailed:
    """A node's run ended without an output; ``kind`` says why (see :data:`FailureKind`)."""

    node: str
    kind: FailureKind
    error: str
    now: float


@dataclass(frozen=True)
class AbortRequested:
    """An admin (or the driver's owner) asks to abort the job."""

    reason: str
    now: float


@dataclass(frozen=True)
class SiteLost:
    """A site disconnected or stopped answering heartbeats."""

    site: str
    now: float


@dataclass(frozen=True)
class SiteJoined:
    """A site (re)connected."""

    site: str
    now: float


@dataclass(frozen=True)
class Tick:
    """Time passes; the driver sends one at :meth:`Scheduler.next_deadline`."""

    now: float


Event = (
    JobStarted
    | JobResumed
    | NodeFinished
    | NodeFailed
    | AbortRequested
    | SiteLost
    | SiteJoined
    | Tick
)


# --------------------------------------------------------------------------- commands


@dataclass(frozen=True)
class StartNode:
    """Run ``node`` with the outputs of its upstream nodes, keyed by node name."""

    node: str
    inputs: Mapping[str, Any]


@dataclass(frozen=True)
class CancelNode:
    """Cancel the running ``node``; the scheduler already moved it to its final state."""

    node: str
    reason: str


@dataclass(frozen=True)
class JobDone:
    """The job reached a terminal state; ``reason`` explains any state but *finished*."""

    state: JobState
    reason: str | None = None


Command = StartNode | CancelNode | JobDone


# --------------------------------------------------------------------------- state


@dataclass
class NodeRecord:
    """One node's scheduling state; plain data."""

    name: str
    upstream: tuple[str, ...]
    timeout: float | None
    state: NodeState = NodeState.PENDING
    started_at: float | None = None
    finished_at: float | None = None
    error: str | None = None


@dataclass
class _JobRecord:
    state: JobState = JobState.PENDING
    started_at: float | None = None
    finished_at: float | None = None
    live_sites: set[str] = field(default_factory=set)
    #: Set when the job is ended by a job-wide cause (abort, too few sites): (state, reason).
    forced_end: tuple[JobState, str] | None = None
    reason: str | None = None


class Scheduler:
    """Decide which nodes of a job DAG start, get cancelled, and when the job is done.

    Parameters
    ----------
    nodes:
        The job's nodes in topological order (upstream nodes first), as :class:`NodeSpec`.
    min_sites:
        The job crashes when fewer live sites remain.

    Raises
    ------
    JobError
        The node list repeats a name, or is not in topological order (a caller bug: jobs are
        validated, and ordered by :meth:`~fedcell.engine.job.Job.node_specs`, before this).
    """

    def __init__(self, nodes: Sequence[NodeSpec], *, min_sites: int = 1) -> None:
        self._nodes: dict[str, NodeRecord] = {}
        self._downstream: dict[str, list[str]] = {}
        for spec in nodes:
            if spec.name in self._nodes:
                raise JobError(f"node {spec.name!r} appears twice in the scheduler's node list")
            for upstream in spec.upstream:
                if upstream not in self._nodes:
                    raise JobError(
                        f"node {spec.name!r} waits for {upstream!r}, which is not listed before "
                        "it (nodes must come in topological order)"
                    )
                self._downstream[upstream].append(spec.name)
            self._nodes[spec.name] = NodeRecord(spec.name, tuple(spec.upstream), spec.timeout)
            self._downstream[spec.name] = []
        self._order = {name: index for index, name in enumerate(self._nodes)}
        self._min_sites = min_sites
        self._job = _JobRecord()
        self._outputs: dict[str, Any] = {}
        # Derived from the records, kept so each event costs O(nodes it touches), not O(job):
        self._running: dict[str, None] = {}
        self._unsettled = len(self._nodes)

    # ------------------------------------------------------------------ read-only views

    @property
    def job_state(self) -> JobState:
        return self._job.state

    @property
    def job_reason(self) -> str | None:
        """Why the job ended as it did (``None`` while running or when it finished)."""
        return self._job.reason

    @property
    def job_started_at(self) -> float | None:
        return self._job.started_at

    @property
    def job_finished_at(self) -> float | None:
        return self._job.finished_at

    @property
    def nodes(self) -> Mapping[str, NodeRecord]:
        """Node records by name, in topological order. Do not mutate them."""
        return self._nodes

    @property
    def outputs(self) -> Mapping[str, Any]:
        """Outputs of the finished nodes, by node name."""
        return self._outputs

    @property
    def live_sites(self) -> frozenset[str]:
        return frozenset(self._job.live_sites)

    def next_deadline(self) -> float | None:
        """The earliest time a running node hits its time limit, or ``None``."""
        deadlines = [
            record.started_at + record.timeout
            for record in map(self._nodes.__getitem__, self._running)
            if record.timeout is not None and record.started_at is not None
        ]
        return min(deadlines, default=None)

    # ------------------------------------------------------------------ transitions

    def handle(self, event: Event) -> list[Command]:
        """Apply one event; return the commands the driver must execute, in order.

        Raises
        ------
        JobError
            The event names an unknown node, or arrives before :class:`JobStarted`, or
            :class:`JobStarted` arrives twice, or :class:`JobResumed` arrives at a scheduler
            that was never started.
        """
        if isinstance(event, JobStarted):
            return self._on_job_started(event)
        if isinstance(event, JobResumed):
            return self._on_job_resumed(event)
        if self._job.state is JobState.PENDING:
            raise JobError(f"{type(event).__name__} arrived before JobStarted")
        if isinstance(event, NodeFinished | NodeFailed) and event.node not in self._nodes:
            raise JobError(f"{type(event).__name__} names unknown node {event.node!r}")
        if self._is_done():
            return []
        if isinstance(event, NodeFinished):
            return self._on_node_finished(event)
        if isinstance(event, NodeFailed):
            return self._on_node_failed(event)
        if isinstance(event, AbortRequested):
            return self._end_job(JobState.ABORTED, event.reason, NodeState.ABORTED, event.now)
        if isinstance(event, SiteLost):
            return self._on_site_lost(event)
        if isinstance(event, SiteJoined):
            self._job.live_sites.add(event.site)
            return []
        return self._on_tick(event)

    def _on_job_started(self, event: JobStarted) -> list[Command]:
        if self._job.state is not JobState.PENDING:
            raise JobError("JobStarted arrived twice")
        self._job.state = JobState.RUNNING
        self._job.started_at = event.now
        self._job.live_sites = set(event.sites)
        if len(self._job.live_sites) < self._min_sites:
            return self._end_job(
                JobState.CRASHED,
                f"the job needs at least {self._min_sites} site(s) but started with "
                f"{len(self._job.live_sites)}",
                NodeState.SKIPPED,
                event.now,
            )
        roots = [name for name, record in self._nodes.items() if not record.upstream]
        return self._start_ready(roots, event.now) + self._finish_if_idle(event.now)

    def _on_job_resumed(self, event: JobResumed) -> list[Command]:
        if self._job.state is JobState.PENDING:
            raise JobError("JobResumed arrived at a scheduler whose job never started")
        if self._is_done():
            return [JobDone(self._job.state, self._job.reason)]
        self._job.live_sites = set(event.sites)
        if len(self._job.live_sites) < self._min_sites:
            return self._end_job(
                JobState.CRASHED,
                f"the job needs at least {self._min_sites} site(s) but resumed with "
                f"{len(self._job.live_sites)}",
                NodeState.SKIPPED,
                event.now,
            )
        commands: list[Command] = []
        for name in self._running:
            record = self._nodes[name]
            record.started_at = event.now
            commands.append(StartNode(name, {up: self._outputs[up] for up in record.upstream}))
        return commands

    def _on_node_finished(self, event: NodeFinished) -> list[Command]:
        record = self._nodes[event.node]
        if record.state is not NodeState.RUNNING:
            return []
        self._transition(record, NodeState.FINISHED, event.now)
        self._outputs[event.node] = event.output
        dependents = sorted(self._downstream[event.node], key=self._order.__getitem__)
        return self._start_ready(dependents, event.now) + self._finish_if_idle(event.now)

    def _on_node_failed(self, event: NodeFailed) -> list[Command]:
        if event.kind not in ("failed", "crashed", "aborted"):
            raise JobError(f"NodeFailed for {event.node!r} has unknown kind {event.kind!r}")
        record = self._nodes[event.node]
        if record.state is not NodeState.RUNNING:
            return []
        self._settle(record, NodeState(event.kind), event.error, event.now)
        return self._finish_if_idle(event.now)

    def _on_site_lost(self, event: SiteLost) -> list[Command]:
        self._job.live_sites.discard(event.site)
        if len(self._job.live_sites) >= self._min_sites:
            return []
        return self._end_job(
            JobState.CRASHED,
            f"site {event.site!r} was lost and only {len(self._job.live_sites)} site(s) remain "
            f"(the job needs {self._min_sites})",
            NodeState.SKIPPED,
            event.now,
        )

    def _on_tick(self, event: Tick) -> list[Command]:
        commands: list[Command] = []
        for record in [self._nodes[name] for name in self._running]:
            if (
                record.timeout is not None
                and record.started_at is not None
                and event.now >= record.started_at + record.timeout
            ):
                reason = f"node {record.name!r} exceeded its time limit of {record.timeout:g} s"
                self._settle(record, NodeState.FAILED, reason, event.now)
                commands.append(CancelNode(record.name, reason))
        return commands + self._finish_if_idle(event.now)

    # ------------------------------------------------------------------ helpers

    def _settle(self, record: NodeRecord, state: NodeState, error: str, now: float) -> None:
        """Move a running node to a failure state and skip its transitive dependents."""
        self._transition(record, state, now, error)
        for name in self._descendants(record.name):
            dependent = self._nodes[name]
            if dependent.state is NodeState.PENDING:
                reason = f"upstream node {record.name!r} {state.value}"
                self._transition(dependent, NodeState.SKIPPED, now, reason)

    def _transition(
        self, record: NodeRecord, state: NodeState, now: float, error: str | None = None
    ) -> None:
        """The one place a node changes state (pending → running → terminal, or pending →
        terminal), keeping the derived running set and unsettled count in step."""
        record.state = state
        if state is NodeState.RUNNING:
            record.started_at = now
            self._running[record.name] = None
            return
        record.finished_at = now
        record.error = error
        self._running.pop(record.name, None)
        self._unsettled -= 1

    def _descendants(self, name: str) -> list[str]:
        seen: dict[str, None] = {}
        stack = list(self._downstream[name])
        while stack:
            current = stack.pop()
            if current not in seen:
                seen[current] = None
                stack.extend(self._downstream[current])
        return list(seen)

    def _start_ready(self, candidates: list[str], now: float) -> list[Command]:
        """Start those of ``candidates`` (in topological order) whose upstream all finished."""
        commands: list[Command] = []
        for record in map(self._nodes.__getitem__, candidates):
            if record.state is NodeState.PENDING and all(
                self._nodes[up].state is NodeState.FINISHED for up in record.upstream
            ):
                self._transition(record, NodeState.RUNNING, now)
                inputs = {up: self._outputs[up] for up in record.upstream}
                commands.append(StartNode(record.name, inputs))
        return commands

    def _end_job(
        self, state: JobState, reason: str, pending_becomes: NodeState, now: float
    ) -> list[Command]:
        """End the job for a job-wide cause: cancel running nodes, settle pending ones."""
        self._job.forced_end = (state, reason)
        running_becomes = NodeState(state.value)
        commands: list[Command] = []
        for record in self._nodes.values():
            if record.state is NodeState.RUNNING:
                self._transition(record, running_becomes, now, reason)
                commands.append(CancelNode(record.name, reason))
            elif record.state is NodeState.PENDING:
                self._transition(record, pending_becomes, now, reason)
        return commands + self._finish_if_idle(now)

    def _is_done(self) -> bool:
        return self._job.state not in (JobState.PENDING, JobState.RUNNING)

    def _finish_if_idle(self, now: float) -> list[Command]:
        if self._unsettled:
            return []
        state, reason = self._final_state()
        self._job.state = state
        self._job.reason = reason
        self._job.finished_at = now
        return [JobDone(state, reason)]

    def _final_state(self) -> tuple[JobState, str | None]:
        if self._job.forced_end is not None:
            return self._job.forced_end
        for node_state, job_state in (
            (NodeState.FAILED, JobState.FAILED),
            (NodeState.CRASHED, JobState.CRASHED),
            (NodeState.ABORTED, JobState.ABORTED),
        ):
            culprits = [r for r in self._nodes.values() if r.state is node_state]
            if culprits:
                first = min(culprits, key=lambda r: r.finished_at or 0.0)
                return job_state, f"node {first.name!r} {node_state.value}: {first.error}"
        return JobState.FINISHED, None

    # ------------------------------------------------------------------ persistence

    def snapshot(self) -> dict[str, Any]:
        """The whole state as plain data (str, float, lists, dicts), node outputs included as
        they are: encode it with :mod:`fedcell.transports.codec` when outputs are wire types."""
        job = self._job
        return {
            "min_sites": self._min_sites,
            "job": {
                "state": job.state.value,
                "started_at": job.started_at,
                "finished_at": job.finished_at,
                "live_sites": sorted(job.live_sites),
                "forced_end": None
                if job.forced_end is None
                else [job.forced_end[0].value, job.forced_end[1]],
                "reason": job.reason,
            },
            "nodes": [
                {
                    "name": r.name,
                    "upstream": list(r.upstream),
                    "timeout": r.timeout,
                    "state": r.state.value,
                    "started_at": r.started_at,
                    "finished_at": r.finished_at,
                    "error": r.error,
                }
                for r in self._nodes.values()
            ],
            "outputs": dict(self._outputs),
        }

    @classmethod
    def from_snapshot(cls, snapshot: Mapping[str, Any]) -> Scheduler:
        """Rebuild a scheduler from :meth:`snapshot`'s data.

        Raises
        ------
        JobError
            The snapshot is missing a field or holds an unknown state.
        """
        try:
            nodes = snapshot["nodes"]
            scheduler = cls(
                [NodeSpec(n["name"], tuple(n["upstream"]), n["timeout"]) for n in nodes],
                min_sites=int(snapshot["min_sites"]),
            )
            for node in nodes:
                record = scheduler._nodes[node["name"]]
                record.state = NodeState(node["state"])
                record.started_at = node["started_at"]
                record.finished_at = node["finished_at"]
                record.error = node["error"]
            scheduler._running = {
                name: None for name, r in scheduler._nodes.items() if r.state is NodeState.RUNNING
            }
            scheduler._unsettled = sum(
                r.state not in _TERMINAL_NODE_STATES for r in scheduler._nodes.values()
            )
            job = snapshot["job"]
            forced_end = job["forced_end"]
            scheduler._job = _JobRecord(
                state=JobState(job["state"]),
                started_at=job["started_at"],
                finished_at=job["finished_at"],
                live_sites=set(job["live_sites"]),
                forced_end=None if forced_end is None else (JobState(forced_end[0]), forced_end[1]),
                reason=job["reason"],
            )
            scheduler._outputs = dict(snapshot["outputs"])
        except (KeyError, TypeError, ValueError) as exc:
            raise JobError(f"scheduler snapshot is malformed: {exc!r}") from exc
        return scheduler
