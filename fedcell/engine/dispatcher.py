"""The seam between controllers (algorithms) and the runtime that reaches sites.

A controller is an algorithm written against :class:`Dispatcher`; the server runtime implements
it over cells, the tests implement it in memory. Vocabulary:

- a :class:`Task` is what a site is asked to do (``name`` such as ``"train"``/``"validate"``,
  ``data`` usually an :class:`~fedcell.fl_model.FLModel`, ``props`` small settings);
- a :class:`TaskResult` is one site's answer, with a status that keeps *failed* (user code
  raised) apart from *crashed* (site lost) and *timeout*;
- :meth:`Dispatcher.broadcast` returns a :class:`TaskHandle` that yields results **as they
  arrive**, which is what makes in-time aggregation possible (fold each result, drop it);
- ``*_and_wait`` forms collect results; ``min_responses`` lets a round proceed after k of n.

A controller is one class with ``async run(ctx) -> output``; ``ctx.inputs`` holds the outputs of
the DAG nodes it depends on, keyed by node name.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fedcell.transports.codec import wire_type

__all__ = [
    "Controller",
    "ControllerContext",
    "Dispatcher",
    "Task",
    "TaskHandle",
    "TaskResult",
    "TaskStatus",
]

TaskStatus = Literal["ok", "failed", "crashed", "timeout", "cancelled"]


@wire_type("fedcell.Task")
@dataclass(frozen=True)
class Task:
    """A unit of work sent to one or more sites."""

    name: str
    data: Any = None
    props: dict[str, Any] = field(default_factory=dict)
    timeout: float | None = None


@wire_type("fedcell.TaskResult")
@dataclass(frozen=True)
class TaskResult:
    """One site's answer to a task."""

    site: str
    task: str
    status: TaskStatus = "ok"
    data: Any = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"


class TaskHandle(abc.ABC):
    """Results of a dispatched task, yielded as they arrive; cancellable."""

    targets: tuple[str, ...]

    @abc.abstractmethod
    def __aiter__(self) -> AsyncIterator[TaskResult]:
        """Yield one result per target (``timeout``/``crashed`` results included), in arrival order."""

    @abc.abstractmethod
    async def cancel(self) -> None:
        """Stop waiting; ask the remaining targets to abandon the task."""


class Dispatcher(abc.ABC):
    """What a controller may do with sites."""

    @property
    @abc.abstractmethod
    def sites(self) -> Sequence[str]:
        """Names of the sites taking part in the job (those currently connected)."""

    @abc.abstractmethod
    def broadcast(self, task: Task, targets: Sequence[str] | None = None) -> TaskHandle:
        """Send ``task`` to ``targets`` (default: all sites); results stream from the handle."""

    async def broadcast_and_wait(
        self,
        task: Task,
        targets: Sequence[str] | None = None,
        *,
        min_responses: int | None = None,
        timeout: float | None = None,
    ) -> list[TaskResult]:
        """Broadcast and collect results; return once every target answered or, with
        ``min_responses``, once that many *ok* results came and the rest timed out or failed."""
        handle = self.broadcast(Task(task.name, task.data, task.props, timeout or task.timeout), targets)
        return [result async for result in handle]

    async def send_and_wait(self, task: Task, target: str, *, timeout: float | None = None) -> TaskResult:
        """Send ``task`` to one site and wait for its result."""
        results = await self.broadcast_and_wait(task, [target], timeout=timeout)
        return results[0]

    @abc.abstractmethod
    async def relay_and_wait(
        self, task: Task, order: Sequence[str], *, timeout: float | None = None
    ) -> list[TaskResult]:
        """Pass ``task`` through ``order``: each site's result data becomes the next site's task
        data. A site that fails or is lost is skipped (its result records why); the server holds
        at most one model at a time."""


@dataclass
class ControllerContext:
    """What a running DAG node gets."""

    job_id: str
    node: str
    dispatcher: Dispatcher
    inputs: Mapping[str, Any] = field(default_factory=dict)
    workspace: Path | None = None
    logger: logging.Logger = field(default_factory=lambda: logging.getLogger("fedcell.controller"))


class Controller(abc.ABC):
    """A DAG node: an algorithm that drives sites through a :class:`Dispatcher`."""

    #: Task names this controller sends; job validation checks every site can run them.
    task_names: tuple[str, ...] = ()

    def validate(self) -> None:
        """Raise ``ConfigError`` naming the bad parameter; called before the job runs."""

    @abc.abstractmethod
    async def run(self, ctx: ControllerContext) -> Any:
        """Run the algorithm; the return value flows to dependent nodes."""
