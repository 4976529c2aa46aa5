"""A tiny LightningModule and site data for the ``flare.patch(trainer)`` tests.

The module snapshots its weights where the federated callbacks must already have loaded the
global model (its own hooks run after the callbacks' hooks of the same name), so the tests can
compare what each round really trained from with what the server aggregated.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

#: Warnings of Lightning that are no failure of the code under test: its performance hints
#: (``PossibleUserWarning``: few DataLoader workers on a many-core machine, a GPU left unused by
#: the CPU trainers), from both distributions, and a torch pytree API that torch 2.13 deprecates
#: and Lightning 2.6 still calls.
LIGHTNING_WARNINGS = [
    pytest.mark.filterwarnings("ignore::lightning.fabric.utilities.warnings.PossibleUserWarning"),
    pytest.mark.filterwarnings("ignore::lightning_fabric.utilities.warnings.PossibleUserWarning"),
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning"),
]

N_FEATURES = 8
N_CLASSES = 3
BATCH_SIZE = 16
#: Training samples per site: different sizes make FedAvg's step weighting visible.
SITE_SAMPLES = {"site-1": 48, "site-2": 80}


class TinyClassifier(pl.LightningModule):
    """An MLP trained with momentum SGD and a step LR schedule (state that must survive fits)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(N_FEATURES, 16), nn.ReLU(), nn.Linear(16, N_CLASSES))
        # A private generator: sites' scripts and the server build models on concurrent threads.
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for param in self.parameters():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
        self.snapshots: dict[str, dict[str, torch.Tensor]] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)

    def _snapshot(self, moment: str) -> None:
        self.snapshots[moment] = {k: v.detach().clone() for k, v in self.state_dict().items()}

    def on_validation_start(self) -> None:
        if not self.trainer.sanity_checking and self.trainer.state.fn == "validate":
            self._snapshot("validate")

    def on_train_start(self) -> None:
        self._snapshot("train_start")
        optimizer = self.trainer.optimizers[0]
        self.snapshots["momentum_at_start"] = {
            str(i): state["momentum_buffer"].clone()
            for i, state in enumerate(optimizer.state.values())
            if state.get("momentum_buffer") is not None
        }
        self.snapshots["lr_at_start"] = {"lr": torch.tensor(optimizer.param_groups[0]["lr"])}

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val_loss", nn.functional.cross_entropy(logits, y))
        self.log("val_accuracy", (logits.argmax(dim=1) == y).float().mean())

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": scheduler}


def site_loaders(site: str) -> tuple[DataLoader[Any], DataLoader[Any]]:
    """Train/validation loaders for one site (a shared rule, site-specific samples)."""
    generator = torch.Generator().manual_seed(sum(map(ord, site)))
    n = SITE_SAMPLES.get(site, 64)
    features = torch.randn(n + 32, N_FEATURES, generator=generator)
    labels = (features[:, :N_CLASSES].argmax(dim=1)).long()
    train = TensorDataset(features[:n], labels[:n])
    validation = TensorDataset(features[n:], labels[n:])
    return (
        DataLoader(train, batch_size=BATCH_SIZE),
        DataLoader(validation, batch_size=BATCH_SIZE),
    )


def make_trainer(max_epochs: int = 2, **options: Any) -> pl.Trainer:
    """A quiet CPU trainer."""
    return pl.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        enable_checkpointing=False,
        **options,
    )
