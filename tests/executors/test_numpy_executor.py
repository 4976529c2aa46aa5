"""NumpyExecutor: a plain function over numpy arrays."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest
import torch

from fedcell.engine.dispatcher import Task
from fedcell.errors import ConfigError
from fedcell.executors import NumpyExecutor, run_task
from fedcell.fl_model import FLModel, ParamsType


def add_round(params: dict[str, np.ndarray], config: dict[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, Any], int]:
    return {k: v + config["current_round"] for k, v in params.items()}, {"lr": config["lr"]}, 12


def test_train_function_result_becomes_a_full_model() -> None:
    executor = NumpyExecutor(train=add_round)
    task = Task("train", FLModel(params={"w": torch.zeros(2)}, current_round=3, total_rounds=5), {"lr": 0.5})

    result = asyncio.run(run_task(executor, task, "site-1"))

    assert result.ok, result.error
    model = result.data
    assert isinstance(model.params["w"], np.ndarray)  # tensors arrive as numpy
    assert np.array_equal(model.params["w"], np.full(2, 3.0))
    assert model.params_type == ParamsType.FULL and model.metrics == {"lr": 0.5}
    assert (model.current_round, model.total_rounds) == (3, 5)
    assert model.meta == {"NUM_STEPS_CURRENT_ROUND": 12}


def test_raising_or_misshapen_train_functions_fail_the_task() -> None:
    def broken(params: dict[str, np.ndarray], config: dict[str, Any]) -> Any:
        raise ArithmeticError("diverged")

    def misshapen(params: dict[str, np.ndarray], config: dict[str, Any]) -> Any:
        return params

    task = Task("train", FLModel(params={"w": np.zeros(1)}))
    raised = asyncio.run(run_task(NumpyExecutor(train=broken), task, "site-1"))
    wrong = asyncio.run(run_task(NumpyExecutor(train=misshapen), task, "site-1"))

    assert raised.status == "failed" and "ArithmeticError: diverged" in raised.error
    assert "in broken" in raised.error  # the traceback names the user's function
    assert wrong.status == "failed" and "expected a tuple" in wrong.error


def test_unknown_task_or_missing_model_is_a_configuration_error() -> None:
    executor = NumpyExecutor(train=add_round)
    assert executor.task_names == ("train",)
    with pytest.raises(ConfigError, match="not 'validate'"):
        asyncio.run(executor.execute(Task("validate", FLModel())))
    with pytest.raises(ConfigError, match="not an FLModel"):
        asyncio.run(executor.execute(Task("train", None)))
