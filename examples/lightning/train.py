"""Centralized Lightning training: the script before federation (compare with fl_train.py)."""

from __future__ import annotations

import lightning.pytorch as pl
from model import LitClassifier, SiteData

EPOCHS = 10


def main() -> None:
    pl.seed_everything(0)
    model = LitClassifier()
    trainer = pl.Trainer(max_epochs=EPOCHS, accelerator="auto", devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False)
    data = SiteData(site="site-1")

    trainer.validate(model, datamodule=data)
    trainer.fit(model, datamodule=data)
    trainer.test(model, datamodule=data)


if __name__ == "__main__":
    main()
