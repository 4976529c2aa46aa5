"""Answers one task, then raises in the second round (user code fault: *failed*)."""

import fedcell.client as flare


def train_badly(round_number):
    raise ValueError(f"bad batch in round {round_number}")


flare.init()
while flare.is_running():
    model = flare.receive()
    if model.current_round >= 1:
        train_badly(model.current_round)
    flare.send(flare.FLModel(params=model.params))
