"""A synthetic vertically partitioned data set: one site has the features, the other the labels.

Both views come from one seeded generator (so every process sees the same samples) and share
sample ids (record numbers), but each site lists its records in its own order, as two
institutions would: the executors align them by id.
"""

from __future__ import annotations

import functools

import numpy as np
from split_net import N_CLASSES, N_FEATURES

N_TRAIN = 3072
N_VALIDATE = 1024


@functools.cache
def _records() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ids, features and labels of every record; labels come from a random two-layer teacher."""
    rng = np.random.default_rng(2024)
    n = N_TRAIN + N_VALIDATE
    features = rng.normal(size=(n, N_FEATURES)).astype(np.float32)
    hidden = np.tanh(features @ rng.normal(size=(N_FEATURES, 24)) / np.sqrt(N_FEATURES))
    labels = np.argmax(hidden @ rng.normal(size=(24, N_CLASSES)), axis=1)
    noisy = rng.random(n) < 0.05
    labels[noisy] = rng.integers(0, N_CLASSES, noisy.sum())
    ids = 100_000 + rng.permutation(n)
    return ids, features, labels.astype(np.int64)


def _view(split: str, site_seed: int) -> tuple[np.ndarray, slice, np.ndarray]:
    ids = _records()[0]
    part = slice(0, N_TRAIN) if split == "train" else slice(N_TRAIN, None)
    local_order = np.random.default_rng(site_seed).permutation(len(ids[part]))
    return ids[part][local_order], part, local_order


def features(split: str) -> tuple[np.ndarray, np.ndarray]:
    """The data site's records of ``split`` (``"train"`` or ``"validate"``): ids, features."""
    ids, part, order = _view(split, site_seed=1)
    return ids, _records()[1][part][order]


def labels(split: str) -> tuple[np.ndarray, np.ndarray]:
    """The label site's records of ``split``: ids, class labels (in another order)."""
    ids, part, order = _view(split, site_seed=2)
    return ids, _records()[2][part][order]
