"""Stream layer benchmark: fedcell streams through Cells vs raw pyzmq PUSH/PULL, same run.

Usage::

    python benchmarks/stream.py [--quick] [--json]     # the figures in docs/benchmarks.md
    python benchmarks/stream.py --sweep                 # chunk size x window x threshold

Every measurement runs the sender and the receiver in two separate processes, for fedcell and
for raw pyzmq alike, over ``tcp://127.0.0.1`` and ``ipc://``:

- **raw pyzmq**: a PUSH socket sends the payload as ``chunk_size`` messages without copying
  (``copy=False``, no tracking); the PULL side receives them without copying and keeps them
  (it holds the whole payload, as a receiver of a model must) — the cheapest way to move the
  bytes from one process into another with ZeroMQ.
- **fedcell**: ``Cell.request`` of a dict of float32 numpy arrays (64 MiB layers plus small
  biases) from ``site-1`` to ``server``; the server's handler gets the reassembled, verified
  message (chunks hashed, written into preallocated arrays, whole-stream digest checked) and
  replies. ``codec="none"``: this measures the transfer, not compression.

The cell processes apply ``fedcell.engine.memory.tune_allocator_for_streams()`` first, as
fedcell's own processes (daemons, job and site processes, the simulator) do; raw pyzmq runs with
glibc's defaults.

Time runs from the sender's ``send`` call to the receiver holding the last byte (for fedcell:
the handler being called with the verified message), on the monotonic clock, which Linux shares
between processes. Each process first moves one warm-up payload (at most 64 MiB); sizes up to
1 GiB are repeated and the median is kept. Peak RSS is each process's ``VmHWM`` after the
run (the receiver's includes the interpreter and imports: about 60 MiB).

Also measured: file-to-file streaming between two cell processes (peak RSS of both), and blosc2
on float32 weights rounded to bf16 precision (ratio and single-thread speed per 1 MiB chunk).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import resource
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
LAYER_BYTES = 64 * MiB
WARMUP_BYTES = 64 * MiB
DONE = b"done"
THREAD_GROUPS = ("main", "zmq-io", "other")


def peak_rss_mib() -> float:
    """This process's peak RSS (``VmHWM``; ``ru_maxrss`` would include the parent's size,
    which Linux carries over ``exec``)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def make_model(size: int) -> dict[str, np.ndarray]:
    """float32 layers of up to 64 MiB plus a 4 KiB bias per layer, ``size`` bytes in all."""
    model: dict[str, np.ndarray] = {}
    remaining = size
    index = 0
    while remaining > 0:
        bias = min(4 * KiB, remaining // 2) // 4 * 4
        layer = min(LAYER_BYTES, remaining - bias) // 4 * 4
        if layer <= 0:
            break
        model[f"layer{index}.weight"] = np.full(layer // 4, index, dtype=np.float32)
        if bias:
            model[f"layer{index}.bias"] = np.full(bias // 4, index, dtype=np.float32)
        remaining -= layer + bias
        index += 1
    return model


def cpu_seconds() -> float:
    """CPU time of this process, every thread included (ZeroMQ's I/O thread too)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def thread_cpu() -> dict[str, float]:
    """CPU seconds (user + system) of this process's live threads by kind: the main thread
    (the event loop, for cells), ZeroMQ's I/O thread, and the others (pyzmq's zero-copy
    garbage collector, executors)."""
    tick = os.sysconf("SC_CLK_TCK")
    groups = dict.fromkeys(THREAD_GROUPS, 0.0)
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                stat = f.read()
        except OSError:  # the thread ended meanwhile
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        group = "main" if int(tid) == os.getpid() else "zmq-io" if name.startswith("ZMQbg/IO") else "other"
        groups[group] += (int(fields[11]) + int(fields[12])) / tick
    return groups


def per_rep(marks: list[dict[str, float]]) -> list[dict[str, float]]:
    """Each repetition's CPU seconds per thread kind, from the marks taken after each one."""
    return [{g: round(b[g] - a[g], 3) for g in THREAD_GROUPS} for a, b in itertools.pairwise(marks)]


def emit(result: dict[str, Any]) -> None:
    print(json.dumps(result), flush=True)


# ----------------------------------------------------------------------------------------------
# child roles: raw pyzmq


def _bind(sock: Any, url: str) -> str:
    if url.endswith(":0"):
        host = url.rsplit(":", 1)[0]
        return f"{host}:{sock.bind_to_random_port(host)}"
    sock.bind(url)
    return url


def zmq_pull(spec: dict[str, Any]) -> None:
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.PULL)
    acks = ctx.socket(zmq.PUSH)  # tells the sender a payload arrived, so reps never overlap
    url = _bind(sock, spec["url"])
    ack_url = _bind(acks, spec["ack_url"])
    print(f"ready {url} {ack_url}", flush=True)
    durations: list[float] = []
    cpu: list[float] = []
    marks: list[dict[str, float]] = []
    while True:
        header = sock.recv()
        if header == DONE:
            break
        t0, chunks = struct.unpack("<dQ", header)
        frames = [sock.recv(copy=False) for _ in range(chunks)]
        durations.append(time.monotonic() - t0)
        cpu.append(cpu_seconds())
        marks.append(thread_cpu())
        del frames
        acks.send(b"ok")
    sock.close(linger=0)
    acks.close(linger=-1)
    ctx.term()
    emit({"durations": durations[1:], "cpu_s": cpu[-1] - cpu[0], "peak_rss_mib": peak_rss_mib(),
          "thread_reps": per_rep(marks)})  # fmt: skip


def zmq_push(spec: dict[str, Any]) -> None:
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    acks = ctx.socket(zmq.PULL)
    sock.connect(spec["url"])
    acks.connect(spec["ack_url"])
    chunk = spec["chunk_size"]
    payload = np.full(spec["size"] // 4, 1.0, dtype=np.float32)
    view = memoryview(payload).cast("B")
    cpu: list[float] = []
    marks: list[dict[str, float]] = []
    for rep in range(spec["reps"] + 1):
        size = min(view.nbytes, WARMUP_BYTES) if rep == 0 else view.nbytes
        chunks = -(-size // chunk)
        sock.send(struct.pack("<dQ", time.monotonic(), chunks))
        for i in range(chunks):
            sock.send(view[i * chunk : min((i + 1) * chunk, size)], copy=False)
        acks.recv()
        cpu.append(cpu_seconds())
        marks.append(thread_cpu())
    sock.send(DONE)
    sock.close(linger=-1)
    acks.close(linger=0)
    ctx.term()
    emit({"cpu_s": cpu[-1] - cpu[0], "peak_rss_mib": peak_rss_mib(), "thread_reps": per_rep(marks)})


# ----------------------------------------------------------------------------------------------
# child roles: fedcell cells


def cell_config(spec: dict[str, Any]) -> Any:
    from fedcell.transports.cell import CellConfig
    from fedcell.transports.stream import StreamConfig

    stream = StreamConfig(
        threshold=spec.get("threshold", StreamConfig().threshold),
        chunk_size=spec["chunk_size"],
        window=spec["window"],
        codec="none",
        stall_timeout=60.0,
    )
    return CellConfig(stream=stream, peer_timeout=60.0)


async def cell_recv(spec: dict[str, Any]) -> None:
    from fedcell.transports.cell import Cell
    from fedcell.transports.message import Message
    from fedcell.transports.stream import directory_sink

    stop = asyncio.Event()
    durations: list[float] = []
    cpu: list[float] = []
    marks: list[dict[str, float]] = []
    sink_dir = Path(spec["sink_dir"]) if spec.get("sink_dir") else None

    async def on_model(message: Message) -> float:
        elapsed = time.monotonic() - float(message.envelope.headers["t0"])  # type: ignore[arg-type]
        durations.append(elapsed)
        cpu.append(cpu_seconds())
        marks.append(thread_cpu())
        return elapsed

    async def on_file(message: Message) -> float:
        elapsed = time.monotonic() - float(message.envelope.headers.get("t0") or 0.0)
        Path(message.payload.path).unlink()
        return elapsed

    async def on_stop(message: Message) -> None:
        stop.set()

    file_sink = directory_sink(sink_dir) if sink_dir else None
    async with Cell("server", listen=spec["url"], config=cell_config(spec),
                    file_sink=file_sink) as server:  # fmt: skip
        server.register("model", on_model)
        server.register("file", on_file)
        server.register("stop", on_stop)
        print(f"ready {server.url}", flush=True)
        await stop.wait()
        stats = server.statistics().streams
    emit({
        "durations": durations[1:],
        "cpu_s": cpu[-1] - cpu[0] if cpu else 0.0,
        "peak_rss_mib": peak_rss_mib(),
        "streams_received": stats.streams_received,
        "peak_inbound_bytes_admitted": stats.peak_inbound_bytes_admitted,
        "thread_reps": per_rep(marks),
    })  # fmt: skip


async def cell_send(spec: dict[str, Any]) -> None:
    from fedcell.transports.cell import Cell

    model = make_model(spec["size"])
    warmup = model if spec["size"] <= WARMUP_BYTES else make_model(WARMUP_BYTES)
    cpu: list[float] = []
    marks: list[dict[str, float]] = []
    async with Cell("site-1", parent=spec["url"], config=cell_config(spec)) as site:
        for rep in range(spec["reps"] + 1):
            payload = warmup if rep == 0 else model
            await site.request("server", "model", payload, timeout=900,
                               headers={"t0": time.monotonic()})  # fmt: skip
            cpu.append(cpu_seconds())
            marks.append(thread_cpu())
        stats = site.statistics().streams
        await site.send("server", "stop")
    emit({"cpu_s": cpu[-1] - cpu[0], "peak_rss_mib": peak_rss_mib(),
          "peak_in_flight": stats.peak_in_flight, "thread_reps": per_rep(marks)})  # fmt: skip


async def file_send(spec: dict[str, Any]) -> None:
    from fedcell.transports.cell import Cell

    size = spec["size"]
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "checkpoint.bin"
        with source.open("wb") as f:  # sparse, with real data at both ends and across 4 GiB
            f.truncate(size)
            for offset in (0, min(2**32, size - MiB), size - MiB):
                f.seek(offset)
                f.write(os.urandom(MiB))
        async with Cell("site-1", parent=spec["url"], config=cell_config(spec)) as site:
            started = time.monotonic()
            await site.send_file("server", source, channel="file")
            seconds = time.monotonic() - started
            await site.send("server", "stop")
    emit({"peak_rss_mib": peak_rss_mib(), "seconds": seconds})


def as_fedcell_process(role: Callable[[dict[str, Any]], Any]) -> Callable[[dict[str, Any]], Any]:
    """Run a cell role as fedcell's own processes run: with their allocator settings."""

    def run(spec: dict[str, Any]) -> None:
        from fedcell.engine.memory import tune_allocator_for_streams

        tune_allocator_for_streams()
        asyncio.run(role(spec))

    return run


ROLES: dict[str, Callable[[dict[str, Any]], Any]] = {
    "zmq-pull": zmq_pull,
    "zmq-push": zmq_push,
    "cell-recv": as_fedcell_process(cell_recv),
    "cell-send": as_fedcell_process(cell_send),
    "file-send": as_fedcell_process(file_send),
}


# ----------------------------------------------------------------------------------------------
# orchestration


def spawn(role: str, spec: dict[str, Any]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, __file__, "--role", role, "--spec", json.dumps(spec)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip


def finish(proc: subprocess.Popen[str], timeout: float) -> dict[str, Any]:
    out, _ = proc.communicate(timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark child failed ({proc.returncode}): {out[-2000:]}")
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def run_pair(receiver: str, sender: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Start the receiver, then the sender at the URL it reports; return both results."""
    print(f"... {receiver} <- {sender} {spec['url'][:6]} {spec['size'] // MiB} MiB",
          file=sys.stderr, flush=True)  # fmt: skip
    recv = spawn(receiver, spec)
    assert recv.stdout is not None
    ready = recv.stdout.readline().split()
    if len(ready) < 2 or ready[0] != "ready":
        recv.kill()
        raise RuntimeError(f"{receiver} did not start: {ready}")
    urls = {"url": ready[1]} | ({"ack_url": ready[2]} if len(ready) > 2 else {})
    send = spawn(sender, {**spec, **urls})
    timeout = 120 + spec["size"] * (spec.get("reps", 1) + 1) / (50 * MiB)
    sent = finish(send, timeout)
    received = finish(recv, timeout)
    return {"sender": sent, "receiver": received}


_urls = iter(range(1_000_000))


def listen_url(transport: str) -> str:
    if transport == "tcp":
        return "tcp://127.0.0.1:0"
    return f"ipc://{tempfile.gettempdir()}/fcbench-{os.getpid()}-{next(_urls)}.sock"


def throughput(size: int, durations: list[float]) -> float:
    return size / statistics.median(durations) / 1e9


def transfer(transport: str, size: int, reps: int, chunk: int, window: int) -> dict[str, Any]:
    base = {"size": size, "reps": reps, "chunk_size": chunk, "window": window}
    raw = run_pair("zmq-pull", "zmq-push",
                   {**base, "url": listen_url(transport), "ack_url": listen_url(transport)})  # fmt: skip
    cell = run_pair("cell-recv", "cell-send", {**base, "url": listen_url(transport)})
    zmq_gbps = throughput(size, raw["receiver"]["durations"])
    cell_gbps = throughput(size, cell["receiver"]["durations"])
    return {
        "transport": transport,
        "payload_mib": size / MiB,
        "zmq_gbps": round(zmq_gbps, 3),
        "fedcell_gbps": round(cell_gbps, 3),
        "ratio_vs_zmq": round(cell_gbps / zmq_gbps, 3),
        # Every repetition's seconds (the median is taken): raw pyzmq alternates between runs
        # at ~0.23 s/GiB and ~0.45 s/GiB on the project's VM, which decides the ratio.
        "zmq_rep_s": [round(d, 3) for d in raw["receiver"]["durations"]],
        "fedcell_rep_s": [round(d, 3) for d in cell["receiver"]["durations"]],
        "zmq_recv_peak_rss_mib": round(raw["receiver"]["peak_rss_mib"], 1),
        "send_peak_rss_mib": round(cell["sender"]["peak_rss_mib"], 1),
        "recv_peak_rss_mib": round(cell["receiver"]["peak_rss_mib"], 1),
        "peak_in_flight_mib": cell["sender"]["peak_in_flight"] / MiB,
        # CPU seconds per GiB moved (all threads), sender + receiver: robust to a busy machine.
        "zmq_cpu_s_per_gib": round(cpu_per_gib(raw, size, reps), 3),
        "fedcell_cpu_s_per_gib": round(cpu_per_gib(cell, size, reps), 3),
        # Per thread kind and side, the median repetition after the first (the first one also
        # pays the page faults of memory the receiver has not used yet).
        "zmq_steady_threads_s_per_gib": steady_threads(raw, size),
        "fedcell_steady_threads_s_per_gib": steady_threads(cell, size),
    }


def steady_threads(pair: dict[str, Any], size: int) -> dict[str, dict[str, float]]:
    """CPU seconds per GiB of each side's thread kinds: the median over the repetitions after
    the first (the only one if there is one)."""
    out: dict[str, dict[str, float]] = {}
    for side in ("sender", "receiver"):
        reps = pair[side]["thread_reps"]
        steady = reps[1:] or reps
        out[side] = {
            group: round(statistics.median(r[group] for r in steady) / (size / GiB), 3)
            for group in THREAD_GROUPS
        }
    return out


def cpu_per_gib(pair: dict[str, Any], size: int, reps: int) -> float:
    cpu = pair["sender"]["cpu_s"] + pair["receiver"]["cpu_s"]
    return cpu / (size * reps / GiB)


def file_stream(size: int, chunk: int, window: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as sink_dir:
        spec = {"size": size, "chunk_size": chunk, "window": window, "sink_dir": sink_dir,
                "url": listen_url("tcp")}  # fmt: skip
        result = run_pair("cell-recv", "file-send", spec)
    return {
        "file_mib": size / MiB,
        "seconds": round(result["sender"]["seconds"], 2),
        "send_peak_rss_mib": round(result["sender"]["peak_rss_mib"], 1),
        "recv_peak_rss_mib": round(result["receiver"]["peak_rss_mib"], 1),
    }


def blosc2_bf16(total: int, chunk: int) -> dict[str, Any]:
    from fedcell.transports import compression

    weights = np.random.default_rng(0).standard_normal(total // 4).astype(np.float32)
    rounded = (weights.view(np.uint32) & 0xFFFF0000).view(np.float32)
    view = memoryview(rounded).cast("B")
    out: dict[str, Any] = {}
    for name in ("blosc2-lz4", "blosc2-zstd"):
        codec = compression.get_codec(name)
        packed_bytes = 0
        compress_s = decompress_s = 0.0
        scratch = memoryview(bytearray(chunk))
        for start in range(0, view.nbytes, chunk):
            piece = view[start : start + chunk]
            began = time.perf_counter()
            packed = codec.compress(piece, 4)
            middle = time.perf_counter()
            codec.decompress_into(packed, scratch[: piece.nbytes])
            decompress_s += time.perf_counter() - middle
            compress_s += middle - began
            packed_bytes += memoryview(packed).nbytes
        out[name] = {
            "ratio": round(view.nbytes / packed_bytes, 3),
            "compress_gbps": round(view.nbytes / compress_s / 1e9, 2),
            "decompress_gbps": round(view.nbytes / decompress_s / 1e9, 2),
        }
    return out


async def auto_codec_on_loopback(size: int) -> dict[str, Any]:
    """What ``codec="auto"`` (defaults) picks for bf16-precision weights over tcp loopback:
    the first stream goes by the hint (1 Gbit/s), the next ones by the link measured from acks."""
    from fedcell.transports.cell import Cell

    weights = np.random.default_rng(0).standard_normal(size // 4).astype(np.float32)
    model = {"w": (weights.view(np.uint32) & 0xFFFF0000).view(np.float32)}
    choices: list[str] = []

    async def echo(message: Any) -> None:
        return None

    async with Cell("server", listen="tcp://127.0.0.1:0") as server:
        server.register("model", echo)
        async with Cell("site-1", parent=server.url) as site:
            for _ in range(3):
                before = dict(site.statistics().streams.codec_choices)
                await site.request("server", "model", model, timeout=300)
                after = site.statistics().streams.codec_choices
                choices.extend(name for name in after if after[name] != before.get(name, 0))
    return {"choices": choices}


def sweep(rounds: int = 3) -> None:
    """Chunk size x window, then the stream threshold; configurations interleaved over
    ``rounds`` rounds so that a busy spell on the machine does not favour one of them."""
    size = 256 * MiB
    configs = [(chunk, window) for chunk in (256 * KiB, 1 * MiB, 4 * MiB)
               for window in (4 * MiB, 16 * MiB, 64 * MiB) if window >= 2 * chunk]  # fmt: skip
    print(f"chunk x window, {size // MiB} MiB through cells, 2 reps x {rounds} rounds: "
          "best GB/s, median CPU s per GiB (sender + receiver, all threads)")  # fmt: skip
    for transport in ("tcp", "ipc"):
        gbps: dict[Any, list[float]] = {}
        cpu: dict[Any, list[float]] = {}
        for _ in range(rounds):
            raw_spec = {"size": size, "reps": 2, "chunk_size": MiB, "window": 0,
                        "url": listen_url(transport), "ack_url": listen_url(transport)}  # fmt: skip
            raw = run_pair("zmq-pull", "zmq-push", raw_spec)
            gbps.setdefault("zmq", []).append(throughput(size, raw["receiver"]["durations"]))
            cpu.setdefault("zmq", []).append(cpu_per_gib(raw, size, 2))
            for chunk, window in configs:
                spec = {"size": size, "reps": 2, "chunk_size": chunk, "window": window,
                        "url": listen_url(transport)}  # fmt: skip
                result = run_pair("cell-recv", "cell-send", spec)
                key = (chunk, window)
                gbps.setdefault(key, []).append(throughput(size, result["receiver"]["durations"]))
                cpu.setdefault(key, []).append(cpu_per_gib(result, size, 2))
        for key in gbps:
            label = "raw pyzmq, 1 MiB messages" if key == "zmq" else (
                f"chunk {key[0] // KiB:>5} KiB window {key[1] // MiB:>3} MiB")
            print(f"  {transport} {label}: {max(gbps[key]):.2f} GB/s "
                  f"{statistics.median(cpu[key]):.2f} CPU s/GiB", flush=True)  # fmt: skip
    print(f"threshold: request round trip of one array over tcp, streamed vs one piece "
          f"(median ms of 20 x {rounds} rounds)")  # fmt: skip
    for size in (256 * KiB, 1 * MiB, 4 * MiB, 16 * MiB):
        times: dict[str, list[float]] = {"streamed": [], "one piece": []}
        for _ in range(rounds):
            for label, threshold in (("streamed", 0), ("one piece", 1 << 40)):
                spec = {"size": size, "reps": 20, "chunk_size": MiB, "window": 16 * MiB,
                        "threshold": threshold, "url": listen_url("tcp")}  # fmt: skip
                result = run_pair("cell-recv", "cell-send", spec)
                times[label].extend(result["receiver"]["durations"])
        print(f"  {size // KiB:>6} KiB: " + ", ".join(
            f"{label} {statistics.median(t) * 1e3:.2f} ms" for label, t in times.items()),
            flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="64 MiB payloads only (< 1 min)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--sweep", action="store_true", help="chunk/window/threshold sweep")
    parser.add_argument("--role", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        ROLES[args.role](json.loads(args.spec))
        return
    if args.sweep:
        sweep()
        return
    from fedcell.transports.stream import StreamConfig

    defaults = StreamConfig()
    chunk, window = defaults.chunk_size, defaults.window
    sizes = [(64 * MiB, 3)] if args.quick else [(64 * MiB, 5), (1 * GiB, 5), (4 * GiB, 1)]
    started = time.monotonic()
    rows = [
        transfer(transport, size, reps, chunk, window)
        for transport in ("tcp", "ipc")
        for size, reps in sizes
    ]
    files = file_stream(256 * MiB if args.quick else 4 * GiB + 512 * MiB, chunk, window)
    blosc = blosc2_bf16(32 * MiB if args.quick else 256 * MiB, chunk)
    auto = asyncio.run(auto_codec_on_loopback(64 * MiB))
    reference = next(r for r in rows if r["payload_mib"] == sizes[min(1, len(sizes) - 1)][0] / MiB
                     and r["transport"] == "tcp")  # fmt: skip
    summary = {
        "tcp_ratio_vs_zmq": reference["ratio_vs_zmq"],
        "ipc_ratio_vs_zmq": next(
            r["ratio_vs_zmq"] for r in rows
            if r["transport"] == "ipc" and r["payload_mib"] == reference["payload_mib"]
        ),
        "payload_mib": reference["payload_mib"],
        "recv_peak_rss_mib": reference["recv_peak_rss_mib"],
        "send_peak_rss_mib": reference["send_peak_rss_mib"],
        "file_stream_peak_rss_mib": max(files["send_peak_rss_mib"], files["recv_peak_rss_mib"]),
        "blosc2_ratio_bf16": blosc["blosc2-lz4"]["ratio"],
        "chunk_size_mib": chunk / MiB,
        "window_mib": window / MiB,
        "transfers": rows,
        "file_stream": files,
        "blosc2_bf16": blosc,
        "auto_codec_tcp_loopback": auto,
        "seconds": round(time.monotonic() - started, 1),
    }  # fmt: skip
    if args.json:
        print(json.dumps(summary))
        return
    print(f"stream throughput, sender and receiver in separate processes "
          f"(chunk {chunk // KiB} KiB, window {window // MiB} MiB, codec none)")  # fmt: skip
    print(f"{'transport':>9} {'MiB':>6} {'zmq GB/s':>9} {'fedcell GB/s':>13} {'ratio':>6} "
          f"{'send RSS':>9} {'recv RSS':>9} {'zmq recv RSS':>13}")  # fmt: skip
    for r in rows:
        print(f"{r['transport']:>9} {r['payload_mib']:>6.0f} {r['zmq_gbps']:>9.2f} "
              f"{r['fedcell_gbps']:>13.2f} {r['ratio_vs_zmq']:>6.2f} {r['send_peak_rss_mib']:>9.0f} "
              f"{r['recv_peak_rss_mib']:>9.0f} {r['zmq_recv_peak_rss_mib']:>13.0f}")  # fmt: skip
    print("steady-state CPU s/GiB per thread (median repetition after the first), "
          "receiver main / zmq-io / other | sender main / zmq-io / other:")
    for r in rows:
        for who in ("zmq", "fedcell"):
            t = r[f"{who}_steady_threads_s_per_gib"]
            cells = " | ".join(" / ".join(f"{t[side][g]:.2f}" for g in THREAD_GROUPS)
                               for side in ("receiver", "sender"))  # fmt: skip
            print(f"  {r['transport']} {r['payload_mib']:>6.0f} MiB {who:>7}: {cells}")
    print(f"file to file over tcp, {files['file_mib']:.0f} MiB in {files['seconds']} s: peak RSS "
          f"sender {files['send_peak_rss_mib']:.0f} MiB, receiver {files['recv_peak_rss_mib']:.0f} MiB")  # fmt: skip
    for name, b in blosc.items():
        print(f"{name} on float32 weights at bf16 precision: ratio {b['ratio']}, compress "
              f"{b['compress_gbps']} GB/s, decompress {b['decompress_gbps']} GB/s")  # fmt: skip
    print(f"codec=auto on tcp loopback, 3 x 64 MiB of bf16-precision weights: {auto['choices']}")
    print(f"({summary['seconds']} s)")


if __name__ == "__main__":
    main()
