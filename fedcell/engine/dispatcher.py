"""The seam between controllers (algorithms) and the runtime that reaches sites.

A controller is an algorithm written against :class:`Dispatcher`; the server runtime implements
it over cells, :class:`~fedcell.engine.local_dispatcher.LocalDispatcher` implements it in memory
for tests. Vocabulary:

- a :class:`Task` is what a site is asked to do (``name`` such as ``"train"``/``"validate"``,
  ``data`` usually an :class:`~fedcell.fl_model.FLModel`, ``props`` small settings, ``timeout``);
- a :class:`TaskResult` is one site's answer. Its status keeps *failed* (user code raised) apart
  from *crashed* (site lost), *timeout* (no answer in time) and *cancelled* (the controller
  stopped waiting).

Contract of a :class:`TaskHandle` (what :meth:`Dispatcher.broadcast` returns):

- it yields **exactly one result per target, in arrival order**, which is what makes in-time
  aggregation possible: a controller folds each result into an accumulator and drops it;
- when ``task.timeout`` seconds pass, every target still pending yields a ``"timeout"`` result
  and is asked to stop; :meth:`TaskHandle.cancel` does the same with ``"cancelled"``;
- a result that arrives after its target timed out or was cancelled, a second result from the
  same site, or one from a site that is not a target is dropped (:meth:`TaskHandle.deliver`
  returns ``False``), so a slow or confused site cannot corrupt a finished round.

:class:`TaskHandle` is concrete except for :meth:`TaskHandle.abandon` (how to ask sites to stop):
an implementation calls :meth:`~TaskHandle.deliver` as answers come in and gets the deadline,
cancellation and ordering rules above for free.

A :class:`Dispatcher` implements only :attr:`~Dispatcher.sites` and :meth:`~Dispatcher.broadcast`.
``send`` is a one-target broadcast; ``relay`` chains ``send`` so each site's result becomes the
next site's task (an implementation that can pass data site to site overrides it). The
``*_and_wait`` forms add the k-of-n rule: :meth:`Dispatcher.broadcast_and_wait` returns once every
target answered, or once the deadline passed with at least ``min_responses`` ok results, and
raises :class:`~fedcell.errors.TooFewResultsError` (listing who dropped and why) as soon as that
many ok results can no longer come. Its ``fold`` callback hands each ok result to the caller as
it arrives and keeps only its record, so the server holds one aggregate, not n results.

Streaming fold
--------------
A fold that is a :class:`StreamingFold` goes one step further: an implementation that receives
results as streams (:class:`~fedcell.engine.cell_dispatcher.CellDispatcher`) asks it, at the
moment a result starts streaming in, for an :class:`~fedcell.transports.array_sink.ArraySink`
that adds each verified chunk into the aggregate as it arrives. The result is then never whole
in memory: a server aggregating n results of S bytes holds the aggregate plus about a stream
window per result in flight. The result's non-array content (site, status, metadata, weight,
every array's dtype and shape) is known before its first byte, so the fold validates it whole
first and rejects it (:class:`~fedcell.errors.ProtocolError`, recorded as ``"failed"``) before
anything is added.

Failure is the hard part: a stream that fails after some of its chunks were added (the site was
lost, the stream stalled or was cut off at the round's deadline, a later chunk was corrupted)
leaves part of a result in the aggregate, and the bytes to take it back are gone.
:meth:`Dispatcher.broadcast_and_wait` therefore **restarts the task without that site**: it
cancels what is still pending, :meth:`StreamingFold.reset` empties the aggregate, and the task
goes again to every target that answered ok or was still working (their results were in the
discarded aggregate); the site whose stream broke keeps its failure record, and the k-of-n rule
applies to the smaller set. Each restart drops at least one site, so a task restarts at most
``len(targets) - min_responses`` times before it completes or fails with
:class:`~fedcell.errors.TooFewResultsError`. A failure before the first chunk was added (the
site crashed while training, the result was rejected) costs nothing: no restart.

A controller is one class with ``async run(ctx) -> output``; ``ctx.inputs`` holds the outputs of
the DAG nodes it depends on, keyed by node name.
"""

from __future__ import annotations

import abc
import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from fedcell.engine.progress import ProgressEvent
from fedcell.errors import ConfigError, FedcellError, ProtocolError, TooFewResultsError
from fedcell.transports.array_sink import ArraySink
from fedcell.transports.codec import wire_type

__all__ = [
    "Controller",
    "ControllerContext",
    "Dispatcher",
    "StreamingFold",
    "Task",
    "TaskHandle",
    "TaskResult",
    "TaskStatus",
]

