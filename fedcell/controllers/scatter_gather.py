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

All configuration is plain data (numbers, strings, lists, dicts), so a job exports it.
"""

from __future__ import annotations

import abc
import asyncio
import math
import operator
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fedcell.controllers.aggregation import WeightedMean, cast_like
from fedcell.controllers.initial_model import initial_params
from fedcell.engine.dispatcher import Controller, ControllerContext, Task, TaskResult
from fedcell.errors import CheckpointError, ConfigError, TooFewResultsError
from fedcell.fl_model import FLModel, ParamsType
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
        """

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
        # Accumulators reuse the memory of global models two rounds old (see WeightedMean).
        pool = ArrayPool(WeightedMean(global_params).accumulator_nbytes)
        try:
            for current_round in range(first_round, self.rounds):
                started = time.perf_counter()
                task = Task(
                    self.train_task,
                    FLModel(
                        params=global_params,
                        params_type=ParamsType.FULL,
                        current_round=current_round,
                        total_rounds=self.rounds,
                    ),
                    props=dict(self.task_props),
                )
                # Results come from the dispatcher, decoded for us: fold the first one in place.
                mean = WeightedMean(global_params, self.weigh_by, adopt_results=True, pool=pool)
                results = await self._gather(ctx, task, targets, needed, mean, current_round)
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
        mean: WeightedMean,
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

    async def _validate_final(
        self,
        ctx: ControllerContext,
        global_params: dict[str, Any],
        targets: list[str],
        needed: int,
        last_round: int,
    ) -> dict[str, float]:
        task = Task(
            self.validate_task,
            FLModel(
                params=global_params,
                params_type=ParamsType.FULL,
                current_round=last_round,
                total_rounds=self.rounds,
            ),
            props=dict(self.task_props),
        )
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
