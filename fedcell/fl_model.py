"""``FLModel``: what travels between a controller and a site's training code.

Field names and meanings follow NVIDIA FLARE's Client API so that scripts written for it run
unchanged: ``params`` (name → array/tensor), ``params_type`` (``FULL`` weights or a ``DIFF``
from the received ones), ``optimizer_params``, ``metrics``, round counters and free-form ``meta``.
It is a registered wire type: it crosses the network through the safe codec, never pickle.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from fedcell.transports.codec import wire_type

__all__ = ["FLModel", "ParamsType"]


class ParamsType(str, enum.Enum):
    """Whether ``FLModel.params`` holds whole weights or a difference to the received ones."""

    FULL = "FULL"
    DIFF = "DIFF"

    def __str__(self) -> str:
        return self.value


@wire_type("fedcell.FLModel")
@dataclass
class FLModel:
    """A model (or model update) with its metadata.

    Attributes
    ----------
    params:
        Parameter name → numpy array or torch tensor (or any wire-encodable value).
    params_type:
        ``ParamsType.FULL`` or ``ParamsType.DIFF``; strings are accepted and converted.
    optimizer_params:
        Optional optimizer state.
    metrics:
        Scalar metrics (e.g. ``{"accuracy": 0.91}``); controllers read them for selection
        and early stopping.
    start_round, current_round, total_rounds:
        Round counters, as NVIDIA FLARE defines them.
    meta:
        Free-form metadata; ``meta["NUM_STEPS_CURRENT_ROUND"]`` weights FedAvg like FLARE does.
    """

    params: Any = None
    params_type: ParamsType | str | None = None
    optimizer_params: Any = None
    metrics: dict[str, Any] | None = None
    start_round: int | None = 0
    current_round: int | None = None
    total_rounds: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.params_type is not None and not isinstance(self.params_type, ParamsType):
            try:
                self.params_type = ParamsType(str(self.params_type).upper())
            except ValueError:
                raise ValueError(
                    f"params_type must be FULL or DIFF, not {self.params_type!r}"
                ) from None
        if self.meta is None:
            self.meta = {}
