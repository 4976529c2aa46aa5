"""Server-side optimizers on the round's pseudo-gradient: FedAvgM, FedAdam, FedYogi.

Adaptive federated optimization (Reddi et al., "Adaptive Federated Optimization", ICLR 2021)
treats the averaged client update as a gradient for a server optimizer. With ``x`` the global
model and ``Δ = mean(client models) - x`` (for DIFF rounds, the mean diff itself; see
:meth:`~fedcell.controllers.aggregation.WeightedMean.update`), the pseudo-gradient is ``-Δ`` and,
per parameter tensor, element-wise:

- :class:`FedAvgM` (Hsu et al. 2019): ``v ← β·v + Δ``; ``x ← x + η·v``. With ``β = 0`` and
  ``η = 1`` it is FedAvg.
- :class:`FedAdam`: ``m ← β₁·m + (1-β₁)·Δ``; ``v ← β₂·v + (1-β₂)·Δ²``;
  ``x ← x + η·m / (√v + τ)``.
- :class:`FedYogi`: as FedAdam but ``v ← v - (1-β₂)·Δ²·sign(v - Δ²)``, which grows ``v`` more
  slowly.

As in the paper's Algorithm 2, there is no bias correction; ``m`` starts at 0 and ``v`` at ``τ²``.
The state (``m``, ``v``) lives for one run of the controller, per parameter, at the aggregation's
accumulator precision (float64 for small models, float32 for large; see
:mod:`fedcell.controllers.aggregation`), so FedAdam costs two extra models of server memory. The
math is plain numpy or torch whole-array arithmetic (torch.optim is not needed); results are cast
back to each parameter's dtype. Parameters no site sent in a round keep their value and state.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass
from typing import Any

from fedcell.controllers.aggregation import WeightedMean, cast_like, sign, sqrt, zeros_like
from fedcell.controllers.scatter_gather import ScatterGather
from fedcell.errors import ConfigError

__all__ = ["FedAdam", "FedAvgM", "FedOpt", "FedYogi"]


def _is_finite_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_positive(owner: str, name: str, value: object) -> None:
    if not (_is_finite_number(value) and value > 0):  # type: ignore[operator]
        raise ConfigError(f"{owner}: {name} must be a finite number > 0, not {value!r}")


def _check_decay(owner: str, name: str, value: object) -> None:
    if not (_is_finite_number(value) and 0 <= value < 1):  # type: ignore[operator]
        raise ConfigError(f"{owner}: {name} must be a number in [0, 1), not {value!r}")


def _precision(array: Any) -> str:
    return str(array.dtype).removeprefix("torch.")


@dataclass
class FedOpt(ScatterGather):
    """Scatter-gather whose global model moves by a server optimizer step.

    Parameters
    ----------
    server_lr:
        The server learning rate ``η`` (> 0).
    (others):
        As :class:`~fedcell.controllers.scatter_gather.ScatterGather`.
    """

    server_lr: float = 1.0

    def validate(self) -> None:
        """Check the configuration.

        Raises
        ------
        ConfigError
            Naming the first bad parameter.
        """
        super().validate()
        _check_positive(type(self).__name__, "server_lr", self.server_lr)

    def server_update(
        self, global_params: dict[str, Any], mean: WeightedMean, state: dict[str, Any]
    ) -> dict[str, Any]:
        updated = dict(global_params)
        for name, step in mean.update().items():
            moments = state.setdefault(name, {})
            direction = self.direction(step, moments)
            direction *= self.server_lr
            direction += global_params[name]
            updated[name] = cast_like(direction, global_params[name])
        return updated

    @abc.abstractmethod
    def direction(self, step: Any, moments: dict[str, Any]) -> Any:
        """The update direction for one parameter from its averaged step ``Δ`` (which may be
        reused in place), advancing its ``moments`` (empty on the first round). Returns a new
        array at ``Δ``'s precision; the caller scales it by ``server_lr`` and adds it."""


@dataclass
class FedAvgM(FedOpt):
    """FedAvg with server momentum: ``v ← β·v + Δ``, ``x ← x + η·v``.

    Parameters
    ----------
    momentum:
        ``β`` in [0, 1).
    (others):
        As :class:`FedOpt`.
    """

    momentum: float = 0.9

    def validate(self) -> None:
        """Check the configuration.

        Raises
        ------
        ConfigError
            Naming the first bad parameter.
        """
        super().validate()
        _check_decay(type(self).__name__, "momentum", self.momentum)

    def direction(self, step: Any, moments: dict[str, Any]) -> Any:
        velocity = moments.get("v")
        if velocity is None:
            velocity = moments["v"] = zeros_like(step, _precision(step))
        velocity *= self.momentum
        velocity += step
        return velocity * 1.0  # a copy: the state must not be scaled by the caller


@dataclass
class FedAdam(FedOpt):
    """Adam on the server: ``m ← β₁m + (1-β₁)Δ``, ``v ← β₂v + (1-β₂)Δ²``,
    ``x ← x + η·m/(√v + τ)``.

    Parameters
    ----------
    server_lr:
        ``η`` (default 0.01).
    beta1, beta2:
        Moment decay rates in [0, 1).
    tau:
        Adaptivity ``τ`` (> 0): larger means closer to momentum SGD.
    (others):
        As :class:`FedOpt`.
    """

    server_lr: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3

    def validate(self) -> None:
        """Check the configuration.

        Raises
        ------
        ConfigError
            Naming the first bad parameter.
        """
        super().validate()
        owner = type(self).__name__
        _check_decay(owner, "beta1", self.beta1)
        _check_decay(owner, "beta2", self.beta2)
        _check_positive(owner, "tau", self.tau)

    def direction(self, step: Any, moments: dict[str, Any]) -> Any:
        if not moments:
            moments["m"] = zeros_like(step, _precision(step))
            moments["v"] = zeros_like(step, _precision(step))
            moments["v"] += self.tau**2
        first, second = moments["m"], moments["v"]
        first *= self.beta1
        first += (1.0 - self.beta1) * step
        step *= step  # Δ², in place: Δ is not needed any more
        self.advance_second_moment(second, step)
        return first / (sqrt(second) + self.tau)

    def advance_second_moment(self, second: Any, step_squared: Any) -> None:
        """Adam: ``v ← β₂·v + (1-β₂)·Δ²`` in place."""
        second *= self.beta2
        second += (1.0 - self.beta2) * step_squared


@dataclass
class FedYogi(FedAdam):
    """Yogi on the server: FedAdam with ``v ← v - (1-β₂)·Δ²·sign(v - Δ²)``.

    Parameters
    ----------
    (all):
        As :class:`FedAdam`.
    """

    def advance_second_moment(self, second: Any, step_squared: Any) -> None:
        """Yogi: ``v ← v - (1-β₂)·Δ²·sign(v - Δ²)`` in place."""
        second -= (1.0 - self.beta2) * step_squared * sign(second - step_squared)
