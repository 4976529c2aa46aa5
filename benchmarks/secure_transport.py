"""What CurveZMQ costs: throughput and request/reply latency, plaintext vs secured, same run.

Usage::

    python benchmarks/secure_transport.py [--size-mib 512] [--chunk-mib 4] [--requests 2000]

Both ends run in this process on one event loop over ``tcp://127.0.0.1`` (ZeroMQ's I/O thread
does the encryption, so it runs beside the loop). Throughput: ``size`` MiB sent as ``chunk``-MiB
messages through a ZmqTransport connection and received whole; best of three, GB/s (1e9 B/s).
Latency: a cell ``request`` to a server cell that echoes a small dict, median of ``requests``
round trips, in microseconds. The secured contender uses credentials from a freshly provisioned
project (startup kits), exactly as a deployment does.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import tempfile
import time
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


async def _latency(server: Cell, client: Cell, requests: int) -> float:
    async def echo(message: Message) -> object:
        return message.payload

    server.register("echo", echo)
    await server.start()
    try:
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
        print(
            f"throughput {args.size_mib} MiB in {args.chunk_mib} MiB messages: plaintext "
            f"{plain_gbs:.2f} GB/s, CurveZMQ {curve_gbs:.2f} GB/s ({curve_gbs / plain_gbs:.2f}x)"
        )
        config = CellConfig()
        url = f"tcp://127.0.0.1:{port}"
        plain_us = await _latency(
            Cell("server", listen=url, config=config),
            Cell("site-1", parent=url, config=config),
            args.requests,
        )
        curve_us = await _latency(
            server_kit.cell(config=config), site_kit.cell(config=config), args.requests
        )
        print(
            f"request/reply median over {args.requests}: plaintext {plain_us:.0f} us, "
            f"CurveZMQ {curve_us:.0f} us"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-mib", type=int, default=512)
    parser.add_argument("--chunk-mib", type=int, default=4)
    parser.add_argument("--requests", type=int, default=2000)
    asyncio.run(main(parser.parse_args()))
