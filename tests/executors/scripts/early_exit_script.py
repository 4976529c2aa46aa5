"""Answers one task, then leaves its loop without being told to (*crashed* for the next task)."""

import fedcell.client as flare

flare.init()
model = flare.receive()
flare.send(flare.FLModel(params=model.params))
print("leaving after one round")
