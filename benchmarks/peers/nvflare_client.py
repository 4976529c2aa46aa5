"""NVIDIA FLARE client-API training script of the rounds workload (runs at every simulated site).

NVIDIA FLARE copies this file into the job and runs it at each site; ``peer_workload`` comes from
``PYTHONPATH``, set by ``nvflare_rounds.py``. Per round: receive the global model, one SGD step on
the site's synthetic batch, send the weights back with the step count FedAvg weighs them by.
"""

from __future__ import annotations

import nvflare.client as flare
from peer_workload import RoundsMLP, site_batch, site_index_from_name, train_one_step


def main() -> None:
    flare.init()
    batch = site_batch(site_index_from_name(flare.get_site_name()))
    model = RoundsMLP()
    while flare.is_running():
        global_model = flare.receive()
        model.load_state_dict(global_model.params)
        loss = train_one_step(model, batch)
        flare.send(
            flare.FLModel(
                params=model.state_dict(),
                metrics={"loss": loss},
                meta={"NUM_STEPS_CURRENT_ROUND": 1},
            )
        )


if __name__ == "__main__":
    main()
