"""Site behaviour for the workflow integration tests (a module, so job folders can ship it).

:class:`DigitSite` makes every hop and every matrix cell name the site that produced it: site
``site-<d>`` trains by ``w = 10 * w + d``, scores a model as ``w + d`` and submits ``w = 10 * d``
as its local model. The ``blob`` parameter (large enough to be streamed) must arrive intact at
every hop: it holds the number of trainings so far, which each site checks and increments.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedcell.controllers.cross_site_eval import refusal
from fedcell.engine.dispatcher import Task
from fedcell.errors import TaskFailedError
from fedcell.executors.base import Executor, SiteContext, task_model
from fedcell.fl_model import FLModel, ParamsType

#: float32 elements of the streamed parameter: 8 MiB, above the stream layer's 1 MiB threshold.
BLOB_ELEMENTS = 2 * 1024 * 1024


def initial_params() -> dict[str, np.ndarray]:
    return {"w": np.zeros(1), "blob": np.zeros(BLOB_ELEMENTS, np.float32)}


@dataclass
class DigitSite(Executor):
    """Train/validate/submit_model as described in the module docstring.

    Attributes
    ----------
    fail_in_round:
        A round whose train task raises (``None``: never).
    exit_in_round:
        A round whose train task kills the site process (a lost site).
    refuse_local_model:
        Answer ``submit_model`` with a refusal.
    """

    fail_in_round: int | None = None
    exit_in_round: int | None = None
    refuse_local_model: bool = False
    _digit: int = field(default=0, init=False, repr=False, compare=False)

    @property
    def task_names(self) -> tuple[str, ...]:
        return ("train", "validate", "submit_model")

    async def start(self, site: SiteContext) -> None:
        self._digit = int(site.site_name.rpartition("-")[2])

    async def execute(self, task: Task) -> Any:
        model = task_model(task)
        if task.name == "submit_model":
            if self.refuse_local_model:
                return refusal("site policy: the local model stays here")
            return FLModel(params={"w": np.full(1, 10.0 * self._digit)})
        params = model.params
        if task.name == "validate":
            return FLModel(metrics={"score": float(params["w"][0]) + self._digit})
        if model.current_round == self.exit_in_round:
            os._exit(3)
        if model.current_round == self.fail_in_round:
            raise TaskFailedError(f"site-{self._digit}: no data this round")
        blob = params["blob"]
        trainings = float(blob[0])
        if not np.all(blob == trainings):
            raise TaskFailedError(f"site-{self._digit}: the relayed blob arrived corrupted")
        return FLModel(
            params={"w": params["w"] * 10 + self._digit, "blob": blob + np.float32(1)},
            params_type=ParamsType.FULL,
            metrics={"trainings": trainings + 1},
            current_round=model.current_round,
        )
