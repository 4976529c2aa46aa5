"""Training functions of the deployment end-to-end test (a module, so job folders ship it)."""

from __future__ import annotations

import time
from typing import Any

import numpy as np


def add_one(
    params: dict[str, np.ndarray], config: dict[str, Any]
) -> tuple[dict[str, np.ndarray], dict[str, Any], int]:
    """Every site adds 1 to every weight: after R rounds of FedAvg the weights are R."""
    return {k: v + 1.0 for k, v in params.items()}, {}, 10


def slow_add_one(
    params: dict[str, np.ndarray], config: dict[str, Any]
) -> tuple[dict[str, np.ndarray], dict[str, Any], int]:
    """``add_one`` taking a second: a job that runs until it is aborted."""
    time.sleep(1.0)
    return add_one(params, config)
