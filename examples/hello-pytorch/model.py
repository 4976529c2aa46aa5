"""A small classifier and a synthetic, site-dependent data set (no downloads)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

N_FEATURES = 32
N_CLASSES = 4


class Net(nn.Module):
    """A ~10k-parameter MLP."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(N_FEATURES, 128), nn.ReLU(), nn.Linear(128, 48), nn.ReLU(), nn.Linear(48, N_CLASSES)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def make_data(site: str, n: int = 2048) -> tuple[DataLoader, DataLoader]:
    """Train/test loaders for one site: shared class centres, site-specific samples and shift."""
    centres = torch.randn(N_CLASSES, N_FEATURES, generator=torch.Generator().manual_seed(0)) * 0.6
    seed = sum(map(ord, site))  # stable across processes, unlike hash()
    shift = 0.1 * (seed % 3)
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, N_CLASSES, (n,), generator=g)
    features = centres[labels] + torch.randn(n, N_FEATURES, generator=g) * 2.5 + shift
    split = int(0.8 * n)
    train = TensorDataset(features[:split], labels[:split])
    test = TensorDataset(features[split:], labels[split:])
    return DataLoader(train, batch_size=64, shuffle=True, generator=g), DataLoader(test, batch_size=256)


def evaluate(net: nn.Module, loader: DataLoader) -> float:
    net.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in loader:
            correct += int((net(x).argmax(dim=1) == y).sum())
            total += len(y)
    return correct / total