TaskStatus = Literal["ok", "failed", "crashed", "timeout", "cancelled"]

logger = logging.getLogger("fedcell.dispatcher")


@wire_type("fedcell.Task")
@dataclass(frozen=True)
class Task:
    """A unit of work sent to one or more sites.

    Attributes
    ----------
    name:
        What to do (``"train"``, ``"validate"``, ...); sites map it to an executor.
    data:
        The payload, usually an :class:`~fedcell.fl_model.FLModel`; must be wire-encodable.
    props:
        Small plain settings for the site (e.g. ``{"local_epochs": 2}``).
    timeout:
        Seconds each target has to answer; ``None`` waits until the site answers or is lost.
    """

    name: str
    data: Any = None
    props: dict[str, Any] = field(default_factory=dict)
    timeout: float | None = None


@wire_type("fedcell.TaskResult")
@dataclass(frozen=True)
class TaskResult:
    """One site's answer to a task; ``error`` says why when ``status`` is not ``"ok"``."""

    site: str
    task: str
    status: TaskStatus = "ok"
    data: Any = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        """Whether the site finished the task."""
        return self.status == "ok"

    def describe(self) -> str:
        """``"site-1: ok"`` or ``"site-2: timeout (no result within 5 s)"``."""
        return f"{self.site}: {self.status}" + (f" ({self.error})" if self.error else "")


class StreamingFold(abc.ABC):
    """An aggregate that takes ok results as they arrive: whole, or chunk by chunk while they
    stream in (see the module docstring). Pass one as ``broadcast_and_wait(fold=...)``."""

    @abc.abstractmethod
    def fold(self, result: TaskResult) -> None:
        """Add an ok result; a result whose stream this fold already took is skipped.

        Raises
        ------
        ProtocolError
            If the result is not usable; nothing of it is added.
        """

    @abc.abstractmethod
    def open_stream(self, result: TaskResult) -> ArraySink | None:
        """An ok result starts streaming in: its data holds an
        :class:`~fedcell.transports.codec.ArraySpec` in place of each array. Return a sink that
        adds the arrays as their chunks arrive (its ``finish`` adds the rest of the result and
        returns it), or ``None`` to take the result whole through :meth:`fold`.

        Raises
        ------
        ProtocolError
            If the result is not usable (checked before any byte is added).
        """

    @abc.abstractmethod
    def discard(self, site: str) -> bool:
        """``site``'s result did not arrive ok: take nothing more from its stream (its sink
        fails the next chunk). Return whether part of it was already added (the aggregate is
        then tainted and the task must restart)."""

    @abc.abstractmethod
    def reset(self) -> None:
        """Forget everything added and stop every open stream: the task is asked again."""

    def task_handed_over(self) -> None:
        """The dispatcher took what it still needs of the task's data (encoded for the wire;
        its transport lets go of each array once every target has it): the caller may release
        its own references, as long as :meth:`task_for_restart` can give the data back. Called
        once per broadcast by implementations that encode the task; never by those that keep
        using the data (in-memory dispatchers)."""

    async def task_for_restart(self, task: Task) -> Task:
        """The task to send again when :meth:`Dispatcher.broadcast_and_wait` restarts (after
        :meth:`reset`); ``task`` itself by default. A caller that released the task's data after
        :meth:`task_handed_over` gives it back here."""
        return task


