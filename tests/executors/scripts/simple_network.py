"""The tiny model of the hello-pytorch fixture script (a sibling module, as in NVFlare's example)."""

from __future__ import annotations

import torch
from torch import nn


class SimpleNetwork(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(8, 16)
        self.out = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.hidden(x)))
