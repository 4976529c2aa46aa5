"""Scatter-gather rounds with in-time aggregation: :class:`ScatterGather` and :class:`FedAvg`.

One round: broadcast ``Task(train_task, FLModel(global, current_round, total_rounds))`` to the
sites, fold each result into a :class:`~fedcell.controllers.aggregation.WeightedMean` **as it
arrives** and drop it, then turn the mean into the next global model with
:meth:`ScatterGather.server_update` (FedAvg: take the mean; FedOpt: a server optimizer step, see
:mod:`fedcell.controllers.fedopt`). Over cells, results that stream in are folded chunk by chunk as
they arrive, so the server holds the global model and one accumulator whatever the number of
sites; a result stream that breaks midway restarts the round without that site (see
:mod:`fedcell.engine.dispatcher`).

k of n: a round needs ``min_clients`` ok results (default: every site). It ends when every site
answered, or at ``round_timeout`` with at least ``min_clients`` ok (the rest recorded as
``"timeout"``), or fails with :class:`~fedcell.errors.TooFewResultsError` as soon as
``min_clients`` can no longer be reached. A result the aggregation rejects (wrong keys, shapes,
weight) is recorded as that site's ``"failed"``. Every round's record (who answered, who dropped
and why, aggregated metrics, seconds) goes into the output's ``meta["history"]``.

Where the first global model comes from, exactly one of: ``initial_params`` (a dict of arrays or
nested lists), ``model`` (``"package.module:factory"``: a callable returning such a dict or a
``torch.nn.Module``, whose ``state_dict()`` is taken), or the one upstream DAG node whose output
is an FLModel (``ctx.inputs``).

Early stop: ``stop_when=("accuracy", ">=", 0.95)`` checks the round's aggregated training
metrics (sites report metrics with their train results, as FLARE scripts do). ``final_validation``
broadcasts ``Task(validate_task, FLModel(final global))`` after training and averages the
returned metrics with the same weights. The output is the final global model as an FLModel
(FULL) whose ``metrics`` are the validation metrics when validated, else the last round's.

Resume after a server crash (:mod:`fedcell.engine.checkpoint`): after each completed round the
controller saves ``{"next_round", "params", "history", "server_state", "metrics", "stopped",
"resumed_at"}`` with ``ctx.checkpoint`` (``server_state`` is the server optimizer's moments,
e.g. FedAdam's ``m`` and ``v``). Started with ``ctx.restored`` it goes on with ``next_round``
from that global model and state, so a seeded job ends with the same model as an uninterrupted
run; the output's ``meta["resumed_at"]`` lists the rounds at which runs resumed. The initial
model is not built again on resume.

Server memory: a large global model (:data:`~fedcell.controllers.model_spill.SPILL_MIN_BYTES`
or more; ``spill_global`` forces it on or off) is written to a spill file in the node's
workspace before it is broadcast, and once the dispatcher has taken the broadcast
(:meth:`~fedcell.engine.dispatcher.StreamingFold.task_handed_over`) and the file is written, the
controller drops every reference to it: the aggregation sees zero-cost stand-ins with the same
keys, dtypes and shapes (:mod:`fedcell.controllers.model_spill`). The transport still holds each
array until every site acked its chunks, so a broadcast in progress to a slow site stays intact
while a fast site's result folds (the round then holds both, as without the spill); once it is
done the accumulator takes the global model's memory (from the run's ``ArrayPool``) and the
round holds one model, not two. The model is read back only where its values are needed: a
restarted round sends it again (:meth:`~fedcell.engine.dispatcher.StreamingFold.task_for_restart`),
and :meth:`ScatterGather.server_update` gets it when :meth:`ScatterGather.reads_global_values`
says so (DIFF rounds, server optimizers, keys no site sent; FedAvg of FULL models needs only the
mean). The file is removed when the run ends, whether it succeeded or failed. Dispatchers that
keep using the task's data (in memory) never hand it over, and nothing is released.

All configuration is plain data (numbers, strings, lists, dicts), so a job exports it.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import math
import operator
import os
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedcell.controllers.aggregation import WeightedMean, cast_like
from fedcell.controllers.initial_model import initial_params
from fedcell.controllers.model_spill import SPILL_MIN_BYTES, ModelSpill, model_nbytes, stand_ins
from fedcell.engine.dispatcher import (
    Controller,
    ControllerContext,
    StreamingFold,
    Task,
    TaskResult,
)
from fedcell.errors import CheckpointError, ConfigError, TooFewResultsError
from fedcell.fl_model import FLModel, ParamsType
from fedcell.transports.array_sink import ArraySink
from fedcell.transports.stream_receiver import ArrayPool

__all__ = ["STOP_OPERATORS", "FedAvg", "ScatterGather"]

#: The comparisons ``stop_when`` accepts.
STOP_OPERATORS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge,
    ">": operator.gt,
    "<=": operator.le,
    "<": operator.lt,
}


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_name(owner: str, name: str, value: object) -> None:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{owner}: {name} must be a non-empty string, not {value!r}")


@dataclass
class ScatterGather(Controller):
    """Rounds of broadcast-train-aggregate; subclasses say how the mean updates the global model.

    Parameters
    ----------
    rounds:
        Number of training rounds (≥ 1).
    min_clients:
        Ok results a round needs; default every target site.
    sites:
        Target sites; default every site of the job.
    round_timeout:
        Seconds a round waits for results; default until every site answered or was lost.
    initial_params:
        The first global model: parameter name → array (or nested list).
    model:
        ``"package.module:factory"`` returning the first global model (dict or torch module).
    weigh_by:
        ``meta`` key weighting each result (``None``: equal weights).
    stop_when:
        ``(metric, operator, value)``, e.g. ``("accuracy", ">=", 0.95)``: stop after the round
        whose aggregated metric satisfies it. Operators: ``>=``, ``>``, ``<=``, ``<``.
    final_validation:
        After training, broadcast the validate task and average its metrics.
    task_props:
        Plain settings sent with every train task (e.g. ``{"local_epochs": 2}``).
    train_task, validate_task:
        Task names the sites' executors handle.
    spill_global:
        Keep the global model in a spill file while a round gathers (see the module
        docstring): ``None`` (default) for models of at least
        :data:`~fedcell.controllers.model_spill.SPILL_MIN_BYTES`, ``True`` or ``False`` to force.
    """

    rounds: int = 1
    min_clients: int | None = None
    sites: list[str] | None = None
    round_timeout: float | None = None
    initial_params: dict[str, Any] | None = None
    model: str | None = None
    weigh_by: str | None = "NUM_STEPS_CURRENT_ROUND"
    stop_when: tuple[str, str, float] | None = None
    final_validation: bool = False
    task_props: dict[str, Any] = field(default_factory=dict)
    train_task: str = "train"
    validate_task: str = "validate"
    spill_global: bool | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop_when, list):  # as a hand-written config gives it
            self.stop_when = tuple(self.stop_when)

    @property
    def task_names(self) -> tuple[str, ...]:
        if self.final_validation:
            return (self.train_task, self.validate_task)
        return (self.train_task,)

    def validate(self) -> None:
        """Check the configuration.

        Raises
        ------
        ConfigError
            Naming the first bad parameter.
        """
        owner = type(self).__name__
        if not isinstance(self.rounds, int) or isinstance(self.rounds, bool) or self.rounds < 1:
            raise ConfigError(f"{owner}: rounds must be an integer >= 1, not {self.rounds!r}")
        if self.sites is not None:
            if not isinstance(self.sites, (list, tuple)) or not self.sites:
                raise ConfigError(f"{owner}: sites must be a non-empty list, not {self.sites!r}")
            for site in self.sites:
                _check_name(owner, "each of sites", site)
            if len(set(self.sites)) != len(self.sites):
                raise ConfigError(f"{owner}: sites names a site twice: {self.sites!r}")
        if self.min_clients is not None:
            if (
                not isinstance(self.min_clients, int)
                or isinstance(self.min_clients, bool)
                or (self.min_clients < 1)
            ):
                raise ConfigError(
                    f"{owner}: min_clients must be an integer >= 1, not {self.min_clients!r}"
                )
            if self.sites is not None and self.min_clients > len(self.sites):
                raise ConfigError(
                    f"{owner}: min_clients={self.min_clients} exceeds the {len(self.sites)} sites"
                )
        if self.round_timeout is not None and not (
            _is_number(self.round_timeout) and self.round_timeout > 0
        ):
            raise ConfigError(
                f"{owner}: round_timeout must be a number > 0, not {self.round_timeout!r}"
            )
        self._validate_initial_model(owner)
        if self.weigh_by is not None:
            _check_name(owner, "weigh_by", self.weigh_by)
        self._validate_stop_when(owner)
        if not isinstance(self.final_validation, bool):
            raise ConfigError(f"{owner}: final_validation must be a bool")
        if not isinstance(self.task_props, dict) or not all(
            isinstance(key, str) for key in self.task_props
        ):
            raise ConfigError(f"{owner}: task_props must be a dict with string keys")
        _check_name(owner, "train_task", self.train_task)
        _check_name(owner, "validate_task", self.validate_task)
        if self.spill_global is not None and not isinstance(self.spill_global, bool):
            raise ConfigError(f"{owner}: spill_global must be None or a bool")

    def _validate_initial_model(self, owner: str) -> None:
        if self.initial_params is not None and self.model is not None:
            raise ConfigError(f"{owner}: give initial_params or model, not both")
        if self.initial_params is not None and not (
            isinstance(self.initial_params, dict)
            and all(isinstance(key, str) for key in self.initial_params)
        ):
            raise ConfigError(f"{owner}: initial_params must be a dict of name -> array")
        if self.model is not None:
            module, _, attribute = str(self.model).partition(":")
            if not isinstance(self.model, str) or not module or not attribute:
                raise ConfigError(
                    f"{owner}: model must be 'package.module:factory', not {self.model!r}"
                )

    def _validate_stop_when(self, owner: str) -> None:
        if self.stop_when is None:
            return
        shape_ok = isinstance(self.stop_when, (list, tuple)) and len(self.stop_when) == 3
        if not shape_ok:
            raise ConfigError(
                f"{owner}: stop_when must be (metric, operator, value), not {self.stop_when!r}"
            )
        metric, comparison, value = self.stop_when
        _check_name(owner, "stop_when's metric", metric)
        if comparison not in STOP_OPERATORS:
            raise ConfigError(
                f"{owner}: stop_when's operator must be one of {sorted(STOP_OPERATORS)}, "
                f"not {comparison!r}"
            )
        if not (_is_number(value) and math.isfinite(value)):
            raise ConfigError(f"{owner}: stop_when's value must be a finite number, not {value!r}")

    @abc.abstractmethod
    def server_update(
        self, global_params: dict[str, Any], mean: WeightedMean, state: dict[str, Any]
    ) -> dict[str, Any]:
        """The next global model from this round's folded results.

        ``state`` is a dict that lives for one run (e.g. a server optimizer's moments). Return a
        new dict; arrays of ``global_params`` must not be modified in place (they were sent).
        When the global model was spilled and :meth:`reads_global_values` says no, its values
        are zero-cost stand-ins (right keys, dtypes and shapes; values must not be read).
        """

    def reads_global_values(self, mean: WeightedMean) -> bool:
        """Whether :meth:`server_update` reads the global model's values, not only its keys,
        dtypes and shapes (a spilled global model is read back only then). Default: yes."""
        return True

    async def run(self, ctx: ControllerContext) -> FLModel:
        """Run the rounds; return the final global model with its history.

        Raises
        ------
        ConfigError
            If the configuration is invalid, there is no (or more than one) initial model, or
            ``min_clients`` exceeds the target sites.
        TooFewResultsError
            If a round (or the final validation) cannot get ``min_clients`` ok results.
        CheckpointError
            If the state to resume from is not a scatter-gather state, or saving one failed.
        """
        self.validate()
        owner = type(self).__name__
        targets = list(self.sites) if self.sites is not None else list(ctx.dispatcher.sites)
        needed = len(targets) if self.min_clients is None else self.min_clients
        if needed > len(targets):
            raise ConfigError(
                f"{owner}: min_clients={needed} exceeds the {len(targets)} sites {targets}"
            )
        if ctx.restored is not None:
            progress = _restored_progress(ctx)
            progress.resumed_at.append(progress.next_round)
            ctx.logger.info("%s resumes at round %d", ctx.node, progress.next_round + 1)
        else:
            # Building a model (a factory, a checkpoint) can take seconds: keep the loop, and
            # with it the cells' heartbeats, running meanwhile.
            progress = _Progress(await asyncio.to_thread(self._initial_params, ctx))
        global_params, history, state = progress.params, progress.history, progress.server_state
        progress.params = {}  # the round loop owns the global model: no second reference to S bytes
        metrics, stopped_early = progress.metrics, progress.stopped
        current_round = max(progress.next_round - 1, 0)
        first_round = self.rounds if stopped_early else progress.next_round
        # Accumulators reuse the memory of global models two rounds old (see WeightedMean), or
        # of this round's global model once it is spilled and sent.
        pool = ArrayPool(WeightedMean(global_params).accumulator_nbytes)
        spill = self._spill_for(ctx, global_params)
        spilled: _SpilledGlobal | None = None
        try:
            for current_round in range(first_round, self.rounds):
                started = time.perf_counter()
                task = self._task(self.train_task, global_params, current_round)
                # Results come from the dispatcher, decoded for us: fold the first one in place.
                if spill is None:
                    mean = WeightedMean(global_params, self.weigh_by, adopt_results=True, pool=pool)
                    fold: StreamingFold = mean
                else:
                    shapes = stand_ins(global_params)
                    mean = WeightedMean(shapes, self.weigh_by, adopt_results=True, pool=pool)
                    fold = spilled = _SpilledGlobal(mean, task.data.params, spill, ctx.logger)
                    global_params = shapes  # the task's dict is the one reference left
                    # Written before the broadcast: a result that arrives while the file is
                    # still being written would get its accumulator while the global model is
                    # still held (two models). Rewriting 1 GiB takes 0.6 s on the project's VM
                    # (a new file's first write 2.4 s), longer than two site processes take to
                    # answer once receiving no longer faults in fresh memory; writing it first
                    # measured 2.6-2.9 s per round and 1169-1219 MiB at the server, against
                    # 2.6-3.5 s and 2182-2190 MiB while broadcasting (1 GiB, 2 sites).
                    await spilled.settle()
                results = await self._gather(ctx, task, targets, needed, fold, current_round)
                del task, fold
                if spilled is not None:
                    global_params = await spilled.global_params(self.reads_global_values(mean))
                    mean.reference = global_params
                    spilled = None
                global_params = self.server_update(global_params, mean, state)
                metrics = mean.metrics()
                history.append(
                    _round_record(current_round, results, metrics, time.perf_counter() - started)
                )
                ctx.report(current_round + 1, self.rounds, metrics)
                ctx.logger.info(
                    "%s round %d/%d: %d ok, metrics %s",
                    ctx.node, current_round + 1, self.rounds, mean.count, metrics,
                )  # fmt: skip
                stopped_early = self._should_stop(metrics, ctx) and current_round + 1 < self.rounds
                await ctx.checkpoint(
                    {
                        "next_round": current_round + 1,
                        "params": global_params,
                        "history": history,
                        "server_state": state,
                        "metrics": metrics,
                        "stopped": stopped_early,
                        "resumed_at": progress.resumed_at,
                    }
                )
                if stopped_early:
                    break
        finally:
            if spilled is not None:
                await spilled.settle()
            if spill is not None:
                spill.remove()
            pool.close()
        meta: dict[str, Any] = {"history": history, "stopped_early": stopped_early}
        if progress.resumed_at:
            meta["resumed_at"] = progress.resumed_at
        if self.final_validation:
            metrics = await self._validate_final(ctx, global_params, targets, needed, current_round)
            meta["validation"] = metrics
        return FLModel(
            params=global_params,
            params_type=ParamsType.FULL,
            metrics=metrics,
            current_round=current_round,
            total_rounds=self.rounds,
            meta=meta,
        )

    async def _gather(
        self,
        ctx: ControllerContext,
        task: Task,
        targets: list[str],
        needed: int,
        mean: StreamingFold,
        current_round: int,
    ) -> list[TaskResult]:
        try:
            return await ctx.dispatcher.broadcast_and_wait(
                task, targets, min_responses=needed, timeout=self.round_timeout, fold=mean
            )
        except TooFewResultsError as exc:
            raise TooFewResultsError(
                f"{type(self).__name__} round {current_round}: {exc}", exc.results
            ) from exc

    def _task(self, name: str, global_params: dict[str, Any], current_round: int) -> Task:
        """The task ``name`` carrying the global model of ``current_round``."""
        return Task(
            name,
            FLModel(
                params=global_params,
                params_type=ParamsType.FULL,
                current_round=current_round,
                total_rounds=self.rounds,
            ),
            props=dict(self.task_props),
        )

    async def _validate_final(
        self,
        ctx: ControllerContext,
        global_params: dict[str, Any],
        targets: list[str],
        needed: int,
        last_round: int,
    ) -> dict[str, float]:
        task = self._task(self.validate_task, global_params, last_round)
        mean = WeightedMean(None, self.weigh_by)
        await self._gather(ctx, task, targets, needed, mean, last_round)
        return mean.metrics()

    def _should_stop(self, metrics: Mapping[str, float], ctx: ControllerContext) -> bool:
        if self.stop_when is None:
            return False
        metric, comparison, value = self.stop_when
        if metric not in metrics:
            ctx.logger.warning("%s: stop_when metric %r not reported", ctx.node, metric)
            return False
        return STOP_OPERATORS[comparison](metrics[metric], value)

    def _initial_params(self, ctx: ControllerContext) -> dict[str, Any]:
        owner = f"{type(self).__name__} node {ctx.node!r}"
        return initial_params(owner, self.initial_params, self.model, ctx.inputs)

    def _spill_for(self, ctx: ControllerContext, params: Mapping[str, Any]) -> ModelSpill | None:
        """The run's spill file (in the node's workspace, else the system's temporary folder),
        or ``None`` when the global model stays in memory."""
        spilling = self.spill_global
        if spilling is None:
            spilling = model_nbytes(params) >= SPILL_MIN_BYTES
        if not spilling:
            return None
        folder = ctx.workspace if ctx.workspace is not None else Path(tempfile.gettempdir())
        folder.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=folder, prefix=".global-model-", suffix=".spill")
        os.close(fd)
        return ModelSpill(Path(name))


class _SpilledGlobal(StreamingFold):
    """A round's :class:`WeightedMean` plus its spilled global model: the spill write starts at
    construction (the controller awaits :meth:`settle` before the broadcast), and the task's
    params are released once the write is done and the broadcast was handed over."""

    def __init__(
        self,
        mean: WeightedMean,
        params: dict[str, Any],
        spill: ModelSpill,
        logger: logging.Logger,
    ) -> None:
        self.mean = mean
        self._params = params  # the dict the task carries: the dispatcher holds it too
        self._spill = spill
        self._logger = logger
        self._writing = asyncio.ensure_future(spill.write(params))
        self._handed_over = False  # the current broadcast encoded the task's params
        self._released = False

    def fold(self, result: TaskResult) -> None:
        self.mean.fold(result)

    def open_stream(self, result: TaskResult) -> ArraySink | None:
        return self.mean.open_stream(result)

    def discard(self, site: str) -> bool:
        return self.mean.discard(site)

    def reset(self) -> None:
        self.mean.reset()

    def task_handed_over(self) -> None:
        self._handed_over = True
        if self._writing.done():
            self._release()
        else:
            self._writing.add_done_callback(lambda _: self._release())

    def _release(self) -> None:
        # Only a model safely on disk is let go; a failed write (a full disk) keeps it in memory.
        # A restart's broadcast that has not encoded the task yet still needs it.
        if self._released or not self._handed_over or self._writing.cancelled():
            return
        error = self._writing.exception()
        if error is not None:
            self._logger.warning("the global model stays in memory this round: %s", error)
            return
        self._params.clear()
        self._released = True

    async def task_for_restart(self, task: Task) -> Task:
        self._handed_over = False
        if self._released:
            self._params.update(await self._spill.read())
            self._released = False
        return task

    async def global_params(self, values_needed: bool) -> dict[str, Any]:
        """The global model after the gather: its values (from memory or the spill file) when
        ``values_needed``, else the stand-ins where it was released.

        Raises
        ------
        CheckpointError
            If the spill file cannot be read back.
        """
        await self.settle()  # the next round writes the file again
        if not self._released:
            return self._params
        if values_needed:
            return await self._spill.read()
        return dict(self.mean.reference)

    async def settle(self) -> None:
        """Wait for the spill write to end, whatever its outcome (a failed one is logged when
        the task is handed over, and the model then stays in memory)."""
        with contextlib.suppress(Exception):
            await asyncio.shield(self._writing)


@dataclass
class _Progress:
    """Where a run stands after its completed rounds (what each round checkpoints)."""

    params: dict[str, Any]
    next_round: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    server_state: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    stopped: bool = False
    resumed_at: list[int] = field(default_factory=list)


def _restored_progress(ctx: ControllerContext) -> _Progress:
    saved = ctx.restored
    try:
        progress = _Progress(
            params=dict(saved["params"]),
            next_round=int(saved["next_round"]),
            history=list(saved["history"]),
            server_state=dict(saved["server_state"]),
            metrics=dict(saved["metrics"]),
            stopped=bool(saved["stopped"]),
            resumed_at=list(saved["resumed_at"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(
            f"node {ctx.node!r}: its checkpoint is not a scatter-gather state: {exc!r}"
        ) from exc
    return progress


def _round_record(
    current_round: int, results: list[TaskResult], metrics: dict[str, float], seconds: float
) -> dict[str, Any]:
    return {
        "round": current_round,
        "ok": [result.site for result in results if result.ok],
        "dropped": [
            {"site": result.site, "status": result.status, "error": result.error}
            for result in results
            if not result.ok
        ],
        "metrics": metrics,
        "seconds": seconds,
    }


@dataclass
class FedAvg(ScatterGather):
    """Federated averaging (McMahan et al. 2017): the next global model is the weighted mean of
    the sites' models (FULL) or the global model plus the weighted mean of their diffs (DIFF).
    See :class:`ScatterGather` for the parameters."""

    def reads_global_values(self, mean: WeightedMean) -> bool:
        """DIFF rounds add the mean diff to the global model, and keys no site sent keep their
        global value; a FULL mean of every key needs only the global model's dtypes."""
        return mean.params_type is ParamsType.DIFF or len(mean.mean()) < len(mean.reference)

    def server_update(
        self, global_params: dict[str, Any], mean: WeightedMean, state: dict[str, Any]
    ) -> dict[str, Any]:
        means = mean.mean()
        updated = dict(global_params)
        for name, value in means.items():
            if mean.params_type is ParamsType.DIFF:
                value += global_params[name]
            updated[name] = cast_like(value, global_params[name])
        return updated