class TaskHandle(abc.ABC):
    """Results of a dispatched task, yielded as they arrive; cancellable.

    Create it inside a running event loop (the deadline starts then). Implementations call
    :meth:`deliver` with each target's result and implement :meth:`abandon`.

    Raises
    ------
    ConfigError
        If ``targets`` is empty or names a site twice, or ``task.timeout`` is not > 0.
    """

    def __init__(self, task: Task, targets: Sequence[str]) -> None:
        if not targets:
            raise ConfigError(f"task {task.name!r} has no target sites")
        if len(set(targets)) != len(targets):
            raise ConfigError(f"task {task.name!r} names a target twice: {list(targets)}")
        if task.timeout is not None and not task.timeout > 0:
            raise ConfigError(f"task {task.name!r}: timeout must be > 0, not {task.timeout!r}")
        self.task = task
        self.targets: tuple[str, ...] = tuple(targets)
        self._pending: dict[str, None] = dict.fromkeys(self.targets)
        self._arrived: asyncio.Queue[TaskResult] = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self._deadline = None if task.timeout is None else self._loop.time() + task.timeout

    @property
    def pending(self) -> tuple[str, ...]:
        """Targets whose result has not arrived yet."""
        return tuple(self._pending)

    def deliver(self, result: TaskResult) -> bool:
        """Hand in a target's result; return ``False`` and drop it if the site is not pending
        (not a target, answered already, timed out or cancelled)."""
        if result.site not in self._pending:
            logger.debug("dropping late or unexpected result %s", result.describe())
            return False
        del self._pending[result.site]
        self._arrived.put_nowait(result)
        return True

    @abc.abstractmethod
    async def abandon(self, sites: tuple[str, ...]) -> None:
        """Ask ``sites`` to stop working on the task (best effort, must not raise); called once
        for the targets still pending at the deadline or at :meth:`cancel`."""

    async def cancel(self, reason: str = "cancelled by the controller") -> None:
        """Stop waiting: each pending target yields a ``"cancelled"`` result and is asked to
        stop. Results already arrived are still yielded."""
        await self._give_up("cancelled", reason)

    def __aiter__(self) -> TaskHandle:
        return self

    async def __anext__(self) -> TaskResult:
        if not self._arrived.empty():
            return self._arrived.get_nowait()
        if not self._pending:
            raise StopAsyncIteration
        if self._deadline is None:
            return await self._arrived.get()
        try:
            return await asyncio.wait_for(self._arrived.get(), self._deadline - self._loop.time())
        except asyncio.TimeoutError:
            await self._give_up("timeout", f"no result within {self.task.timeout:g} s")
            return self._arrived.get_nowait()

    async def _give_up(self, status: TaskStatus, reason: str) -> None:
        sites = tuple(self._pending)
        if not sites:
            return
        self._pending.clear()
        for site in sites:
            self._arrived.put_nowait(TaskResult(site, self.task.name, status, error=reason))
        await self.abandon(sites)


