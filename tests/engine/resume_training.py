"""Seeded training functions for the resume tests (a module, so job folders ship it to sites).

Each site fits a small logistic regression on its own seeded data for a few gradient steps per
round. The result depends non-linearly on the global model and on the round, so a resumed job
ends with the reference model only if it restarts from exactly the right round, model and state.
Each call sleeps a little so that a test can kill the server while rounds are in progress.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

#: Seconds each local training call takes at least.
ROUND_SECONDS = 0.25


def _local_steps(
    params: dict[str, np.ndarray], config: dict[str, Any], seed: int
) -> tuple[dict[str, np.ndarray], dict[str, Any], int]:
    rng = np.random.default_rng([seed, int(config["current_round"])])
    features = rng.normal(size=(64, 5))
    labels = (features @ np.array([1.0, -2.0, 0.5, 0.0, 3.0]) + rng.normal(size=64) > 0) * 1.0
    weights, bias = params["w"].copy(), params["b"].copy()
    for _ in range(5):
        predicted = 1.0 / (1.0 + np.exp(-(features @ weights + bias)))
        error = predicted - labels
        weights -= 0.5 * features.T @ error / len(labels)
        bias -= 0.5 * error.mean(keepdims=True)
    loss = float(-np.mean(labels * np.log(predicted) + (1 - labels) * np.log(1 - predicted)))
    time.sleep(ROUND_SECONDS)
    return {"w": weights, "b": bias}, {"loss": loss}, 64 + 32 * seed


def train_site_1(
    params: dict[str, np.ndarray], config: dict[str, Any]
) -> tuple[dict[str, np.ndarray], dict[str, Any], int]:
    """Site 1's data (seed 1)."""
    return _local_steps(params, config, 1)


def train_site_2(
    params: dict[str, np.ndarray], config: dict[str, Any]
) -> tuple[dict[str, np.ndarray], dict[str, Any], int]:
    """Site 2's data (seed 2)."""
    return _local_steps(params, config, 2)
