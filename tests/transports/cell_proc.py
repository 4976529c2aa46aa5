"""A cell in its own process, for the multi-process cell tests and the cell benchmark.

Usage::

    python cell_proc.py NAME [--listen URL] [--parent URL] [--heartbeat S] [--peer-timeout S]

Prints one line once started (the URL it listens on, or its name), answers ``echo`` requests
with ``{"payload", "pid", "route"}`` and ``sleep`` requests after ``payload`` seconds. Serves
until SIGTERM (a clean stop) or SIGKILL (the crash the tests simulate).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
from typing import Any

from fedcell.transports.cell import Cell, CellConfig
from fedcell.transports.message import Message


async def echo(message: Message) -> Any:
    return {"payload": message.payload, "pid": os.getpid(), "route": list(message.envelope.route)}


async def sleep(message: Message) -> None:
    await asyncio.sleep(float(message.payload))


async def serve(args: argparse.Namespace) -> None:
    config = CellConfig(heartbeat_interval=args.heartbeat, peer_timeout=args.peer_timeout)
    cell = Cell(args.name, listen=args.listen, parent=args.parent, config=config)
    cell.register("echo", echo)  # before start: a peer may call as soon as it sees us join
    cell.register("sleep", sleep)
    async with cell:
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        print(cell.url if args.listen else cell.name, flush=True)
        await stop.wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("name")
    parser.add_argument("--listen")
    parser.add_argument("--parent")
    parser.add_argument("--heartbeat", type=float, default=1.0)
    parser.add_argument("--peer-timeout", type=float, default=5.0)
    asyncio.run(serve(parser.parse_args()))
