"""Controllers: FL algorithms written against :class:`~fedcell.engine.dispatcher.Dispatcher`.

Each is a dataclass whose fields are its configuration (plain values, exportable with a job):
:class:`FedAvg` (scatter-gather with in-time weighted averaging), the server optimizers
:class:`FedAvgM`, :class:`FedAdam`, :class:`FedYogi`, and :class:`PickBest` (model selection in
a DAG). The client-side FedProx term is :class:`fedcell.executors.fedprox.FedProxLoss`.
"""

from __future__ import annotations

from fedcell.controllers.aggregation import WeightedMean
from fedcell.controllers.fedopt import FedAdam, FedAvgM, FedOpt, FedYogi
from fedcell.controllers.pick_best import PickBest
from fedcell.controllers.scatter_gather import FedAvg, ScatterGather

__all__ = [
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedOpt",
    "FedYogi",
    "PickBest",
    "ScatterGather",
    "WeightedMean",
]
