"""An NVIDIA FLARE hello-pytorch style Client-API script.

Written the way FLARE's Client API examples are; the imports of ``fedcell.client`` (and of its
``tracking.SummaryWriter``) are its only fedcell-specific lines. Synthetic data, a tiny model.
"""

import argparse

import torch
from simple_network import SimpleNetwork
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fedcell.client as flare
from fedcell.client.tracking import SummaryWriter


def evaluate(model, loader):
    correct = total = 0
    with torch.no_grad():
        for features, labels in loader:
            predicted = model(features).argmax(dim=1)
            correct += int((predicted == labels).sum())
            total += len(labels)
    return correct / total


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch_size", type=int, default=8)
    args = parser.parse_args()

    generator = torch.Generator().manual_seed(0)
    features = torch.randn(64, 8, generator=generator)
    labels = (features.sum(dim=1) > 0).long()
    train_loader = DataLoader(TensorDataset(features, labels), batch_size=args.batch_size, shuffle=True)
    test_loader = DataLoader(TensorDataset(features, labels), batch_size=args.batch_size)

    model = SimpleNetwork()
    loss_fn = nn.CrossEntropyLoss()
    summary_writer = SummaryWriter()

    flare.init()
    site_name = flare.system_info()["site_name"]
    print(f"{site_name}: job {flare.get_job_id()} started with {args.epochs} epoch(s)")

    while flare.is_running():
        input_model = flare.receive()
        print(f"{site_name}: round {input_model.current_round} task {flare.get_task_name()}")
        model.load_state_dict(input_model.params)

        if flare.is_evaluate():
            flare.send(flare.FLModel(metrics={"accuracy": evaluate(model, test_loader)}))
            continue

        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        steps = 0
        for _ in range(args.epochs):
            for batch_features, batch_labels in train_loader:
                optimizer.zero_grad()
                loss = loss_fn(model(batch_features), batch_labels)
                loss.backward()
                optimizer.step()
                steps += 1
        flare.log("train_loss", loss.item(), flare.AnalyticsDataType.SCALAR, global_step=steps)
        summary_writer.add_scalar("last_batch_loss", loss.item(), global_step=input_model.current_round)

        flare.send(
            flare.FLModel(
                params=model.state_dict(),
                metrics={"accuracy": evaluate(model, test_loader)},
                meta={"NUM_STEPS_CURRENT_ROUND": steps},
            )
        )


if __name__ == "__main__":
    main()
