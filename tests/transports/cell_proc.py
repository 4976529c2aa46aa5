"""A server cell in its own process, for the multi-process cell tests.

Usage: ``python cell_server_proc.py URL [HEARTBEAT_INTERVAL PEER_TIMEOUT]``. Prints the URL it
listens on (one line) once ready, answers ``echo`` requests with the payload and its process id,
and serves until SIGTERM (clean stop) or SIGKILL (the crash the tests simulate).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from typing import Any

from fedcell.transports.cell import Cell, CellConfig
from fedcell.transports.message import Message


async def echo(message: Message) -> Any:
    return {"payload": message.payload, "pid": os.getpid(), "route": list(message.envelope.route)}


async def serve(url: str, config: CellConfig) -> None:
    async with Cell("server", listen=url, config=config) as cell:
        cell.register("echo", echo)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        print(cell.url, flush=True)
        await stop.wait()


if __name__ == "__main__":
    interval, timeout = (float(v) for v in sys.argv[2:4]) if len(sys.argv) > 3 else (1.0, 5.0)
    asyncio.run(serve(sys.argv[1], CellConfig(heartbeat_interval=interval, peer_timeout=timeout)))
