"""The network of the split-learning example, cut in two at a 16-wide layer."""

from __future__ import annotations

from torch import nn

N_FEATURES = 32
CUT_WIDTH = 16
N_CLASSES = 4


def bottom() -> nn.Module:
    """The data site's half: features → cut layer."""
    return nn.Sequential(nn.Linear(N_FEATURES, 64), nn.ReLU(), nn.Linear(64, CUT_WIDTH), nn.ReLU())


def top() -> nn.Module:
    """The label site's half: cut layer → class logits."""
    return nn.Sequential(nn.Linear(CUT_WIDTH, 32), nn.ReLU(), nn.Linear(32, N_CLASSES))
