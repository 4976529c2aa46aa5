"""FedProxLoss: the proximal term's value and gradient against hand computation."""

from __future__ import annotations

import pytest
import torch

from fedcell.errors import ConfigError
from fedcell.executors.fedprox import FedProxLoss


def small_model() -> torch.nn.Module:
    model = torch.nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 2.0]]))
        model.bias.copy_(torch.tensor([0.5]))
    return model


def test_value_and_gradient_match_hand_computation() -> None:
    # Prepare
    model = small_model()
    global_params = {"weight": torch.tensor([[0.0, 1.0]]), "bias": torch.tensor([0.5])}

    # Execute
    term = FedProxLoss(mu=0.2)(model, global_params)
    term.backward()

    # Assert: μ/2 · (1² + 1² + 0²) = 0.2; gradient μ·(w - w_global)
    assert term.item() == pytest.approx(0.2)
    torch.testing.assert_close(model.weight.grad, torch.tensor([[0.2, 0.2]]))
    torch.testing.assert_close(model.bias.grad, torch.tensor([0.0]))
    assert global_params["weight"].grad is None


def test_frozen_parameters_are_not_penalized_and_dtypes_are_matched() -> None:
    model = small_model()
    model.bias.requires_grad_(False)
    global_params = {"weight": torch.tensor([[1.0, 0.0]], dtype=torch.bfloat16)}  # no bias

    term = FedProxLoss(mu=1.0)(model, global_params)

    assert term.item() == pytest.approx(2.0)  # 1/2 · 2²


def test_mu_zero_gives_zero() -> None:
    model = small_model()
    term = FedProxLoss(mu=0)(model, {"weight": torch.zeros(1, 2), "bias": torch.zeros(1)})
    assert term.item() == 0.0


def test_missing_or_misshapen_global_parameters_raise() -> None:
    model = small_model()
    prox = FedProxLoss(mu=0.1)
    with pytest.raises(ConfigError, match="'bias' is not in global_params"):
        prox(model, {"weight": torch.zeros(1, 2)})
    with pytest.raises(ConfigError, match=r"'weight' has shape \(1, 2\), global_params has \(2,\)"):
        prox(model, {"weight": torch.zeros(2), "bias": torch.zeros(1)})


@pytest.mark.parametrize("mu", [-0.1, float("nan"), float("inf"), "0.1", True])
def test_bad_mu_raises_config_error(mu: object) -> None:
    with pytest.raises(ConfigError, match="mu must be a finite number >= 0"):
        FedProxLoss(mu)  # type: ignore[arg-type]


def test_importing_the_module_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = "import sys, fedcell.executors.fedprox; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
