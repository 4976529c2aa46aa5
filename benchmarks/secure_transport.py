"""What CurveZMQ costs: throughput and request/reply latency, plaintext vs secured, same run.

Usage::

    python benchmarks/secure_transport.py [--size-mib 512] [--chunk-mib 4] [--requests 2000]

Throughput: ``size`` MiB sent as ``chunk``-MiB messages through a ZmqTransport connection over
``tcp://127.0.0.1`` and received whole; best of three, GB/s (1e9 B/s). Measured twice: with both
ends in this process on one event loop (one ZeroMQ I/O thread encrypts *and* decrypts), and with
the receiver in a child process (each end's I/O thread does its half, as in a deployment); there
the time runs until the receiver acknowledges the last byte.
Latency: a cell ``request`` to a server cell that echoes a small dict, median of ``requests``
round trips, in microseconds. The secured contender uses credentials from a freshly provisioned
project (startup kits), exactly as a deployment does.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from fedcell.deploy.kit import StartupKit
from fedcell.deploy.project import parse_project
from fedcell.deploy.provision import provision
from fedcell.transports.base import TransportOptions
from fedcell.transports.cell import Cell, CellConfig
from fedcell.transports.message import Message
from fedcell.transports.zmq_transport import ZmqTransport

MiB = 1024 * 1024


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def _throughput(
    server: TransportOptions, client: TransportOptions, size: int, chunk: int
) -> float:
    listener = await ZmqTransport(server).listen("tcp://127.0.0.1:0")
    conn = await ZmqTransport(client).connect(listener.url)
    payload = np.ones(chunk, dtype=np.uint8)
    best = float("inf")
    try:
        await conn.send([b"warm-up"])
        peer = await listener.accept()
        await peer.recv()
        for _ in range(3):
            start = time.perf_counter()

            async def receive() -> None:
                got = 0
                while got < size:
                    frames = await peer.recv()
                    got += memoryview(frames[0]).nbytes

            reader = asyncio.create_task(receive())
            for _ in range(size // chunk):
                await conn.send([payload])
            await reader
            best = min(best, time.perf_counter() - start)
    finally:
        await conn.close()
        await listener.close()
    return size / best / 1e9


async def _receive_in_child(kit: str, port: int, size: int) -> None:
    """The child process: listen (secured when ``kit`` is given), receive, acknowledge."""
    options = TransportOptions(security=StartupKit.load(kit).transport_security()) if kit else None
    listener = await ZmqTransport(options).listen(f"tcp://127.0.0.1:{port}")
    print("listening", flush=True)
    peer = await listener.accept()
    await peer.recv()  # warm-up
    for _ in range(3):
        got = 0
        while got < size:
            got += memoryview((await peer.recv())[0]).nbytes
        await peer.send([b"done"])
    await peer.recv()  # the sender's goodbye: it has read every acknowledgement
    await listener.close()


async def _throughput_two_processes(
    server_kit: str, client: TransportOptions, size: int, chunk: int
) -> float:
    port = _free_port()
    child = subprocess.Popen(
        [sys.executable, __file__, "--receive", server_kit, str(port), str(size)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None and child.stdout.readline().strip() == "listening"
    conn = await ZmqTransport(client).connect(f"tcp://127.0.0.1:{port}")
    payload = np.ones(chunk, dtype=np.uint8)
    best = float("inf")
    try:
        await conn.send([b"warm-up"])
        for _ in range(3):
            start = time.perf_counter()
            for _ in range(size // chunk):
                await conn.send([payload])
            assert await conn.recv() == [b"done"]
            best = min(best, time.perf_counter() - start)
        await conn.send([b"bye"])
    finally:
        await conn.close()
        child.wait(timeout=60)
    return size / best / 1e9


async def _latency(server: Cell, make_client: Callable[[], Cell], requests: int) -> float:
    async def echo(message: Message) -> object:
        return message.payload

    server.register("echo", echo)
    await server.start()
    try:
        client = make_client()  # after the server started: it may need the server's URL
        await client.start()
        samples = []
        for i in range(requests):
            start = time.perf_counter()
            await client.request("server", "echo", {"i": i}, timeout=10)
            samples.append(time.perf_counter() - start)
        await client.stop()
    finally:
        await server.stop()
    return statistics.median(samples) * 1e6


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as folder:
        workspace = Path(folder)
        port = _free_port()
        tree = {
            "project": "bench",
            "server": {"host": "127.0.0.1", "port": port, "listen_host": "127.0.0.1"},
            "sites": ["site-1"],
        }
        provision(parse_project(tree), workspace)
        server_kit = StartupKit.load(workspace / "kits" / "server")
        site_kit = StartupKit.load(workspace / "kits" / "site-1")
        secured_server = TransportOptions(security=server_kit.transport_security())
        secured_site = TransportOptions(security=site_kit.transport_security())
        size, chunk = args.size_mib * MiB, args.chunk_mib * MiB
        plain_gbs = await _throughput(TransportOptions(), TransportOptions(), size, chunk)
        curve_gbs = await _throughput(secured_server, secured_site, size, chunk)
        print(f"throughput, one process, {args.size_mib} MiB in {args.chunk_mib} MiB messages: "
              f"plaintext {plain_gbs:.2f} GB/s, CurveZMQ {curve_gbs:.2f} GB/s "
              f"({curve_gbs / plain_gbs:.2f}x)")  # fmt: skip
        server_folder = str(workspace / "kits" / "server")
        plain_gbs = await _throughput_two_processes("", TransportOptions(), size, chunk)
        curve_gbs = await _throughput_two_processes(server_folder, secured_site, size, chunk)
        print(f"throughput, two processes: plaintext {plain_gbs:.2f} GB/s, CurveZMQ "
              f"{curve_gbs:.2f} GB/s ({curve_gbs / plain_gbs:.2f}x)")  # fmt: skip
        config = CellConfig()
        plain_server = Cell("server", listen="tcp://127.0.0.1:0", config=config)
        plain_us = await _latency(plain_server, lambda: Cell("site-1", parent=plain_server.url,
                                                             config=config), args.requests)  # fmt: skip
        curve_us = await _latency(
            server_kit.cell(config=config), lambda: site_kit.cell(config=config), args.requests
        )
        print(f"request/reply median over {args.requests}: plaintext {plain_us:.0f} us, "
              f"CurveZMQ {curve_us:.0f} us")  # fmt: skip


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-mib", type=int, default=512)
    parser.add_argument("--chunk-mib", type=int, default=4)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--receive", nargs=3, metavar=("KIT", "PORT", "BYTES"), help="(internal)")
    parsed = parser.parse_args()
    if parsed.receive:
        kit, port, size = parsed.receive
        asyncio.run(_receive_in_child(kit, int(port), int(size)))
    else:
        asyncio.run(main(parsed))
