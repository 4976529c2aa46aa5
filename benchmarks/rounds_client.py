"""The rounds benchmark's site script: the peers' workload through fedcell's Client API."""

from __future__ import annotations

from peer_workload import RoundsMLP, site_batch, site_index_from_name, train_one_step

import fedcell.client as flare


def main() -> None:
    flare.init()
    batch = site_batch(site_index_from_name(flare.get_site_name()))
    model = RoundsMLP()
    while flare.is_running():
        received = flare.receive()
        model.load_state_dict(received.params)
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
