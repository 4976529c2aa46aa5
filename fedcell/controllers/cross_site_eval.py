"""``CrossSiteEval``: every model evaluated at every site, as a model × site metrics matrix.

Which models (``models``):

``"global"``
    The FLModels fed in along DAG edges (``ctx.inputs``), one row per upstream node, labelled
    with the node's name. At least one upstream FLModel is required.
``"local"``
    Each site's own model: a ``submit_model`` task asks each target site for it, one site at a
    time. A row per site that hands it over, labelled with the site's name. The task carries
    ``FLModel(meta={"submit_model_name": "best_model"})``, the name NVIDIA FLARE sends, so a
    FLARE script that checks it answers unchanged.
``"both"`` (default)
    The global rows first, then the local ones.

Refusal: a site may keep its local model (policy, no model trained yet). Its executor, or its
Client-API script, answers ``submit_model`` with an FLModel whose ``meta["refused"]`` holds the
reason (:func:`refusal` builds it; a script writes
``flare.send(flare.FLModel(meta={"refused": "site policy"}))``). A refusal is respected and
recorded in ``missing`` with status ``"refused"``; it is not an error. A submit that fails,
crashes or times out is recorded the same way with its status.

Evaluation: one ``validate`` task per model, broadcast to the target sites, carrying
``FLModel(params, FULL, meta={"model_name": label, "model_kind": "global"|"local"})``; each site
answers with an FLModel whose ``metrics`` fill the model's row (finite numbers are kept). A site
that drops, or answers without metrics, leaves its cell empty (``None``) with a record in
``missing``. The node fails with :class:`~fedcell.errors.TooFewResultsError` only when there were
models to evaluate and not one cell got metrics.

Memory: models are evaluated one after the other, and a local model is asked for only when the
previous one is evaluated, so the server holds the upstream models plus one local model;
``validate`` answers are reduced to their metrics as they arrive.

Output (plain data, so it can go into job results as JSON)::

    {"sites": ["site-1", "site-2"],
     "models": {"train": {"kind": "global", "source": "train"},
                "site-1": {"kind": "local", "source": "site-1"}},
     "matrix": {"train": {"site-1": {"accuracy": 0.91}, "site-2": {"accuracy": 0.88}},
                "site-1": {"site-1": {"accuracy": 0.93}, "site-2": None}},
     "missing": [{"model": "site-1", "site": "site-2", "task": "validate",
                  "status": "timeout", "error": "no result within 30 s"},
                 {"model": "site-2", "site": "site-2", "task": "submit_model",
                  "status": "refused", "error": "site policy"}]}

It is also written to ``<node workspace>/cross_site_eval.json`` when the node has a workspace,
and logged as a table (:func:`matrix_table` renders it with rich, showing ``metric`` or every
metric).

Crash-resume: after each model's row is complete (a global model evaluated everywhere, or a
site's local model fetched — or refused — and evaluated everywhere) the node checkpoints the
matrix so far and the steps done; a resumed run skips those steps and ends with the same matrix.
A model interrupted mid-row is evaluated again from its start.
"""

from __future__ import annotations

import io
import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from fedcell.engine.dispatcher import Controller, ControllerContext, Task, TaskResult
from fedcell.errors import CheckpointError, ConfigError, ProtocolError, TooFewResultsError
from fedcell.fl_model import FLModel, ParamsType

__all__ = [
    "LOCAL_MODEL_NAME",
    "REFUSED",
    "CrossSiteEval",
    "format_matrix",
    "matrix_table",
    "refusal",
]

#: The ``FLModel.meta`` key by which a site refuses to submit its local model (value: reason).
REFUSED = "refused"

ModelSource = Literal["local", "global", "both"]

#: ``meta["submit_model_name"]`` of a submit_model task (NVIDIA FLARE's ``ModelName.BEST_MODEL``).
LOCAL_MODEL_NAME = "best_model"

#: File the matrix is written to in the node's workspace.
RESULT_FILE = "cross_site_eval.json"


def refusal(reason: str) -> FLModel:
    """The answer to a ``submit_model`` task that keeps the local model at the site.

    Parameters
    ----------
    reason:
        Why (recorded in the evaluation's ``missing`` list).
    """
    return FLModel(meta={REFUSED: reason})


def _refusal_reason(model: FLModel) -> str | None:
    if not isinstance(model.meta, Mapping) or REFUSED not in model.meta:
        return None
    return str(model.meta[REFUSED]) or "no reason given"


