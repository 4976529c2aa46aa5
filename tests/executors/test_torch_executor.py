"""TorchExecutor: a model factory plus train/evaluate functions, no script."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import torch
from torch import nn

from fedcell.engine.dispatcher import Task, TaskResult
from fedcell.executors import SiteContext, TorchExecutor, run_task
from fedcell.fl_model import FLModel, ParamsType


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(4, 1)


def fit(model: nn.Module, config: dict[str, Any]) -> tuple[dict[str, Any], int]:
    generator = torch.Generator().manual_seed(config["current_round"])
    features = torch.randn(32, 4, generator=generator)
    targets = features.sum(dim=1, keepdim=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.get("lr", 0.1))
    for _ in range(20):
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(features), targets)
        loss.backward()
        optimizer.step()
    return {"loss": loss.item()}, 32


def mean_output(model: nn.Module, config: dict[str, Any]) -> dict[str, Any]:
    return {"mean": model(torch.ones(1, 4)).item()}


def test_rounds_train_the_received_weights_and_evaluate_them() -> None:
    async def main() -> tuple[list[TaskResult], TaskResult]:
        # Prepare
        executor = TorchExecutor(model_factory=make_model, train=fit, evaluate=mean_output)
        await executor.start(SiteContext("site-1", "job-1"))
        weights = {"weight": torch.zeros(1, 4), "bias": torch.zeros(1)}
        results = []
        try:
            # Execute
            for round_number in range(3):
                task = Task("train", FLModel(params=weights, current_round=round_number), {"lr": 0.05})
                result = await run_task(executor, task, "site-1")
                assert result.ok, result.error
                results.append(result)
                weights = result.data.params
            evaluation = await run_task(executor, Task("validate", FLModel(params=weights)), "site-1")
        finally:
            await executor.stop()
        return results, evaluation

    results, evaluation = asyncio.run(main())

    # Assert
    losses = [r.data.metrics["loss"] for r in results]
    assert losses[-1] < losses[0]  # each round starts from the previous round's weights
    last = results[-1].data
    assert last.params_type == ParamsType.FULL and last.meta == {"NUM_STEPS_CURRENT_ROUND": 32}
    assert last.params["weight"].device.type == "cpu"
    expected = float(last.params["weight"].sum() + last.params["bias"].sum())
    assert evaluation.ok and evaluation.data.metrics["mean"] == pytest.approx(expected, rel=1e-5)


def test_weights_that_do_not_fit_the_model_fail_the_task() -> None:
    async def main() -> TaskResult:
        executor = TorchExecutor(model_factory=make_model, train=fit)
        await executor.start(SiteContext("site-1", "job-1"))
        try:
            return await run_task(executor, Task("train", FLModel(params={"other": torch.zeros(1)})), "site-1")
        finally:
            await executor.stop()

    result = asyncio.run(main())

    assert result.status == "failed" and "Missing key(s)" in result.error


def test_without_evaluate_only_training_is_answered() -> None:
    assert TorchExecutor(model_factory=make_model, train=fit).task_names == ("train",)
