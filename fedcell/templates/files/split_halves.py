"""Split learning's two halves and the vertically partitioned data they train on.

The data site holds the features and ``bottom`` (features → cut layer); the label site holds the
labels and ``top`` (cut layer → class logits). Only cut-layer activations and their gradients
travel; labels never leave their site. Both sites list the same records (by id) in their own
order; the executors align them by id. Replace ``features`` and ``labels`` with loaders of each
site's own part: ``loader(split) -> (sample_ids, values)`` for split ``"train"`` or
``"validate"``.
"""

from __future__ import annotations

import functools

import numpy as np
from torch import nn

N_FEATURES = 16
CUT_WIDTH = 8
N_CLASSES = 3
N_TRAIN = 1024
N_VALIDATE = 256


def bottom() -> nn.Module:
    """The data site's half: features → cut layer."""
    return nn.Sequential(nn.Linear(N_FEATURES, 32), nn.ReLU(), nn.Linear(32, CUT_WIDTH), nn.ReLU())


def top() -> nn.Module:
    """The label site's half: cut layer → class logits."""
    return nn.Sequential(nn.Linear(CUT_WIDTH, 16), nn.ReLU(), nn.Linear(16, N_CLASSES))


@functools.cache
def _records() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ids, features and labels of every record (labels from a random linear teacher)."""
    rng = np.random.default_rng(7)
    n = N_TRAIN + N_VALIDATE
    features = rng.normal(size=(n, N_FEATURES)).astype(np.float32)
    labels = np.argmax(features @ rng.normal(size=(N_FEATURES, N_CLASSES)), axis=1)
    ids = 1_000 + rng.permutation(n)
    return ids, features, labels.astype(np.int64)


def _view(split: str, site_seed: int) -> tuple[np.ndarray, slice, np.ndarray]:
    ids = _records()[0]
    part = slice(0, N_TRAIN) if split == "train" else slice(N_TRAIN, None)
    local_order = np.random.default_rng(site_seed).permutation(len(ids[part]))
    return ids[part][local_order], part, local_order


def features(split: str) -> tuple[np.ndarray, np.ndarray]:
    """The data site's records of ``split``: ids, features."""
    ids, part, order = _view(split, site_seed=1)
    return ids, _records()[1][part][order]


def labels(split: str) -> tuple[np.ndarray, np.ndarray]:
    """The label site's records of ``split``: ids, class labels (in another order)."""
    ids, part, order = _view(split, site_seed=2)
    return ids, _records()[2][part][order]