def _numeric_metrics(model: FLModel) -> dict[str, float]:
    metrics = model.metrics if isinstance(model.metrics, Mapping) else {}
    return {
        str(name): float(value)
        for name, value in metrics.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    }


@dataclass
class CrossSiteEval(Controller):
    """Evaluate global and/or local models at every target site.

    Parameters
    ----------
    models:
        ``"global"`` (upstream FLModels), ``"local"`` (each site's submitted model) or
        ``"both"``.
    sites:
        Target sites (asked for models and evaluating them); default every site of the job.
    task_timeout:
        Seconds each site has for each submit/validate task; default until it answers or is
        lost.
    metric:
        The metric the logged table shows; default every metric.
    task_props:
        Plain settings sent with every task.
    submit_model_task, validate_task:
        Task names the sites' executors answer.
    """

    models: ModelSource = "both"
    sites: list[str] | None = None
    task_timeout: float | None = None
    metric: str | None = None
    task_props: dict[str, Any] = field(default_factory=dict)
    submit_model_task: str = "submit_model"
    validate_task: str = "validate"

    @property
    def task_names(self) -> tuple[str, ...]:
        if self.models == "global":
            return (self.validate_task,)
        return (self.submit_model_task, self.validate_task)

    def validate(self) -> None:
        """Check the configuration.

        Raises
        ------
        ConfigError
            Naming the first bad parameter.
        """
        if self.models not in ("local", "global", "both"):
            raise ConfigError(
                f"CrossSiteEval: models must be 'local', 'global' or 'both', not {self.models!r}"
            )
        if self.sites is not None:
            if not isinstance(self.sites, (list, tuple)) or not self.sites or not all(
                isinstance(site, str) and site for site in self.sites
            ):
                raise ConfigError(
                    f"CrossSiteEval: sites must be a non-empty list of names, not {self.sites!r}"
                )
            if len(set(self.sites)) != len(self.sites):
                raise ConfigError(f"CrossSiteEval: sites names a site twice: {self.sites!r}")
        if self.task_timeout is not None and not (
            isinstance(self.task_timeout, (int, float))
            and not isinstance(self.task_timeout, bool)
            and self.task_timeout > 0
        ):
            raise ConfigError(
                f"CrossSiteEval: task_timeout must be a number > 0, not {self.task_timeout!r}"
            )
        if self.metric is not None and (not isinstance(self.metric, str) or not self.metric):
            raise ConfigError(
                f"CrossSiteEval: metric must be a non-empty string, not {self.metric!r}"
            )
        if not isinstance(self.task_props, dict) or not all(
            isinstance(key, str) for key in self.task_props
        ):
            raise ConfigError("CrossSiteEval: task_props must be a dict with string keys")
        for name in ("submit_model_task", "validate_task"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ConfigError(
                    f"CrossSiteEval: {name} must be a non-empty string, not {value!r}"
                )

    async def run(self, ctx: ControllerContext) -> dict[str, Any]:
        """Collect the models, evaluate each at every target site, return the matrix.

        Raises
        ------
        ConfigError
            If the configuration is invalid, a target is not a site of the job, ``models``
            asks for global models and no upstream node produced an FLModel, or a global
            model's node has a site's name.
        TooFewResultsError
            If there were models to evaluate and no site returned metrics for any of them.
        """
        self.validate()
        owner = f"CrossSiteEval node {ctx.node!r}"
        targets = list(self.sites) if self.sites is not None else list(ctx.dispatcher.sites)
        unknown = [site for site in targets if site not in ctx.dispatcher.sites]
        if unknown:
            raise ConfigError(f"{owner}: {unknown} are not sites of the job")
        upstream = {
            node: output
            for node, output in ctx.inputs.items()
            if isinstance(output, FLModel) and isinstance(output.params, Mapping)
        }
        if self.models == "local":
            upstream = {}
        elif not upstream:
            raise ConfigError(
                f"{owner}: models={self.models!r} needs an upstream node whose output is an "
                f"FLModel (inputs: {sorted(ctx.inputs)}); use models='local' to evaluate the "
                "sites' own models only"
            )
        clashing = sorted(set(upstream) & set(targets))
        if clashing and self.models == "both":
            raise ConfigError(f"{owner}: upstream node(s) {clashing} are named like sites")
        evaluation = _Evaluation(targets)
        done: list[str] = []  # steps completed: "global:<node>", "local:<site>"
        if ctx.restored is not None:
            evaluation, done = _restore(ctx)
            ctx.logger.info("%s resumes after %d of its steps", ctx.node, len(done))
        total = len(upstream) + (len(targets) if self.models != "global" else 0)
        for node, model in upstream.items():
            if f"global:{node}" not in done:
                await self._evaluate(ctx, evaluation, node, "global", model.params, targets)
                await _step_done(ctx, evaluation, done, f"global:{node}")
            ctx.report(len(evaluation.models), total)
        if self.models != "global":
            for index, site in enumerate(targets):
                if f"local:{site}" not in done:
                    params = await self._local_model(ctx, evaluation, site)
                    if params is not None:
                        await self._evaluate(ctx, evaluation, site, "local", params, targets)
                        del params  # hold one local model at a time
                    await _step_done(ctx, evaluation, done, f"local:{site}")
                ctx.report(len(upstream) + index + 1, total)
        output = evaluation.as_dict()
        if ctx.logger.isEnabledFor(logging.INFO):
            ctx.logger.info("%s:\n%s", ctx.node, format_matrix(output, self.metric))
        if ctx.workspace is not None:
            (ctx.workspace / RESULT_FILE).write_text(json.dumps(output, indent=2))
        if evaluation.models and not evaluation.any_metrics():
            empty = [m for m in evaluation.missing if m["model"] in evaluation.models]
            raise TooFewResultsError(
                f"{owner}: no site returned metrics for any of {list(evaluation.models)}; "
                + "; ".join(f"{m['model']}@{m['site']}: {m['status']} ({m['error']})"
                            for m in empty),
                [TaskResult(m["site"], m["task"], m["status"], error=m["error"]) for m in empty],
            )  # fmt: skip
        return output

    async def _local_model(
        self, ctx: ControllerContext, evaluation: _Evaluation, site: str
    ) -> Mapping[str, Any] | None:
        """``site``'s local params, or ``None`` (recorded) when it refused or dropped."""
        task = Task(
            self.submit_model_task,
            FLModel(meta={"submit_model_name": LOCAL_MODEL_NAME}),
            props=dict(self.task_props),
            timeout=self.task_timeout,
        )
        result = await ctx.dispatcher.send_and_wait(task, site)
        if not result.ok:
            ctx.logger.warning("%s: no local model from %s", ctx.node, result.describe())
            evaluation.record_missing(site, site, result.task, result.status, result.error)
            return None
        model = result.data
        reason = _refusal_reason(model) if isinstance(model, FLModel) else None
        if reason is not None:
            ctx.logger.info("%s: %s keeps its local model (%s)", ctx.node, site, reason)
            evaluation.record_missing(site, site, result.task, "refused", reason)
            return None
        if not isinstance(model, FLModel) or not isinstance(model.params, Mapping):
            what = type(model.params if isinstance(model, FLModel) else model).__name__
            error = f"result rejected: expected an FLModel with params, got {what}"
            evaluation.record_missing(site, site, result.task, "failed", error)
            return None
        return model.params

    async def _evaluate(
        self,
        ctx: ControllerContext,
        evaluation: _Evaluation,
        label: str,
        kind: Literal["global", "local"],
        params: Mapping[str, Any],
        targets: list[str],
    ) -> None:
        evaluation.add_model(label, kind)
        task = Task(
            self.validate_task,
            FLModel(
                params=params,
                params_type=ParamsType.FULL,
                meta={"model_name": label, "model_kind": kind},
            ),
            props=dict(self.task_props),
            timeout=self.task_timeout,
        )

        def keep_metrics(result: TaskResult) -> None:
            if not isinstance(result.data, FLModel):
                raise ProtocolError(f"expected an FLModel, got {type(result.data).__name__}")
            metrics = _numeric_metrics(result.data)
            if not metrics:
                raise ProtocolError("the validate result holds no numeric metrics")
            evaluation.set_cell(label, result.site, metrics)

        results = await ctx.dispatcher.broadcast_and_wait(
            task, targets, min_responses=0, fold=keep_metrics
        )
        for result in results:
            if not result.ok:
                evaluation.record_missing(label, result.site, result.task, result.status,
                                          result.error)  # fmt: skip
        ctx.logger.info(
            "%s: %s model %r evaluated at %d of %d sites",
            ctx.node, kind, label, sum(r.ok for r in results), len(targets),
        )  # fmt: skip


async def _step_done(
    ctx: ControllerContext, evaluation: _Evaluation, done: list[str], step: str
) -> None:
    """Record a completed step and checkpoint the matrix so far (a resumed run skips it)."""
    done.append(step)
    await ctx.checkpoint({"done": done, "evaluation": evaluation.as_dict()})


def _restore(ctx: ControllerContext) -> tuple[_Evaluation, list[str]]:
    """The matrix and completed steps a crashed run saved.

    Raises
    ------
    CheckpointError
        If the restored state is not a cross-site evaluation state.
    """
    saved = ctx.restored
    try:
        state = saved["evaluation"]
        evaluation = _Evaluation([str(site) for site in state["sites"]])
        evaluation.models = {str(k): dict(v) for k, v in state["models"].items()}
        evaluation.matrix = {str(k): dict(v) for k, v in state["matrix"].items()}
        evaluation.missing = [dict(m) for m in state["missing"]]
        done = [str(step) for step in saved["done"]]
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(
            f"node {ctx.node!r}: its checkpoint is not a cross-site evaluation state: {exc!r}"
        ) from exc
    return evaluation, done


class _Evaluation:
    """The matrix being filled in."""

    def __init__(self, sites: list[str]) -> None:
        self.sites = sites
        self.models: dict[str, dict[str, str]] = {}
        self.matrix: dict[str, dict[str, dict[str, float] | None]] = {}
        self.missing: list[dict[str, Any]] = []

    def add_model(self, label: str, kind: str) -> None:
        self.models[label] = {"kind": kind, "source": label}
        self.matrix[label] = dict.fromkeys(self.sites)

    def set_cell(self, label: str, site: str, metrics: dict[str, float]) -> None:
        self.matrix[label][site] = metrics

    def record_missing(
        self, label: str, site: str, task: str, status: str, error: str | None
    ) -> None:
        self.missing.append(
            {"model": label, "site": site, "task": task, "status": status, "error": error}
        )

    def any_metrics(self) -> bool:
        return any(cell is not None for row in self.matrix.values() for cell in row.values())

    def as_dict(self) -> dict[str, Any]:
        return {
            "sites": list(self.sites),
            "models": self.models,
            "matrix": self.matrix,
            "missing": self.missing,
        }


def matrix_table(evaluation: Mapping[str, Any], metric: str | None = None) -> Any:
    """A ``rich.table.Table`` of a :class:`CrossSiteEval` output: a row per model, a column per
    site; a cell shows ``metric`` (or every metric), or why it is empty.

    Raises
    ------
    ConfigError
        If ``evaluation`` is not a CrossSiteEval output.
    """
    from rich.table import Table

    try:
        sites, models, matrix = evaluation["sites"], evaluation["models"], evaluation["matrix"]
        missing = evaluation["missing"]
    except (KeyError, TypeError) as exc:
        raise ConfigError(f"not a CrossSiteEval output: {exc!r}") from exc
    why = {(m["model"], m["site"]): m["status"] for m in missing if m["model"] in models}
    title = "cross-site evaluation" + (f" ({metric})" if metric else "")
    table = Table(title=title)
    table.add_column("model")
    for site in sites:
        table.add_column(site, justify="right")
    for label, info in models.items():
        cells = []
        for site in sites:
            metrics = matrix[label][site]
            if metrics is None:
                cells.append(f"- ({why.get((label, site), 'missing')})")
            elif metric is not None:
                value = metrics.get(metric)
                cells.append("-" if value is None else f"{value:.4f}")
            else:
                cells.append(" ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        table.add_row(f"{label} ({info['kind']})", *cells)
    kept = [m for m in missing if m["model"] not in models]  # local models never received
    if kept:
        table.caption = "no local model: " + "; ".join(
            f"{m['site']} {m['status']} ({m['error']})" for m in kept
        )
    return table


def format_matrix(
    evaluation: Mapping[str, Any], metric: str | None = None, width: int = 120
) -> str:
    """:func:`matrix_table` as plain text (for logs).

    Raises
    ------
    ConfigError
        If ``evaluation`` is not a CrossSiteEval output.
    """
    from rich.console import Console

    buffer = io.StringIO()
    Console(file=buffer, width=width, color_system=None).print(matrix_table(evaluation, metric))
    return buffer.getvalue().rstrip()
