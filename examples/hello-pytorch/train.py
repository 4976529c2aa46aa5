"""Centralized training: the script before federation (compare with fl_train.py)."""

from __future__ import annotations

import torch
from model import Net, evaluate, make_data
from torch import nn

EPOCHS = 5


def main() -> None:
    lr = 0.05
    torch.manual_seed(0)
    train_loader, test_loader = make_data(site="site-1")
    net = Net()
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()

    for epoch in range(EPOCHS):
        net.train()
        steps = 0
        for x, y in train_loader:
            optimizer.zero_grad()
            loss_fn(net(x), y).backward()
            optimizer.step()
            steps += 1
        accuracy = evaluate(net, test_loader)
        print(f"epoch {epoch}: accuracy {accuracy:.3f} after {steps} steps")

    torch.save(net.state_dict(), "model.pt")


if __name__ == "__main__":
    main()
