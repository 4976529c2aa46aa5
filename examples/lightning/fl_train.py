"""The same Lightning training, federated: train.py plus four lines (marked ``# (n)``).

Written exactly like an NVIDIA FLARE Lightning Client-API script; only the import line names
fedcell. Each round, ``flare.patch`` loads the received global model into ``model`` when
``validate``/``fit`` start, and ``fit`` sends the trained weights back with the logged metrics.
"""

from __future__ import annotations

import lightning.pytorch as pl
from model import LitClassifier, SiteData

import fedcell.client as flare  # (1) for NVIDIA FLARE: import nvflare.client.lightning as flare

EPOCHS_PER_ROUND = 2


def main() -> None:
    pl.seed_everything(0)
    model = LitClassifier()
    trainer = pl.Trainer(max_epochs=EPOCHS_PER_ROUND, accelerator="auto", devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False)
    flare.patch(trainer)  # (2) also starts the Client API
    data = SiteData(site=flare.get_site_name())

    while flare.is_running():  # (3) one iteration per task: a round, or the final validation
        input_model = flare.receive()  # (4)
        print(f"{flare.get_site_name()}: task {flare.get_task_name()}, round {input_model.current_round}")
        trainer.validate(model, datamodule=data)  # scores the global model (sent with the result)
        trainer.fit(model, datamodule=data)  # trains from the global model, sends the result
        trainer.test(model, datamodule=data)  # the local model after this round


if __name__ == "__main__":
    main()
