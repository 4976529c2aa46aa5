"""The model and data of the job: a small classifier and a synthetic, site-dependent data set.

Replace ``make_data`` with your own loaders (each site reads its own data here) and ``Net`` with
your model; the training scripts only use these three names.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

N_FEATURES = 16
N_CLASSES = 3


class Net(nn.Module):
    """A two-layer MLP (about 2k parameters)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(N_FEATURES, 64), nn.ReLU(), nn.Linear(64, N_CLASSES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.layers(x)
        return logits


def make_data(site: str, n: int = 640) -> tuple[DataLoader[Any], DataLoader[Any]]:
    """Train/test loaders of one site: shared class centres, site-specific samples and shift."""
    centres = torch.randn(N_CLASSES, N_FEATURES, generator=torch.Generator().manual_seed(0))
    seed = sum(map(ord, site))  # the same in every process, unlike hash()
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, N_CLASSES, (n,), generator=generator)
    features = centres[labels] + torch.randn(n, N_FEATURES, generator=generator) + 0.1 * (seed % 3)
    split = int(0.8 * n)
    train = TensorDataset(features[:split], labels[:split])
    test = TensorDataset(features[split:], labels[split:])
    return (
        DataLoader(train, batch_size=32, shuffle=True, generator=generator),
        DataLoader(test, batch_size=256),
    )


def evaluate(net: nn.Module, loader: DataLoader[Any]) -> float:
    """The accuracy of ``net`` on ``loader``."""
    net.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in loader:
            correct += int((net(x).argmax(dim=1) == y).sum())
            total += len(y)
    return correct / total