class Dispatcher(abc.ABC):
    """What a controller may do with sites: the only runtime API an algorithm sees."""

    @property
    @abc.abstractmethod
    def sites(self) -> Sequence[str]:
        """Names of the sites taking part in the job (those currently connected)."""

    @abc.abstractmethod
    def broadcast(
        self,
        task: Task,
        targets: Sequence[str] | None = None,
        *,
        fold: StreamingFold | None = None,
    ) -> TaskHandle:
        """Send ``task`` to ``targets`` (default: all :attr:`sites`); results stream from the
        handle, one per target.

        An implementation that receives results as streams offers each streamed ok result to
        ``fold.open_stream`` and yields it, once its stream verified, with the data the sink's
        ``finish`` returned; others ignore ``fold`` (the caller folds whole results).

        Raises
        ------
        ConfigError
            If a target is not a site of the job, or targets are empty or repeated.
        """

    def send(self, task: Task, target: str) -> TaskHandle:
        """Send ``task`` to one site; see :meth:`broadcast`."""
        return self.broadcast(task, [target])

    def relay(self, task: Task, order: Sequence[str]) -> TaskHandle:
        """Pass ``task`` through the sites in ``order``: each ok result's data becomes the next
        site's task data; a site that fails, crashes or times out is skipped (its result says
        why) and the next one gets the last good data. ``task.timeout`` applies to each hop.

        Results are yielded per hop; an ok result's data is the model relayed onward, so a
        consumer that keeps only the latest holds one model at a time. Each site appears once
        per relay: a cyclic workflow calls ``relay`` once per cycle.

        Raises
        ------
        ConfigError
            If ``order`` is empty, repeats a site or names a site that is not in the job.
        """
        unknown = [site for site in order if site not in self.sites]
        if unknown:
            raise ConfigError(f"relay of task {task.name!r}: {unknown} are not sites of the job")
        return _RelayHandle(self, task, order)

    async def broadcast_and_wait(
        self,
        task: Task,
        targets: Sequence[str] | None = None,
        *,
        min_responses: int | None = None,
        timeout: float | None = None,
        fold: Callable[[TaskResult], None] | StreamingFold | None = None,
    ) -> list[TaskResult]:
        """Broadcast and collect one result per target, in arrival order.

        Parameters
        ----------
        task, targets:
            As for :meth:`broadcast`.
        min_responses:
            How many *ok* results the caller needs (default: every target). Returns once every
            target answered, or once ``timeout`` passed with at least this many ok results (the
            others recorded as ``"timeout"``).
        timeout:
            Seconds to wait; overrides ``task.timeout``.
        fold:
            Called with each ok result as it arrives (a :class:`StreamingFold`: its ``fold``);
            the returned list then records that result without its data, so the caller keeps
            one aggregate instead of n results. ``fold`` rejects a malformed result by raising
            :class:`~fedcell.errors.ProtocolError`: it is recorded as ``"failed"`` and does not
            count as ok. A :class:`StreamingFold` may also take results while they stream in;
            the task then restarts without a site whose stream broke midway (see the module
            docstring), and the list holds the records of the sites dropped on the way followed
            by the last attempt's results.

        Raises
        ------
        ConfigError
            If ``min_responses`` is not between 0 and the number of targets, or the targets
            are invalid.
        TooFewResultsError
            As soon as ``min_responses`` ok results can no longer come (remaining targets are
            cancelled); its ``results`` say who dropped and why.
        """
        chosen = tuple(self.sites if targets is None else targets)
        needed = len(chosen) if min_responses is None else min_responses
        if not 0 <= needed <= len(chosen):
            raise ConfigError(
                f"min_responses must be between 0 and {len(chosen)} (the number of targets) "
                f"for task {task.name!r}, not {min_responses!r}"
            )
        if timeout is not None:
            task = replace(task, timeout=timeout)
        streaming = fold if isinstance(fold, StreamingFold) else None
        fold_one = fold.fold if isinstance(fold, StreamingFold) else fold
        dropped: list[TaskResult] = []  # sites left out of a restarted task, with why
        attempt = chosen
        while True:
            results, broken = await self._collect(task, attempt, needed, fold_one, streaming)
            if not broken:
                break
            assert streaming is not None
            streaming.reset()
            # Sites that answered ok or were cut off by the restart are asked again.
            again = tuple(
                r.site for r in results if r.site not in broken and r.status in ("ok", "cancelled")
            )
            note = "its result stream broke after part of it was folded (aggregate discarded)"
            for r in results:
                if r.site in broken:
                    dropped.append(replace(r, data=None, error=f"{r.error}; {note}"))
                elif r.site not in again:
                    dropped.append(replace(r, data=None))
            if len(again) < needed or not again:
                # Too few left to ask again: what they sent went with the discarded aggregate.
                lost = "its result went with the discarded aggregate; too few sites to ask again"
                results = [
                    replace(r, status="cancelled", data=None, error=r.error or lost)
                    for r in results
                    if r.site in again
                ]
                break
            logger.warning(
                "task %r: the result streams of %s broke after part was folded; asking %s again",
                task.name, broken, list(again),
            )  # fmt: skip
            attempt = again
            task = await streaming.task_for_restart(task)
        results = dropped + results
        ok_count = sum(r.ok for r in results)
        if ok_count < needed:
            raise TooFewResultsError(
                f"task {task.name!r}: {ok_count} of {len(chosen)} sites answered ok, {needed} "
                f"needed; " + "; ".join(r.describe() for r in results if not r.ok),
                [replace(r, data=None) for r in results],
            )
        return results

    async def _collect(
        self,
        task: Task,
        targets: tuple[str, ...],
        needed: int,
        fold: Callable[[TaskResult], None] | None,
        streaming: StreamingFold | None,
    ) -> tuple[list[TaskResult], list[str]]:
        """One attempt of :meth:`broadcast_and_wait`: its results, and the sites whose result
        stream broke after part of it was folded (the attempt stops at the first one)."""
        handle = self.broadcast(task, targets, fold=streaming)
        results: list[TaskResult] = []
        broken: list[str] = []
        ok_count = 0
        try:
            async for result in handle:
                if result.ok and fold is not None:
                    result = _folded(result, fold)
                if not result.ok and streaming is not None and streaming.discard(result.site):
                    broken.append(result.site)
                ok_count += result.ok
                results.append(result)
                if broken or ok_count + len(targets) - len(results) < needed:
                    reason = (
                        f"restarting without {broken[0]}" if broken
                        else f"{needed} ok results can no longer come"
                    )  # fmt: skip
                    await handle.cancel(reason)
                    async for late in handle:
                        if not late.ok and streaming is not None:
                            streaming.discard(late.site)  # cut off by us: asked again, not broken
                        results.append(late)
                    break
        except BaseException:
            if streaming is not None:
                streaming.reset()  # nothing more may reach an aggregate the caller abandons
            raise
        finally:
            if handle.pending:  # the caller was cancelled or fold raised: release the sites
                await handle.cancel()
        return results, broken

    async def send_and_wait(
        self, task: Task, target: str, *, timeout: float | None = None
    ) -> TaskResult:
        """Send ``task`` to one site and return its result, whatever its status.

        Raises
        ------
        ConfigError
            If ``target`` is not a site of the job.
        """
        results = await self.broadcast_and_wait(task, [target], min_responses=0, timeout=timeout)
        return results[0]

    async def relay_and_wait(
        self, task: Task, order: Sequence[str], *, timeout: float | None = None
    ) -> list[TaskResult]:
        """Run :meth:`relay` to the end and return one result per hop. Only the last ok result
        keeps its data (the relayed output); earlier hops are recorded without it.

        Raises
        ------
        ConfigError
            If ``order`` is empty, repeats a site or names a site that is not in the job.
        """
        if timeout is not None:
            task = replace(task, timeout=timeout)
        results: list[TaskResult] = []
        last_ok: int | None = None
        async for result in self.relay(task, order):
            if result.ok:
                if last_ok is not None:
                    results[last_ok] = replace(results[last_ok], data=None)
                last_ok = len(results)
            results.append(result)
        return results


