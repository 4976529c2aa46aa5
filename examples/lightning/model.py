"""A LightningModule and a LightningDataModule with synthetic, site-dependent data (no downloads)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

N_FEATURES = 32
N_CLASSES = 4


class LitClassifier(pl.LightningModule):
    """A ~10k-parameter MLP trained with momentum SGD and a cosine learning-rate schedule."""

    def __init__(self, lr: float = 0.01) -> None:
        super().__init__()
        self.lr = lr
        self.layers = nn.Sequential(
            nn.Linear(N_FEATURES, 128), nn.ReLU(), nn.Linear(128, 48), nn.ReLU(), nn.Linear(48, N_CLASSES)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss

    def _evaluate(self, batch: Any, stage: str) -> None:
        x, y = batch
        logits = self(x)
        self.log(f"{stage}_loss", nn.functional.cross_entropy(logits, y))
        self.log(f"{stage}_accuracy", (logits.argmax(dim=1) == y).float().mean())

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=20)
        return {"optimizer": optimizer, "lr_scheduler": scheduler}


class SiteData(pl.LightningDataModule):
    """One site's data: class centres shared by every site, site-specific samples and shift."""

    def __init__(self, site: str = "site-1", n: int = 2048, batch_size: int = 64) -> None:
        super().__init__()
        self.site = site
        self.n = n
        self.batch_size = batch_size

    def setup(self, stage: str) -> None:
        centres = torch.randn(N_CLASSES, N_FEATURES, generator=torch.Generator().manual_seed(0)) * 0.6
        seed = sum(map(ord, self.site))  # stable across processes, unlike hash()
        generator = torch.Generator().manual_seed(seed)
        labels = torch.randint(0, N_CLASSES, (self.n,), generator=generator)
        features = centres[labels] + torch.randn(self.n, N_FEATURES, generator=generator) * 2.5
        features += 0.1 * (seed % 3)
        train, validation, test = int(0.7 * self.n), int(0.15 * self.n), self.n
        self.train_set = TensorDataset(features[:train], labels[:train])
        self.validation_set = TensorDataset(features[train : train + validation], labels[train : train + validation])
        self.test_set = TensorDataset(features[train + validation : test], labels[train + validation : test])
        self.shuffle = torch.Generator().manual_seed(seed)

    def train_dataloader(self) -> DataLoader[Any]:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, generator=self.shuffle)

    def val_dataloader(self) -> DataLoader[Any]:
        return DataLoader(self.validation_set, batch_size=256)

    def test_dataloader(self) -> DataLoader[Any]:
        return DataLoader(self.test_set, batch_size=256)
