"""A custom DAG node in a dozen lines: keep the better of the models fed in along the edges."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fedcell.engine.dispatcher import Controller, ControllerContext
from fedcell.errors import ConfigError
from fedcell.fl_model import FLModel


@dataclass
class KeepBetter(Controller):
    """Output the upstream FLModel with the highest ``metric``; its name goes into ``meta``."""

    metric: str = "accuracy"

    async def run(self, ctx: ControllerContext) -> FLModel:
        scored: dict[str, Any] = {
            name: model for name, model in ctx.inputs.items()
            if isinstance(model, FLModel) and self.metric in (model.metrics or {})
        }  # fmt: skip
        if not scored:
            raise ConfigError(f"{ctx.node}: no upstream model reports {self.metric!r}")
        best = max(scored, key=lambda name: scored[name].metrics[self.metric])
        ctx.logger.info("%s: keeping %s (%s=%.4f)", ctx.node, best, self.metric,
                        scored[best].metrics[self.metric])
        return FLModel(params=scored[best].params, metrics=scored[best].metrics,
                       meta={"chosen": best})