def _folded(result: TaskResult, fold: Callable[[TaskResult], None]) -> TaskResult:
    try:
        fold(result)
    except ProtocolError as exc:
        logger.warning("rejected result from %s for %r: %s", result.site, result.task, exc)
        return replace(result, status="failed", data=None, error=f"result rejected: {exc}")
    return replace(result, data=None)


class _RelayHandle(TaskHandle):
    """Drives :meth:`Dispatcher.relay` with one :meth:`Dispatcher.send` per hop."""

    def __init__(self, dispatcher: Dispatcher, task: Task, order: Sequence[str]) -> None:
        # The deadline is per hop. The handle keeps no reference to the first hop's data, so
        # once a later hop answers, only the model being relayed is held.
        super().__init__(replace(task, data=None, timeout=None), order)
        self._hop_task = replace(task, data=None)
        self._first_data = task.data
        self._current_hop: TaskHandle | None = None
        self._dispatcher = dispatcher
        self._driver = asyncio.ensure_future(self._drive())

    async def _drive(self) -> None:
        data, self._first_data = self._first_data, None
        for site in self.targets:
            try:
                hop = self._dispatcher.send(replace(self._hop_task, data=data), site)
            except FedcellError as exc:  # e.g. the site left the job since relay() checked
                self.deliver(TaskResult(site, self._hop_task.name, "crashed", error=str(exc)))
                continue
            self._current_hop = hop
            async for result in hop:
                if result.ok:
                    data = result.data
                self.deliver(result)
        self._current_hop = None

    async def abandon(self, sites: tuple[str, ...]) -> None:
        self._driver.cancel()
        if self._current_hop is not None:
            await self._current_hop.cancel()


@dataclass
class ControllerContext:
    """What a running DAG node gets: its dispatcher and the outputs of the nodes it follows.

    ``restored`` and :meth:`checkpoint` are the resume API (see :mod:`fedcell.engine.checkpoint`):
    ``restored`` is the state this node saved last before a server crash (``None`` on a fresh
    start), and ``await ctx.checkpoint(state)`` saves the state after each completed step.
    """

    job_id: str
    node: str
    dispatcher: Dispatcher
    inputs: Mapping[str, Any] = field(default_factory=dict)
    workspace: Path | None = None
    logger: logging.Logger = field(default_factory=lambda: logging.getLogger("fedcell.controller"))
    progress: Callable[[ProgressEvent], None] | None = None
    restored: Any = None
    checkpointer: Callable[[Any], Awaitable[None]] | None = None

    async def checkpoint(self, state: Any) -> None:
        """Persist this node's resumable state: plain data, arrays, tensors, wire types.

        Call it after each completed round or step with everything the node needs to go on
        from there; a resumed run gets it back as :attr:`restored`. A no-op when the job runs
        without checkpoints. Do not mutate ``state`` while this is awaited.

        Raises
        ------
        CheckpointError
            If ``state`` holds a value the codec does not carry, or the write failed.
        """
        if self.checkpointer is not None:
            await self.checkpointer(state)

    def report(
        self, step: int, total: int | None = None, metrics: Mapping[str, Any] | None = None
    ) -> None:
        """Tell the live display (if any) that this node completed ``step`` of ``total``."""
        if self.progress is not None:
            self.progress(ProgressEvent(self.node, step, total, dict(metrics or {})))


class Controller(abc.ABC):
    """A DAG node: an algorithm that drives sites through a :class:`Dispatcher`.

    Subclasses are dataclasses whose fields are their configuration (plain values, so a job can
    export them); :meth:`validate` checks them before anything runs.
    """

    @property
    def task_names(self) -> tuple[str, ...]:
        """Task names this controller sends; job validation checks every site can run them."""
        return ()

    def validate(self) -> None:
        """Raise ``ConfigError`` naming the bad parameter; called before the job runs."""

    @abc.abstractmethod
    async def run(self, ctx: ControllerContext) -> Any:
        """Run the algorithm; the return value flows to dependent nodes."""
