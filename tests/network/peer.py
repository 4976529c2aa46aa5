"""A cell process driven over stdin/stdout, for the network tests and ``benchmarks/network.py``.

Run inside a namespace (``ip netns exec NS python peer.py ...``)::

    python peer.py server --listen tcp://10.77.0.1:7000 [--codec C] [--stall-timeout S]
    python peer.py site --parent tcp://10.77.0.1:7000 [--codec C] [--stall-timeout S]

Both print one line once started: ``ready URL`` (server) or ``ready`` (site).

The server answers ``model`` requests with ``{"digest", "bytes", "elapsed", "peak_rss_mib"}``:
the xxh3_128 of the payload's arrays in key order, computed from what the handler was given (the
stream layer's reassembled, verified message), the seconds since the sender's ``t0`` header (one
monotonic clock per machine, namespaces included), and its peak RSS so far (``VmHWM``). A
``stop`` message ends it; it then prints one JSON line: its peak RSS, the digests its handler was
given (a stream that failed must not appear there) and its stream statistics.

The site reads one command per line and answers each with one JSON line:

``send MIB SEED CONTENT``
    Build a model of ``MIB`` MiB of float32 arrays (64 MiB layers; ``CONTENT`` ``random``:
    uniform values, ``bf16``: normal values rounded to bf16 precision, whose low 16 bits are
    zero), request ``model`` with it and answer ``{"ok": true, "digest", "reply", "seconds",
    "codec"}`` (``codec``: what the stream layer chose) or ``{"ok": false, "error_types" (the
    exception's class names, most derived first), "error", "seconds"}``.
``wait-parent``
    Wait until the link to the server is up (again) and answer ``{"ok": true, "seconds"}``.
``quit``
    Tell the server to stop, answer with the site's stream statistics and exit.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
import time
from typing import Any

import numpy as np
import xxhash

from fedcell.errors import FedcellError
from fedcell.transports.cell import Cell, CellConfig
from fedcell.transports.message import Message
from fedcell.transports.stream import StreamConfig

MiB = 1024 * 1024
LAYER_BYTES = 64 * MiB


def peak_rss_mib() -> float:
    """This process's peak RSS (``VmHWM``)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def digest(model: dict[str, np.ndarray]) -> str:
    """xxh3_128 of the arrays' bytes in key order."""
    hasher = xxhash.xxh3_128()
    for name in sorted(model):
        hasher.update(np.ascontiguousarray(model[name]).view(np.uint8).data)
    return hasher.hexdigest()


def make_model(mib: int, seed: int, content: str) -> dict[str, np.ndarray]:
    """``mib`` MiB of float32 layers of at most 64 MiB."""
    rng = np.random.default_rng(seed)
    model: dict[str, np.ndarray] = {}
    remaining = mib * MiB
    while remaining > 0:
        count = min(LAYER_BYTES, remaining) // 4
        if content == "random":
            layer = rng.random(count, dtype=np.float32)
        elif content == "bf16":
            normal = rng.standard_normal(count, dtype=np.float32)
            layer = (normal.view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32)
        else:
            raise ValueError(f"unknown content {content!r}")
        model[f"layer{len(model)}.weight"] = layer
        remaining -= count * 4
    return model


def config(args: argparse.Namespace) -> CellConfig:
    stream = StreamConfig(codec=args.codec, stall_timeout=args.stall_timeout)
    return CellConfig(stream=stream)


def emit(result: dict[str, Any]) -> None:
    print(json.dumps(result), flush=True)


async def serve(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    delivered: list[str] = []

    async def on_model(message: Message) -> dict[str, Any]:
        elapsed = time.monotonic() - float(message.envelope.headers["t0"])  # type: ignore[arg-type]
        model = message.payload
        delivered.append(digest(model))
        return {
            "digest": delivered[-1],
            "bytes": sum(array.nbytes for array in model.values()),
            "elapsed": elapsed,
            "peak_rss_mib": peak_rss_mib(),
        }

    async def on_stop(message: Message) -> None:
        stop.set()

    async with Cell("server", listen=args.listen, config=config(args)) as server:
        server.register("model", on_model)
        server.register("stop", on_stop)
        print(f"ready {server.url}", flush=True)
        await stop.wait()
        stats = server.statistics().streams
    emit({"peak_rss_mib": peak_rss_mib(), "delivered": delivered,
          "streams": dataclasses.asdict(stats)})  # fmt: skip


async def send(site: Cell, mib: int, seed: int, content: str) -> dict[str, Any]:
    model = make_model(mib, seed, content)
    sent_digest = digest(model)
    before = dict(site.statistics().streams.codec_choices)
    started = time.monotonic()
    try:
        reply = await site.request("server", "model", model, timeout=600,
                                   headers={"t0": started})  # fmt: skip
    except FedcellError as exc:
        return {"ok": False, "error_types": [cls.__name__ for cls in type(exc).__mro__],
                "error": str(exc), "seconds": time.monotonic() - started}  # fmt: skip
    seconds = time.monotonic() - started
    after = site.statistics().streams.codec_choices
    codec = [name for name in after if after[name] != before.get(name, 0)]
    return {"ok": True, "digest": sent_digest, "reply": reply, "seconds": seconds,
            "codec": codec[0] if codec else None}  # fmt: skip


async def wait_parent(site: Cell) -> dict[str, Any]:
    started = time.monotonic()
    while site.parent is None:
        await asyncio.sleep(0.01)
    return {"ok": True, "seconds": time.monotonic() - started}


async def run_site(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    async with Cell("site-1", parent=args.parent, config=config(args)) as site:
        print("ready", flush=True)
        while True:
            line = (await loop.run_in_executor(None, sys.stdin.readline)).split()
            if not line or line[0] == "quit":
                break
            if line == ["wait-parent"]:
                emit(await wait_parent(site))
                continue
            if line[0] != "send" or len(line) != 4:
                emit({"ok": False, "error_types": ["ValueError"], "error": f"bad command {line}"})
                continue
            emit(await send(site, int(line[1]), int(line[2]), line[3]))
        stats = site.statistics().streams
        await site.send("server", "stop")
    emit({"streams": dataclasses.asdict(stats)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("role", choices=("server", "site"))
    parser.add_argument("--listen", default="tcp://127.0.0.1:0")
    parser.add_argument("--parent")
    parser.add_argument("--codec", default="auto")
    parser.add_argument("--stall-timeout", type=float, default=30.0)
    args = parser.parse_args()
    asyncio.run(serve(args) if args.role == "server" else run_site(args))


if __name__ == "__main__":
    main()
