"""The same training, federated (see the README for the diff with train.py).

Written exactly like an NVIDIA FLARE Client API script; only the import line names fedcell.
"""

from __future__ import annotations

import torch
from model import Net, evaluate, make_data
from torch import nn

import fedcell.client as flare  # for NVIDIA FLARE: import nvflare.client as flare


def main() -> None:
    flare.init()
    lr = flare.get_config().get("lr", 0.05)  # examples/dag sets it per branch
    torch.manual_seed(0)
    train_loader, test_loader = make_data(site=flare.get_site_name())
    net = Net()
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()

    while flare.is_running():
        input_model = flare.receive()
        net.load_state_dict(input_model.params)
        net.train()
        steps = 0
        for x, y in train_loader:
            optimizer.zero_grad()
            loss_fn(net(x), y).backward()
            optimizer.step()
            steps += 1
        accuracy = evaluate(net, test_loader)
        print(f"round {input_model.current_round}: accuracy {accuracy:.3f} after {steps} steps")
        flare.send(flare.FLModel(params=net.state_dict(), metrics={"accuracy": accuracy},
                                 meta={"NUM_STEPS_CURRENT_ROUND": steps}))


if __name__ == "__main__":
    main()
