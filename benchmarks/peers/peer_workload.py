"""The rounds workload, shared by the peer scripts: a ~10k-parameter MLP and one local SGD step.

This module runs inside the PEERS' virtualenvs (NVIDIA FLARE, Flower), in their server and
client processes, so it imports torch and the standard library only: nothing from fedcell and
nothing from either peer. The peer runners put this folder on ``PYTHONPATH`` so that a model given
to NVIDIA FLARE by class path (``peer_workload.RoundsMLP``) imports in every process it spawns.

The workload matches fedcell's rounds benchmark: ``32 -> 256 -> 8`` (10,504 parameters), a
synthetic batch of 64 samples drawn from a per-site seed, one SGD step per round.
"""

from __future__ import annotations

import torch
from torch import nn

IN_FEATURES = 32
HIDDEN = 256
CLASSES = 8
BATCH = 64
LEARNING_RATE = 0.05


class RoundsMLP(nn.Module):
    """The benchmark model: ``Linear(32, 256) -> ReLU -> Linear(256, 8)``, 10,504 parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(IN_FEATURES, HIDDEN)
        self.out = nn.Linear(HIDDEN, CLASSES)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.hidden(features)))


def site_batch(site_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the synthetic ``(features, labels)`` batch of the site numbered ``site_index``."""
    generator = torch.Generator().manual_seed(1_000 + site_index)
    features = torch.randn(BATCH, IN_FEATURES, generator=generator)
    labels = torch.randint(0, CLASSES, (BATCH,), generator=generator)
    return features, labels


def train_one_step(model: RoundsMLP, batch: tuple[torch.Tensor, torch.Tensor]) -> float:
    """Run one SGD step of ``model`` on ``batch`` in place and return the loss before the step."""
    features, labels = batch
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
    optimizer.zero_grad()
    loss = nn.functional.cross_entropy(model(features), labels)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def site_index_from_name(site_name: str) -> int:
    """Return the trailing number of a site name such as ``site-3`` (0 when it has none)."""
    digits = site_name.rsplit("-", 1)[-1]
    return int(digits) if digits.isdigit() else 0
