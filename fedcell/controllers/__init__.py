"""Controllers: FL algorithms written against :class:`~fedcell.engine.dispatcher.Dispatcher`.

Each is a dataclass whose fields are its configuration (plain values, exportable with a job):
:class:`FedAvg` (scatter-gather with in-time weighted averaging), the server optimizers
:class:`FedAvgM`, :class:`FedAdam`, :class:`FedYogi`, :class:`PickBest` (model selection in
a DAG), :class:`Cyclic` (one model relayed through the sites) and :class:`CrossSiteEval` (a
model × site metrics matrix) and :class:`SplitLearning` (a network split between a data site
and a label site). The client-side FedProx term is
:class:`fedcell.executors.fedprox.FedProxLoss`.
"""

from __future__ import annotations

from fedcell.controllers.aggregation import WeightedMean
from fedcell.controllers.cross_site_eval import CrossSiteEval
from fedcell.controllers.cyclic import Cyclic
from fedcell.controllers.fedopt import FedAdam, FedAvgM, FedOpt, FedYogi
from fedcell.controllers.pick_best import PickBest
from fedcell.controllers.scatter_gather import FedAvg, ScatterGather
from fedcell.controllers.split_learning import SplitLearning

__all__ = [
    "CrossSiteEval",
    "Cyclic",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedOpt",
    "FedYogi",
    "PickBest",
    "ScatterGather",
    "SplitLearning",
    "WeightedMean",
]
