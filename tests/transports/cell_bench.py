"""Cell latency benchmark: request/reply round trips and broadcast rounds, per transport.

Usage: ``python tests/transports/cell_bench.py [--quick] [--json]``

Measures, each after a warm-up:

- ``rtt``: one request/reply between a site and its server (``echo``, payload an int), with both
  cells on one event loop (inproc, tcp, ipc) and with the server in another process (tcp, ipc).
- ``relay``: the same from site-1 to site-2 through the server (one event loop).
- ``round``: the server broadcasts a tiny model (4 float32 arrays, 2.7 KiB) to 8 sites and
  collects the 8 replies: the message cost of one FedAvg round. Sites on the server's event
  loop (inproc, tcp, ipc), and 8 site processes over tcp (with the server → site-1 round trip).

Numbers are the median and the mean in microseconds (rounds in milliseconds).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import numpy as np

from fedcell.transports.cell import Cell
from fedcell.transports.message import Message

CELL_SCRIPT = Path(__file__).with_name("cell_proc.py")
TINY_MODEL = {
    "w1": np.ones((32, 16), np.float32),
    "b1": np.ones(16, np.float32),
    "w2": np.ones((16, 8), np.float32),
    "b2": np.ones(8, np.float32),
}


async def echo(message: Message) -> Any:
    return message.payload


async def timed(operation: Callable[[], Awaitable[Any]], repeat: int) -> list[float]:
    for _ in range(max(repeat // 10, 10)):
        await operation()
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        await operation()
        samples.append(time.perf_counter() - start)
    return samples


async def checked_round(server: Cell, names: list[str]) -> None:
    results = await server.broadcast(names, "echo", TINY_MODEL)
    failed = {name: r for name, r in results.items() if isinstance(r, BaseException)}
    if failed:
        raise RuntimeError(f"round failed: {failed}")


def summary(samples: list[float], scale: float) -> dict[str, float]:
    return {
        "median": round(statistics.median(samples) * scale, 1),
        "mean": round(statistics.fmean(samples) * scale, 1),
    }


async def in_one_loop(url: str, repeat: int) -> dict[str, dict[str, float]]:
    async with AsyncExitStack() as stack:
        server = await stack.enter_async_context(Cell("server", listen=url))
        sites = [
            await stack.enter_async_context(Cell(f"site-{i}", parent=server.url))
            for i in range(1, 9)
        ]
        for cell in (server, *sites):
            cell.register("echo", echo)
        names = [site.name for site in sites]
        rtt = await timed(lambda: sites[0].request("server", "echo", 1), repeat)
        relay = await timed(lambda: sites[0].request("site-2", "echo", 1), repeat)
        rounds = await timed(lambda: checked_round(server, names), repeat // 10)
    return {
        "rtt_us": summary(rtt, 1e6),
        "relay_us": summary(relay, 1e6),
        "round_8_sites_ms": summary(rounds, 1e3),
    }


def spawn(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(CELL_SCRIPT), *args], stdout=subprocess.PIPE, text=True
    )


def stop_all(procs: list[subprocess.Popen[str]]) -> None:
    for proc in procs:
        proc.terminate()
    for proc in procs:
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


async def server_in_process(url: str, repeat: int) -> dict[str, dict[str, float]]:
    proc = spawn("server", "--listen", url)
    assert proc.stdout is not None
    server_url = proc.stdout.readline().strip()  # printed once it listens
    try:
        async with Cell("site-1", parent=server_url) as site:
            rtt = await timed(lambda: site.request("server", "echo", 1), repeat)
    finally:
        stop_all([proc])
    return {"rtt_us": summary(rtt, 1e6)}


async def sites_in_processes(url: str, repeat: int) -> dict[str, dict[str, float]]:
    async with Cell("server", listen=url) as server:
        procs = [spawn(f"site-{i}", "--parent", server.url) for i in range(1, 9)]
        try:
            names = [f"site-{i}" for i in range(1, 9)]
            deadline = time.monotonic() + 30
            while len(server.peers) < 8:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"only {server.peers} joined within 30 s")
                await asyncio.sleep(0.05)

            rounds = await timed(lambda: checked_round(server, names), repeat // 10)
            rtt = await timed(lambda: server.request("site-1", "echo", 1), repeat)
        finally:
            stop_all(procs)
    return {"rtt_us": summary(rtt, 1e6), "round_8_sites_ms": summary(rounds, 1e3)}


async def main(quick: bool) -> dict[str, Any]:
    repeat = 500 if quick else 3000
    folder = tempfile.mkdtemp(prefix="fedcell-bench-")
    return {
        "inproc": await in_one_loop("inproc://bench", repeat),
        "tcp_one_loop": await in_one_loop("tcp://127.0.0.1:0", repeat),
        "ipc_one_loop": await in_one_loop(f"ipc://{folder}/one.sock", repeat),
        "tcp_server_process": await server_in_process("tcp://127.0.0.1:0", repeat),
        "ipc_server_process": await server_in_process(f"ipc://{folder}/proc.sock", repeat),
        "tcp_site_processes": await sites_in_processes("tcp://127.0.0.1:0", repeat),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (~10 s)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    results = asyncio.run(main(args.quick))
    if args.json:
        print(json.dumps(results))
    else:
        for setup, figures in results.items():
            for metric, values in figures.items():
                print(
                    f"{setup:20} {metric:18} median {values['median']:9.1f}  mean {values['mean']:9.1f}"
                )
