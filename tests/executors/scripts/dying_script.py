"""Answers one task, then its process dies from a signal (*crashed*). Process mode only."""

import os
import signal

import fedcell.client as flare

flare.init()
model = flare.receive()
flare.send(flare.FLModel(params=model.params))
flare.receive()
os.kill(os.getpid(), signal.SIGKILL)
