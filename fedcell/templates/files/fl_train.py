"""The site's training script, federated with the Client API (four calls: init, is_running,
receive, send). Each round it loads the global model, trains one epoch on this site's data and
sends the result back with its accuracy and step count (FedAvg weighs by the steps).
"""

from __future__ import annotations

import torch
from net import Net, evaluate, make_data
from torch import nn

import fedcell.client as flare


def main() -> None:
    flare.init()
    lr = flare.get_config().get("lr", 0.05)
    torch.manual_seed(0)
    train_loader, test_loader = make_data(site=flare.get_site_name())
    net = Net()
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()

    while flare.is_running():
        input_model = flare.receive()
        assert input_model is not None  # is_running() just received it
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
        flare.send(
            flare.FLModel(
                params=net.state_dict(),
                metrics={"accuracy": accuracy},
                meta={"NUM_STEPS_CURRENT_ROUND": steps},
            )
        )


if __name__ == "__main__":
    main()
