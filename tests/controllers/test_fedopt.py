"""Server optimizers: FedAvgM, FedAdam and FedYogi steps against scalar reference formulas."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import numpy as np
import pytest
import torch

from fedcell.controllers import FedAdam, FedAvg, FedAvgM, FedYogi, ScatterGather
from fedcell.engine.dispatcher import ControllerContext, Task
from fedcell.engine.local_dispatcher import LocalDispatcher, SiteHandler
from fedcell.errors import ConfigError
from fedcell.fl_model import FLModel, ParamsType

#: The client update Δ each round (mean of the sites' models minus the global model).
DELTAS = [[1.0, -2.0], [0.5, 0.5], [-0.25, 1.0]]


def run(controller: ScatterGather, handlers: dict[str, SiteHandler]) -> FLModel:
    async def main() -> FLModel:
        return await controller.run(ControllerContext("j", "opt", LocalDispatcher(handlers)))

    return asyncio.run(main())


def moving_by(deltas: list[list[float]], params_type: ParamsType = ParamsType.FULL) -> SiteHandler:
    """A site whose round-r update is ``deltas[r]`` (sent FULL or DIFF)."""

    def train(site: str, task: Task) -> FLModel:
        model = task.data
        delta = deltas[model.current_round]
        if params_type is ParamsType.DIFF:
            params = {"w": np.asarray(delta, dtype=np.float64)}
        elif isinstance(model.params["w"], torch.Tensor):
            params = {"w": model.params["w"] + torch.tensor(delta, dtype=model.params["w"].dtype)}
        else:
            params = {"w": model.params["w"] + np.asarray(delta)}
        return FLModel(params=params, params_type=params_type)

    return train


def adam_reference(
    x: list[float], server_lr: float, beta1: float, beta2: float, tau: float, *, yogi: bool
) -> list[float]:
    """Reddi et al. 2021, Algorithm 2, one element at a time in plain floats."""
    out = []
    for i, xi in enumerate(x):
        m, v = 0.0, tau * tau
        for delta in (d[i] for d in DELTAS):
            m = beta1 * m + (1 - beta1) * delta
            if yogi:
                v = v - (1 - beta2) * delta * delta * math.copysign(1.0, v - delta * delta)
            else:
                v = beta2 * v + (1 - beta2) * delta * delta
            xi = xi + server_lr * m / (math.sqrt(v) + tau)
        out.append(xi)
    return out


def test_fedavgm_matches_hand_computed_steps() -> None:
    # v0 = Δ0 = [1, -2]; x1 = [1, 2] + 2·v0 = [3, -2]
    # v1 = 0.5·v0 + Δ1 = [1, -0.5]; x2 = [3, -2] + 2·v1 = [5, -3]
    # v2 = 0.5·v1 + Δ2 = [0.25, 0.75]; x3 = [5, -3] + 2·v2 = [5.5, -1.5]
    controller = FedAvgM(rounds=3, initial_params={"w": [1.0, 2.0]}, momentum=0.5, server_lr=2.0)

    out = run(controller, {"s1": moving_by(DELTAS)})

    np.testing.assert_allclose(out.params["w"], [5.5, -1.5])


def test_fedavgm_without_momentum_and_unit_rate_is_fedavg() -> None:
    handlers = {"s1": moving_by(DELTAS), "s2": moving_by([[3.0, 0.0]] * 3)}
    initial = {"w": [0.0, 0.0]}

    plain = run(FedAvg(rounds=3, initial_params=initial), handlers)
    momentum_free = run(
        FedAvgM(rounds=3, initial_params=initial, momentum=0.0, server_lr=1.0), handlers
    )

    np.testing.assert_allclose(momentum_free.params["w"], plain.params["w"])


@pytest.mark.parametrize("optimizer", [FedAdam, FedYogi])
@pytest.mark.parametrize("params_type", [ParamsType.FULL, ParamsType.DIFF])
def test_adaptive_optimizers_match_the_reference(
    optimizer: type[FedAdam], params_type: ParamsType
) -> None:
    settings: dict[str, Any] = {"server_lr": 0.1, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3}
    controller = optimizer(rounds=3, initial_params={"w": [1.0, 2.0]}, **settings)

    out = run(controller, {"s1": moving_by(DELTAS, params_type)})

    expected = adam_reference([1.0, 2.0], **settings, yogi=optimizer is FedYogi)
    np.testing.assert_allclose(out.params["w"], expected, rtol=1e-12)


def test_yogi_and_adam_differ_once_the_second_moment_shrinks() -> None:
    settings: dict[str, Any] = {"server_lr": 0.1, "beta1": 0.9, "beta2": 0.5, "tau": 1e-3}
    adam = adam_reference([0.0, 0.0], **settings, yogi=False)
    yogi = adam_reference([0.0, 0.0], **settings, yogi=True)
    assert not np.allclose(adam, yogi)  # the two references are not the same formula

    controller = FedYogi(rounds=3, initial_params={"w": [0.0, 0.0]}, **settings)
    out = run(controller, {"s1": moving_by(DELTAS)})

    np.testing.assert_allclose(out.params["w"], yogi, rtol=1e-12)


def test_torch_float32_params_keep_their_dtype() -> None:
    settings: dict[str, Any] = {"server_lr": 0.1, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3}
    initial = {"w": torch.tensor([1.0, 2.0])}

    out = run(FedAdam(rounds=3, initial_params=initial, **settings), {"s1": moving_by(DELTAS)})

    assert out.params["w"].dtype == torch.float32
    expected = torch.tensor(adam_reference([1.0, 2.0], **settings, yogi=False))
    torch.testing.assert_close(out.params["w"], expected)


@pytest.mark.parametrize(
    ("controller", "message"),
    [
        (FedAvgM(server_lr=0), "server_lr must be a finite number > 0"),
        (FedAvgM(server_lr=math.inf), "server_lr must be a finite number > 0"),
        (FedAvgM(momentum=1.0), r"momentum must be a number in \[0, 1\)"),
        (FedAdam(beta1=-0.1), r"beta1 must be a number in \[0, 1\)"),
        (FedYogi(beta2=math.nan), r"beta2 must be a number in \[0, 1\)"),
        (FedAdam(tau=0), "tau must be a finite number > 0"),
        (FedYogi(rounds=0), "FedYogi: rounds must be an integer >= 1"),
    ],
)
def test_bad_optimizer_parameters_raise_config_error(
    controller: ScatterGather, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        controller.validate()
