"""The large-model benchmark's model and site step (plain numpy, no torch needed).

The model size comes from ``FEDCELL_BENCH_MODEL_MIB`` (default 1024): 64 MiB float32 layers,
like the weight matrices of an LLM's blocks. The site step nudges every weight in place and
sends the same arrays back, so a site holds one model.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

LAYER_MIB = 64


def model_mib() -> int:
    return int(os.environ.get("FEDCELL_BENCH_MODEL_MIB", "1024"))


def make_params() -> dict[str, np.ndarray]:
    """The initial global model: ``model_mib()`` MiB of float32 in 64 MiB layers."""
    total = model_mib() * 1024 * 1024 // 4
    layer = LAYER_MIB * 1024 * 1024 // 4
    rng = np.random.default_rng(0)
    params: dict[str, np.ndarray] = {}
    for index in range(max(1, total // layer)):
        # Random weights: constant ones would make blosc2 look unrealistically good.
        params[f"block{index}.weight"] = rng.random(min(layer, total), dtype=np.float32) - 0.5
    return params


def train(
    params: dict[str, np.ndarray], config: dict[str, Any]
) -> tuple[dict[str, np.ndarray], dict[str, Any], int]:
    for array in params.values():
        array += 0.001
    return params, {"loss": 1.0 / (1 + config["current_round"])}, 1
