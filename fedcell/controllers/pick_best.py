"""``PickBest``: a DAG node that keeps the best of its upstream models by one metric.

Typical use is a model-selection job: several training branches (different hyper-parameters or
algorithms) run concurrently and feed one ``PickBest`` node, whose output (the winning FLModel)
flows on to, say, a final evaluation. It sends no tasks.

Its candidates are the upstream outputs that are :class:`~fedcell.fl_model.FLModel` objects
reporting ``metric`` as a number; other inputs are ignored (logged), and it is an error when no
candidate remains. Ties go to the first upstream node in ``ctx.inputs`` order. The output is the
winner with ``meta["picked_from"]`` (the node name) and ``meta["candidates"]`` (node → metric
value) added; the upstream object itself is not modified.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

from fedcell.engine.dispatcher import Controller, ControllerContext
from fedcell.errors import ConfigError
from fedcell.fl_model import FLModel

__all__ = ["PickBest"]


@dataclass
class PickBest(Controller):
    """Keep the upstream FLModel with the best ``metric``.

    Parameters
    ----------
    metric:
        The ``FLModel.metrics`` key to compare (e.g. ``"accuracy"``).
    mode:
        ``"max"`` (higher is better) or ``"min"`` (e.g. for a loss).
    """

    metric: str = "accuracy"
    mode: Literal["max", "min"] = "max"

    def validate(self) -> None:
        """Check the configuration.

        Raises
        ------
        ConfigError
            If ``metric`` is empty or ``mode`` is neither ``"max"`` nor ``"min"``.
        """
        if not isinstance(self.metric, str) or not self.metric:
            raise ConfigError(f"PickBest: metric must be a non-empty string, not {self.metric!r}")
        if self.mode not in ("max", "min"):
            raise ConfigError(f"PickBest: mode must be 'max' or 'min', not {self.mode!r}")

    async def run(self, ctx: ControllerContext) -> FLModel:
        """Return the best upstream model.

        Raises
        ------
        ConfigError
            If the configuration is invalid or no upstream output is an FLModel reporting a
            finite ``metric``.
        """
        self.validate()
        candidates: dict[str, float] = {}
        for node, output in ctx.inputs.items():
            value = (output.metrics or {}).get(self.metric) if isinstance(output, FLModel) else None
            if isinstance(value, (int, float)) and not isinstance(value, bool) and (
                math.isfinite(value)
            ):
                candidates[node] = float(value)
            else:
                ctx.logger.info("%s: input %r has no metric %r", ctx.node, node, self.metric)
        if not candidates:
            raise ConfigError(
                f"PickBest node {ctx.node!r}: no upstream FLModel reports metric {self.metric!r} "
                f"(inputs: {sorted(ctx.inputs)})"
            )
        choose = max if self.mode == "max" else min
        best = choose(candidates, key=candidates.__getitem__)
        winner: FLModel = ctx.inputs[best]
        ctx.logger.info("%s: picked %r (%s=%g)", ctx.node, best, self.metric, candidates[best])
        return replace(winner, meta={**winner.meta, "picked_from": best, "candidates": candidates})
