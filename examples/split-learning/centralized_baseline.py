"""The baseline: the same network trained in one place on the joined data, same seed and order."""

from __future__ import annotations

import numpy as np
import split_net
import torch
import vertical_data
from torch import nn
from torch.nn import functional

from fedcell.controllers.split_learning import batch_order


def _joined(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    feature_ids, x = vertical_data.features(split)
    label_ids, y = vertical_data.labels(split)
    x_sorted = x[np.argsort(feature_ids)]
    y_sorted = y[np.argsort(label_ids)]
    assert np.array_equal(np.sort(feature_ids), np.sort(label_ids))
    return torch.from_numpy(x_sorted), torch.from_numpy(y_sorted)


def train_centralized(
    epochs: int, batch_size: int = 64, seed: int = 0, lr: float = 0.3
) -> tuple[float, list[float]]:
    """Train bottom+top with SGD as the split run does; return (validation accuracy, the mean
    training loss of each epoch)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        bottom = split_net.bottom()
        torch.manual_seed(seed)
        top = split_net.top()
    net = nn.Sequential(bottom, top)
    optimizer = torch.optim.SGD(net.parameters(), lr=lr)
    x, y = _joined("train")
    epoch_losses = []
    for epoch in range(epochs):
        order = torch.from_numpy(batch_order(seed, epoch, len(x)))
        losses = []
        for rows in order.split(batch_size):
            loss = functional.cross_entropy(net(x[rows]), y[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        epoch_losses.append(sum(losses) / len(losses))
    x_val, y_val = _joined("validate")
    with torch.no_grad():
        accuracy = float((net(x_val).argmax(dim=1) == y_val).float().mean())
    return accuracy, epoch_losses
