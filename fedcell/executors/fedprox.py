"""FedProx's proximal term, for a site's PyTorch training loop.

FedProx (Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020) keeps each
site's local model near the global model it received by adding ``μ/2 · Σ‖w - w_global‖²`` over the
trainable parameters to the local loss. The server side is plain FedAvg; only the client changes::

    prox = FedProxLoss(mu=0.01)
    global_params = {k: v.clone() for k, v in model.state_dict().items()}  # after loading
    ...
    loss = criterion(model(x), y) + prox(model, global_params)

Only parameters that require grad are penalized (buffers such as BatchNorm statistics are not),
matched by name against ``global_params`` (a state dict: name → tensor); the global tensors are
treated as constants. torch is imported when the term is first computed, not when this module is
imported, so sites without torch can import fedcell's executors.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from fedcell.errors import ConfigError

__all__ = ["FedProxLoss"]


class FedProxLoss:
    """The FedProx proximal term ``μ/2 · Σ‖w - w_global‖²``.

    Parameters
    ----------
    mu:
        The proximal weight ``μ`` (≥ 0; 0 turns the term off).

    Raises
    ------
    ConfigError
        If ``mu`` is not a finite number ≥ 0.
    """

    def __init__(self, mu: float) -> None:
        if not (
            isinstance(mu, (int, float)) and not isinstance(mu, bool) and math.isfinite(mu)
            and mu >= 0
        ):
            raise ConfigError(f"FedProxLoss: mu must be a finite number >= 0, not {mu!r}")
        self.mu = float(mu)

    def __call__(self, model: Any, global_params: Mapping[str, Any]) -> Any:
        """The term for ``model`` (a ``torch.nn.Module``) against ``global_params``, as a scalar
        tensor that backpropagates into ``model``'s parameters.

        Raises
        ------
        ConfigError
            If a trainable parameter of ``model`` is missing from ``global_params`` or has a
            different shape.
        """
        import torch

        total: Any = None
        for name, weight in model.named_parameters():
            if not weight.requires_grad:
                continue
            reference = global_params.get(name)
            if reference is None:
                raise ConfigError(f"FedProxLoss: parameter {name!r} is not in global_params")
            if tuple(reference.shape) != tuple(weight.shape):
                raise ConfigError(
                    f"FedProxLoss: parameter {name!r} has shape {tuple(weight.shape)}, "
                    f"global_params has {tuple(reference.shape)}"
                )
            reference = torch.as_tensor(reference).detach().to(weight.device, weight.dtype)
            term = (weight - reference).pow(2).sum()
            total = term if total is None else total + term
        if total is None:
            return torch.zeros(())
        return (self.mu / 2.0) * total
