"""FedAvg of a large model with sites as real processes over TCP: seconds per round and memory.

One run per site count (2, then 4 and 8), each in a fresh child process that runs the job in the
simulator's ``processes`` mode over ``tcp://127.0.0.1`` (server in the child, one process per
site). Measured:

- ``round_s_<n>``: median seconds per round (FedAvg's own round timing, rounds after the first
  one included — the first round also starts the sites' interpreters);
- ``tree_peak_rss_mib_<n>``: peak of the summed RSS of the whole process tree (server + sites),
  sampled every 20 ms with psutil;
- ``server_peak_rss_mib_<n>``: the server process's own peak RSS (``VmHWM``).

    python benchmarks/large_model.py [--model-mib 1024] [--sites 2 4 8] [--rounds 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

HERE = Path(__file__).resolve().parent
RESULT_PREFIX = "FEDCELL_LARGE_RESULT "


def peak_rss_mib() -> float:
    """This process's peak RSS (``VmHWM``; ``ru_maxrss`` would include the parent's size,
    which Linux carries over ``exec``)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def child(sites: int, rounds: int) -> None:
    sys.path.insert(0, str(HERE))
    from large_model_workload import train

    from fedcell.controllers import FedAvg
    from fedcell.engine.job import Job
    from fedcell.executors.numpy_executor import NumpyExecutor

    job = Job("large-model")
    job.add(FedAvg(rounds=rounds, model="large_model_workload:make_params"), name="train")
    job.add_executor(NumpyExecutor(train=train), tasks=("train",))
    with tempfile.TemporaryDirectory(prefix="fedcell-large-") as workspace:
        started = time.perf_counter()
        result = job.simulate(sites, mode="processes", transport="tcp", workspace=workspace)
        wall = time.perf_counter() - started
    out: dict[str, Any] = {
        "sites": sites,
        "ok": result.ok,
        "wall_s": wall,
        "server_peak_rss_mib": peak_rss_mib(),
    }
    if result.ok:
        out["round_seconds"] = [r["seconds"] for r in result.job.output("train").meta["history"]]
    else:
        out["error"] = str(result.job.reason)
    print(RESULT_PREFIX + json.dumps(out), flush=True)


def _tree_rss(root: psutil.Process) -> int:
    total = 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            continue
    return total


def run(sites: int, rounds: int, model_mib: int) -> dict[str, Any]:
    env = {**os.environ, "FEDCELL_BENCH_MODEL_MIB": str(model_mib), "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, __file__, "--child", "--sites", str(sites), "--rounds", str(rounds)]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        root = psutil.Process(process.pid)
        while not stop.is_set():
            try:
                peak = max(peak, _tree_rss(root))
            except psutil.Error:
                return
            stop.wait(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = process.communicate(timeout=1800)
    stop.set()
    sampler.join()
    lines = [line for line in out.splitlines() if line.startswith(RESULT_PREFIX)]
    if not lines:
        return {"sites": sites, "error": f"no result (exit {process.returncode}): {err[-2000:]}"}
    result = json.loads(lines[-1][len(RESULT_PREFIX) :])
    result["tree_peak_rss_mib"] = peak / 2**20
    if "round_seconds" in result:
        result["round_s"] = statistics.median(result["round_seconds"])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-mib", type=int, default=1024)
    parser.add_argument("--sites", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.sites[0], args.rounds)
        return
    report: dict[str, Any] = {"model_mib": args.model_mib, "rounds": args.rounds}
    runs = [run(n, args.rounds, args.model_mib) for n in args.sites]
    for r in runs:
        n = r["sites"]
        for key in ("round_s", "tree_peak_rss_mib", "server_peak_rss_mib"):
            report[f"{key}_{n}"] = r.get(key)
        if "error" in r:
            report.setdefault("errors", {})[str(n)] = r["error"]
    if args.json:
        print(json.dumps(report))
        return
    print(
        f"FedAvg of a {args.model_mib} MiB float32 model, sites as processes over tcp, {args.rounds} rounds"
    )
    print(f"{'sites':>6}{'s/round':>10}{'tree peak MiB':>16}{'server peak MiB':>18}")
    for r in runs:
        if "error" in r:
            print(f"{r['sites']:>6}  error: {r['error'][:300]}")
        else:
            print(
                f"{r['sites']:>6}{r['round_s']:>10.2f}{r['tree_peak_rss_mib']:>16.0f}{r['server_peak_rss_mib']:>18.0f}"
            )


if __name__ == "__main__":
    main()
