"""``NumpyExecutor``: the reference executor, a plain function over numpy arrays.

For tests, examples and the numpy quick path: no script, no torch. The function runs on a worker
thread so a long training step never blocks the site's event loop::

    def train(params: dict[str, np.ndarray], config: dict) -> tuple[params, metrics, n_samples]

``config`` holds the task's ``props`` plus ``current_round`` and ``total_rounds``. The result is
an :class:`~fedcell.fl_model.FLModel` of ``FULL`` params whose ``meta["NUM_STEPS_CURRENT_ROUND"]``
is ``n_samples`` (what FedAvg weights by).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedcell.engine.dispatcher import Task
from fedcell.errors import ConfigError, TaskFailedError
from fedcell.executors.base import Executor, task_config, task_model, user_code_failed
from fedcell.executors.params import convert_params
from fedcell.fl_model import FLModel, ParamsType

__all__ = ["NumpyExecutor", "NumpyTrainFunction"]

NumpyTrainFunction = Callable[
    [dict[str, np.ndarray], dict[str, Any]], tuple[dict[str, np.ndarray], dict[str, Any], int]
]


@dataclass
class NumpyExecutor(Executor):
    """Answers ``task_name`` tasks with ``train(params, config) -> (params, metrics, n_samples)``.

    Attributes
    ----------
    train:
        The training function (runs on a worker thread).
    task_name:
        The task it answers.
    """

    train: NumpyTrainFunction
    task_name: str = "train"

    @property
    def task_names(self) -> tuple[str, ...]:
        return (self.task_name,)

    async def execute(self, task: Task) -> FLModel:
        """Run the training function on the task's params.

        Raises
        ------
        ConfigError
            If the task is not ``task_name`` or carries no FLModel.
        TaskFailedError
            If the function raised or returned something other than
            ``(params, metrics, n_samples)``.
        """
        if task.name != self.task_name:
            raise ConfigError(f"NumpyExecutor answers {self.task_name!r}, not {task.name!r}")
        model = task_model(task)
        params = convert_params(model.params, "numpy")
        try:
            output = await asyncio.to_thread(self.train, params, task_config(task, model))
        except Exception as exc:
            raise user_code_failed(f"train function {getattr(self.train, '__name__', self.train)!r}", exc) from exc
        if not (isinstance(output, tuple) and len(output) == 3 and isinstance(output[0], dict)):
            raise TaskFailedError(
                f"train function returned {type(output).__name__}; expected a tuple "
                "(params dict, metrics dict, n_samples)"
            )
        new_params, metrics, n_samples = output
        return FLModel(
            params=new_params,
            params_type=ParamsType.FULL,
            metrics=dict(metrics or {}),
            current_round=model.current_round,
            total_rounds=model.total_rounds,
            meta={"NUM_STEPS_CURRENT_ROUND": int(n_samples)},
        )
