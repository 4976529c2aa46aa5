"""Training functions for simulator tests (a module, so job folders can ship it)."""

from __future__ import annotations

from typing import Any

import numpy as np


def add_one(
    params: dict[str, np.ndarray], config: dict[str, Any]
) -> tuple[dict[str, np.ndarray], dict[str, Any], int]:
    """Every site adds 1 to every weight: after R rounds of FedAvg the weights are R."""
    return {k: v + 1.0 for k, v in params.items()}, {"seen_round": config["current_round"]}, 10


def always_fail(
    params: dict[str, np.ndarray], config: dict[str, Any]
) -> tuple[dict[str, np.ndarray], dict[str, Any], int]:
    """User code that raises."""
    raise ValueError("bad batch in user code")
