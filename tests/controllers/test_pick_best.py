"""PickBest: choose the upstream model with the best metric, min or max."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

from fedcell.controllers import PickBest
from fedcell.engine.dispatcher import ControllerContext
from fedcell.engine.local_dispatcher import LocalDispatcher
from fedcell.errors import ConfigError
from fedcell.fl_model import FLModel


def pick(controller: PickBest, inputs: dict[str, Any]) -> FLModel:
    async def main() -> FLModel:
        dispatcher = LocalDispatcher({"s1": lambda site, task: None})
        return await controller.run(ControllerContext("j", "best", dispatcher, inputs))

    return asyncio.run(main())


def candidate(value: Any, metric: str = "accuracy") -> FLModel:
    return FLModel(params={"w": np.array([value])}, metrics={metric: value}, meta={"tag": 1})


def test_max_mode_keeps_the_highest_metric() -> None:
    inputs = {"lr_small": candidate(0.81), "lr_large": candidate(0.93), "lr_mid": candidate(0.88)}

    best = pick(PickBest(metric="accuracy"), inputs)

    assert best.metrics == {"accuracy": 0.93}
    assert best.meta["picked_from"] == "lr_large"
    assert best.meta["candidates"] == {"lr_small": 0.81, "lr_large": 0.93, "lr_mid": 0.88}
    assert best.meta["tag"] == 1
    assert "picked_from" not in inputs["lr_large"].meta  # upstream output left untouched


def test_min_mode_keeps_the_lowest_and_ties_go_to_the_first_input() -> None:
    inputs = {"a": candidate(0.5, "loss"), "b": candidate(0.2, "loss"), "c": candidate(0.2, "loss")}

    best = pick(PickBest(metric="loss", mode="min"), inputs)

    assert best.meta["picked_from"] == "b"


def test_inputs_without_the_metric_are_ignored() -> None:
    inputs = {
        "table": {"accuracy": 0.99},  # not an FLModel
        "no_metrics": FLModel(params={}),
        "nan": candidate(float("nan")),
        "text": candidate("high"),
        "real": candidate(0.6),
    }

    assert pick(PickBest(), inputs).meta["picked_from"] == "real"


def test_no_candidate_raises_naming_the_metric_and_inputs() -> None:
    with pytest.raises(ConfigError, match=r"no upstream FLModel reports metric 'auc'.*\['a'\]"):
        pick(PickBest(metric="auc"), {"a": candidate(0.7)})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"metric": ""}, "metric must be a non-empty string"), ({"mode": "best"}, "mode must be")],
)
def test_bad_parameters_raise_config_error(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        PickBest(**kwargs).validate()


def test_pick_best_sends_no_tasks() -> None:
    assert PickBest().task_names == ()
