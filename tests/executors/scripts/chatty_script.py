"""Writes output the way real training scripts do: prints, a progress bar redrawn with \\r,
stderr, a log handler created on its own thread, and a last line without a newline."""

import logging
import sys

import fedcell.client as flare

flare.init()
handler = logging.StreamHandler()  # holds whatever sys.stderr is now
logging.getLogger("chatty").addHandler(handler)
print("hello from the script")
sys.stdout.write("\r10%\r50%\r100%\n")
sys.stdout.flush()
print("something went sideways", file=sys.stderr)
logging.getLogger("chatty").warning("logged by the script")
while flare.is_running():
    model = flare.receive()
    flare.send(flare.FLModel(params=model.params))
logging.getLogger("chatty").removeHandler(handler)
sys.stdout.write("last words without a newline")
