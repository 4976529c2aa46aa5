"""``TorchExecutor``: PyTorch training without a script, for users who prefer a class.

Give it a model factory and a train function (optionally an evaluate function)::

    TorchExecutor(model_factory=Net, train=train_one_round, evaluate=accuracy)

    def train_one_round(model: nn.Module, config: dict) -> tuple[metrics, n_samples]
    def accuracy(model: nn.Module, config: dict) -> metrics

The model is built once at :meth:`~TorchExecutor.start` and moved to ``device``; each task loads
the received params into it (``strict`` ``load_state_dict``), so optimizer-free state such as
batch-norm statistics follows the global model. The train result is the model's state dict,
copied to CPU, as ``FULL`` params with ``meta["NUM_STEPS_CURRENT_ROUND"] = n_samples``; the
evaluate result carries metrics only. User code runs on a worker thread, never on the event loop.
``config`` holds the task's props plus ``current_round`` and ``total_rounds``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from fedcell.engine.dispatcher import Task
from fedcell.errors import ConfigError, TaskFailedError
from fedcell.executors.base import (
    Executor,
    SiteContext,
    task_config,
    task_model,
    user_code_failed,
)
from fedcell.executors.params import convert_params
from fedcell.fl_model import FLModel, ParamsType

__all__ = ["TorchExecutor"]

TorchTrainFunction = Callable[[torch.nn.Module, dict[str, Any]], tuple[dict[str, Any], int]]
TorchEvaluateFunction = Callable[[torch.nn.Module, dict[str, Any]], dict[str, Any]]


@dataclass
class TorchExecutor(Executor):
    """Trains (and optionally evaluates) a PyTorch model built by ``model_factory``.

    Attributes
    ----------
    model_factory:
        Builds the model (called once per job, on a worker thread).
    train:
        ``train(model, config) -> (metrics, n_samples)``; updates ``model`` in place.
    evaluate:
        ``evaluate(model, config) -> metrics``, or ``None`` to answer training tasks only.
    device:
        Where the model lives (``"cpu"``, ``"cuda:0"``).
    train_task, evaluate_task:
        The task names answered.
    """

    model_factory: Callable[[], torch.nn.Module]
    train: TorchTrainFunction
    evaluate: TorchEvaluateFunction | None = None
    device: str = "cpu"
    train_task: str = "train"
    evaluate_task: str = "validate"
    _model: torch.nn.Module | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def task_names(self) -> tuple[str, ...]:
        if self.evaluate is None:
            return (self.train_task,)
        return (self.train_task, self.evaluate_task)

    async def start(self, site: SiteContext) -> None:
        """Build the model on ``device``.

        Raises
        ------
        TaskFailedError
            If the model factory raised.
        """

        def build() -> torch.nn.Module:
            return self.model_factory().to(self.device)

        try:
            self._model = await asyncio.to_thread(build)
        except Exception as exc:
            raise user_code_failed("model_factory", exc) from exc

    async def execute(self, task: Task) -> FLModel:
        """Load the task's params into the model, then train or evaluate it.

        Raises
        ------
        ConfigError
            If not started, the task name is not answered, or the task carries no FLModel.
        TaskFailedError
            If the params do not fit the model, or user code raised or returned the wrong shape.
        """
        if self._model is None:
            raise ConfigError("TorchExecutor.execute() before start()")
        if task.name not in self.task_names:
            raise ConfigError(
                f"TorchExecutor answers tasks {', '.join(self.task_names)}, not {task.name!r}"
            )
        model_in = task_model(task)
        config = task_config(task, model_in)
        is_train = task.name == self.train_task
        step = self._train_step if is_train else self._evaluate_step
        what = "train function" if is_train else "evaluate function"
        try:
            return await asyncio.to_thread(step, self._model, model_in, config)
        except TaskFailedError:
            raise
        except Exception as exc:
            raise user_code_failed(what, exc) from exc

    def _load(self, model: torch.nn.Module, model_in: FLModel) -> None:
        if model_in.params is not None:
            model.load_state_dict(convert_params(model_in.params, "pytorch"), strict=True)

    def _train_step(self, model: torch.nn.Module, model_in: FLModel, config: dict[str, Any]) -> FLModel:
        self._load(model, model_in)
        model.train()
        output = self.train(model, config)
        if not (isinstance(output, tuple) and len(output) == 2):
            raise TaskFailedError(
                f"train function returned {type(output).__name__}; expected (metrics, n_samples)"
            )
        metrics, n_samples = output
        params = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        return FLModel(
            params=params,
            params_type=ParamsType.FULL,
            metrics=dict(metrics or {}),
            current_round=model_in.current_round,
            total_rounds=model_in.total_rounds,
            meta={"NUM_STEPS_CURRENT_ROUND": int(n_samples)},
        )

    def _evaluate_step(
        self, model: torch.nn.Module, model_in: FLModel, config: dict[str, Any]
    ) -> FLModel:
        assert self.evaluate is not None  # task_names only lists evaluate_task when it is set
        self._load(model, model_in)
        model.eval()
        with torch.no_grad():
            metrics = self.evaluate(model, config)
        if not isinstance(metrics, dict):
            raise TaskFailedError(
                f"evaluate function returned {type(metrics).__name__}; expected a metrics dict"
            )
        return FLModel(metrics=metrics, current_round=model_in.current_round)

    async def stop(self) -> None:
        """Drop the model."""
        self._model = None
