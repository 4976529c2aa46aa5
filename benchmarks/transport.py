"""Transport benchmark: ZmqTransport connections vs raw pyzmq PUSH/PULL, same bytes, same run.

Usage::

    python benchmarks/transport.py [--size-mib 1024] [--chunk-mib 4] [--reps 3]

The sender and the receiver are two processes, for both contenders, over ``tcp://127.0.0.1``
and ``ipc://``. The payload is a numpy buffer sent as ``chunk`` messages:

- **raw pyzmq**: PUSH ``send(view, copy=False)`` without tracking; PULL ``recv(copy=False)``
  keeping every frame (a receiver of a model holds it all).
- **raw multipart**: DEALER/ROUTER sending ``[tag, data]``, the ZmqTransport wire format, so
  the cost of multipart messages shows apart from the transport's own.
- **fedcell**: ``ZmqConnection.send([view])`` on a client connection, zero-copy; the listener's
  connection ``recv()`` keeping every frame. ``--payload readonly`` (default) sends read-only
  views, as the stream layer should; ``--payload writable`` sends writable ones, for which
  ``send`` waits until ZeroMQ released the buffer (so the caller may reuse it).

Time runs from the sender's first send to the receiver holding the last byte (the monotonic
clock is shared between processes on Linux); the receiver acknowledges each transfer before the
next starts, the same way for both contenders. One 64 MiB warm-up, then ``reps`` timed transfers
per process pair; the contenders alternate ``rounds`` times so that load from elsewhere hits both.
Reported: median and best in GB/s (1e9 bytes per second), and each median over raw PUSH/PULL's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np
import zmq

MiB = 1024 * 1024
PAYLOAD = "readonly"
WARMUP_BYTES = 64 * MiB


def _chunks(view: memoryview, size: int, chunk: int) -> list[memoryview]:
    return [view[i : min(i + chunk, size)] for i in range(0, size, chunk)]


def _ack_url(url: str) -> str:
    return "tcp://127.0.0.1:0" if url.startswith("tcp://") else f"{url}.ack"


def raw_pull(url: str, sizes: list[int], chunk: int) -> list[float]:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PULL)
    acks = ctx.socket(zmq.PUSH)  # per transfer, as the fedcell receiver replies on its connection
    sock.bind(url)
    acks.bind(_ack_url(url))
    endpoints = [sock.get_string(zmq.LAST_ENDPOINT), acks.get_string(zmq.LAST_ENDPOINT)]
    print(json.dumps({"url": " ".join(endpoints)}), flush=True)
    durations = []
    for size in sizes:
        t0 = struct.unpack("<d", sock.recv())[0]
        frames = [sock.recv(copy=False) for _ in range(-(-size // chunk))]
        durations.append(time.monotonic() - t0)
        del frames
        acks.send(b"ok")
    sock.close(linger=0)
    acks.close(linger=-1)
    ctx.term()
    return durations


def raw_push(urls: str, sizes: list[int], chunk: int) -> None:
    url, ack_url = urls.split(" ")
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    acks = ctx.socket(zmq.PULL)
    sock.connect(url)
    acks.connect(ack_url)
    view = memoryview(np.ones(max(sizes), dtype=np.uint8))
    for size in sizes:
        sock.send(struct.pack("<d", time.monotonic()))
        for part in _chunks(view, size, chunk):
            sock.send(part, copy=False)
        acks.recv()
    sock.close(linger=-1)
    acks.close(linger=0)
    ctx.term()


def multipart_pull(url: str, sizes: list[int], chunk: int) -> list[float]:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.bind(url)
    print(json.dumps({"url": sock.get_string(zmq.LAST_ENDPOINT)}), flush=True)
    durations = []
    for size in sizes:
        identity, _, header = sock.recv_multipart()
        t0 = struct.unpack("<d", header)[0]
        frames = [sock.recv_multipart(copy=False) for _ in range(-(-size // chunk))]
        durations.append(time.monotonic() - t0)
        del frames
        sock.send_multipart([identity, b"ok"])
    sock.close(linger=-1)
    ctx.term()
    return durations


def multipart_push(url: str, sizes: list[int], chunk: int) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(url)
    view = memoryview(np.ones(max(sizes), dtype=np.uint8))
    for size in sizes:
        sock.send_multipart([b"\x01", struct.pack("<d", time.monotonic())])
        for part in _chunks(view, size, chunk):
            sock.send_multipart([b"\x01", part], copy=False)
        sock.recv()
    sock.close(linger=-1)
    ctx.term()


async def fedcell_pull(url: str, sizes: list[int], chunk: int) -> list[float]:
    from fedcell.transports.zmq_transport import ZmqTransport

    listener = await ZmqTransport().listen(url)
    print(json.dumps({"url": listener.url}), flush=True)
    conn = await listener.accept()
    durations = []
    for size in sizes:
        t0 = struct.unpack("<d", (await conn.recv())[0])[0]
        frames = [await conn.recv() for _ in range(-(-size // chunk))]
        durations.append(time.monotonic() - t0)
        del frames
        await conn.send([b"ok"])
    await listener.close()
    return durations


async def fedcell_push(url: str, sizes: list[int], chunk: int) -> None:
    from fedcell.transports.zmq_transport import ZmqTransport

    conn = await ZmqTransport().connect(url)
    view = memoryview(np.ones(max(sizes), dtype=np.uint8))
    if PAYLOAD == "readonly":
        view = view.toreadonly()  # the promise not to change it: no wait for ZeroMQ's release
    for size in sizes:
        await conn.send([struct.pack("<d", time.monotonic())])
        for part in _chunks(view, size, chunk):
            await conn.send([part])
        await conn.recv()  # the receiver holds the payload (closing earlier drops queued data)
    await conn.close()


def child(role: str, url: str, sizes: list[int], chunk: int) -> None:
    if role == "raw_pull":
        print(json.dumps({"durations": raw_pull(url, sizes, chunk)}), flush=True)
    elif role == "raw_push":
        raw_push(url, sizes, chunk)
    elif role == "multipart_pull":
        print(json.dumps({"durations": multipart_pull(url, sizes, chunk)}), flush=True)
    elif role == "multipart_push":
        multipart_push(url, sizes, chunk)
    elif role == "fedcell_pull":
        durations = asyncio.run(fedcell_pull(url, sizes, chunk))
        print(json.dumps({"durations": durations}), flush=True)
    else:
        asyncio.run(fedcell_push(url, sizes, chunk))


def measure(contender: str, url: str, sizes: list[int], chunk: int, payload: str) -> list[float]:
    args = [json.dumps(sizes), str(chunk), payload]
    receiver = subprocess.Popen(
        [sys.executable, __file__, "--child", f"{contender}_pull", url, *args],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert receiver.stdout is not None
    bound = json.loads(receiver.stdout.readline())["url"]
    subprocess.run(
        [sys.executable, __file__, "--child", f"{contender}_push", bound, *args], check=True
    )
    result: dict[str, Any] = json.loads(receiver.stdout.readline())
    receiver.wait()
    return [sizes[-1] / duration / 1e9 for duration in result["durations"][1:]]


CONTENDERS = {
    "raw": "raw pyzmq PUSH/PULL, one frame",
    "multipart": "raw pyzmq DEALER/ROUTER, [tag, data]",
    "fedcell": "ZmqTransport",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--chunk-mib", type=int, default=4)
    parser.add_argument("--reps", type=int, default=3, help="timed transfers per process pair")
    parser.add_argument("--rounds", type=int, default=2, help="alternations of the contenders")
    parser.add_argument(
        "--payload",
        choices=("writable", "readonly"),
        default="readonly",
        help="writable: send waits until ZeroMQ released the buffer; readonly: it does not",
    )
    parser.add_argument("--schemes", nargs="+", choices=("tcp", "ipc"), default=["tcp", "ipc"])
    parser.add_argument("--child", nargs=5, metavar=("ROLE", "URL", "SIZES", "CHUNK", "PAYLOAD"))
    options = parser.parse_args()
    if options.child:
        global PAYLOAD
        role, url, sizes, chunk, PAYLOAD = options.child
        child(role, url, json.loads(sizes), int(chunk))
        return
    size, chunk = options.size_mib * MiB, options.chunk_mib * MiB
    sizes = [min(size, WARMUP_BYTES)] + [size] * options.reps
    with tempfile.TemporaryDirectory() as tmp:
        urls = {"tcp": "tcp://127.0.0.1:0", "ipc": f"ipc://{tmp}/bench.sock"}
        for url in (urls[scheme] for scheme in options.schemes):
            rates: dict[str, list[float]] = {name: [] for name in CONTENDERS}
            for _ in range(options.rounds):  # alternate, so load from elsewhere hits all
                for name in CONTENDERS:
                    rates[name] += measure(name, url, sizes, chunk, options.payload)
            raw = statistics.median(rates["raw"])
            print(
                f"{url.partition(':')[0]}: {options.size_mib} MiB in {options.chunk_mib} MiB messages"
            )
            for name, label in CONTENDERS.items():
                median = statistics.median(rates[name])
                print(
                    f"  {label:<38} {median:5.2f} GB/s median, {max(rates[name]):5.2f} best "
                    f"of {len(rates[name])}; {median / raw:.2f}x raw"
                )


if __name__ == "__main__":
    main()
