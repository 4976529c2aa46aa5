"""The site's script for training and evaluation: it answers the three Client-API tasks.

- ``train``: load the received model, train one epoch on this site's data, send it back;
- ``validate``: evaluate the received model on this site's test data, send the accuracy;
- ``submit_model``: hand this site's local model (the one it trained last, or a local-only
  baseline trained now when it never trained in this job) to cross-site evaluation.
"""

from __future__ import annotations

from typing import Any

import torch
from net import Net, evaluate, make_data
from torch import nn
from torch.utils.data import DataLoader

import fedcell.client as flare


def train_epochs(net: nn.Module, loader: DataLoader[Any], lr: float, epochs: int) -> int:
    """Train ``net`` in place; return the number of optimizer steps."""
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    net.train()
    steps = 0
    for _ in range(epochs):
        for x, y in loader:
            optimizer.zero_grad()
            loss_fn(net(x), y).backward()
            optimizer.step()
            steps += 1
    return steps


def main() -> None:
    flare.init()
    lr = flare.get_config().get("lr", 0.05)
    torch.manual_seed(0)
    train_loader, test_loader = make_data(site=flare.get_site_name())
    net = Net()
    local_model: dict[str, torch.Tensor] | None = None

    while flare.is_running():
        input_model = flare.receive()
        assert input_model is not None  # is_running() just received it
        if flare.is_train():
            net.load_state_dict(input_model.params)
            steps = train_epochs(net, train_loader, lr, epochs=1)
            accuracy = evaluate(net, test_loader)
            local_model = {name: value.clone() for name, value in net.state_dict().items()}
            print(f"round {input_model.current_round}: accuracy {accuracy:.3f}")
            flare.send(
                flare.FLModel(
                    params=net.state_dict(),
                    metrics={"accuracy": accuracy},
                    meta={"NUM_STEPS_CURRENT_ROUND": steps},
                )
            )
        elif flare.is_evaluate():
            net.load_state_dict(input_model.params)
            accuracy = evaluate(net, test_loader)
            print(f"model {input_model.meta.get('model_name')}: accuracy {accuracy:.3f} here")
            flare.send(flare.FLModel(metrics={"accuracy": accuracy}))
        elif flare.is_submit_model():
            if local_model is None:
                baseline = Net()
                train_epochs(baseline, train_loader, lr, epochs=2)
                local_model = baseline.state_dict()
            flare.send(flare.FLModel(params=local_model))


if __name__ == "__main__":
    main()
