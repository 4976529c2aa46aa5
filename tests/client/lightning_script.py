"""A Lightning Client-API script for the tests: the usual loop, plus a record of every round.

Run by a ScriptRunner; ``sys.argv[1]`` is the folder that receives one ``<site>-<round>.pt``
per round: the weights the module held when validation and training started, what fit sent,
the global model's validation metrics and the trainer's epoch/step counters.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from lightning_parts import TinyClassifier, make_trainer, site_loaders

import fedcell.client as flare

out = Path(sys.argv[1])
trainer = make_trainer(max_epochs=2)
flare.patch(trainer)
site = flare.get_site_name()
model = TinyClassifier(seed=100 + int(site.rsplit("-", 1)[1]))  # each site starts elsewhere
train_loader, validation_loader = site_loaders(site)

while flare.is_running():
    input_model = flare.receive()
    trainer.validate(model, dataloaders=validation_loader, verbose=False)
    global_metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    trainer.fit(model, train_dataloaders=train_loader, val_dataloaders=validation_loader)
    torch.save(
        {
            "received": {k: torch.as_tensor(v).clone() for k, v in input_model.params.items()},
            "at_validate": model.snapshots["validate"],
            "at_train_start": model.snapshots["train_start"],
            "momentum_at_start": model.snapshots["momentum_at_start"],
            "lr_at_start": float(model.snapshots["lr_at_start"]["lr"]),
            "after_fit": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "global_metrics": global_metrics,
            "epoch": trainer.current_epoch,
            "global_step": trainer.global_step,
        },
        out / f"{site}-{input_model.current_round}.pt",
    )
