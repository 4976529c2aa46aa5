"""FedAvg round time: fedcell vs NVIDIA FLARE and Flower on the same workload, in one run.

Workload (shared with the peers, ``benchmarks/peers/peer_workload.py``): FedAvg of a
10,504-parameter MLP, synthetic data made at each site, one SGD step per round, written as a
Client API script (``rounds_client.py``) — the path a user converting a script takes.

Figures (same definitions as the peers', ``benchmarks/peers/peer_timing.py``):

- ``round_s_*``: steady-state seconds per round, the median of rounds after the first 2, from
  round-end instants taken on the server;
- ``first_round_end_s``: process launch → end of round 1, start-up and imports included.

Each fedcell configuration runs in a fresh child process (``--child``) so start-up is measured
and runs do not share memory. Peers run from their own virtualenvs (``benchmarks/peers``);
``--no-peers`` skips them. ``--json`` prints one JSON object.

    python benchmarks/rounds.py [--rounds 20] [--sites 2 8 64] [--no-peers] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE / "peers")]

from peers.peer_timing import RESULT_PREFIX, parse_result, summarize_rounds  # noqa: E402


def child(sites: int, rounds: int, mode: str, launch_epoch: float) -> None:
    """Run one fedcell configuration and print the peers' result line."""
    from fedcell.controllers import FedAvg
    from fedcell.engine.job import Job
    from fedcell.engine.progress import ProgressEvent
    from fedcell.executors.script_runner import ScriptRunner

    round_ends: list[float] = []

    def on_progress(event: ProgressEvent) -> None:
        round_ends.append(time.time())

    job = Job("rounds-bench")
    job.add(FedAvg(rounds=rounds, model="peer_workload:RoundsMLP"), name="train")
    job.add_executor(ScriptRunner(script="rounds_client.py"), tasks=("train",))
    job.add_file(HERE / "rounds_client.py")
    job.add_file(HERE / "peers" / "peer_workload.py")
    with tempfile.TemporaryDirectory(prefix="fedcell-rounds-") as workspace:
        result = job.simulate(sites, mode=mode, workspace=workspace, progress=on_progress)
    if not result.ok:
        print(
            RESULT_PREFIX
            + json.dumps(
                {
                    "peer": "fedcell",
                    "sites": sites,
                    "rounds": rounds,
                    "error": str(result.job.reason),
                }
            )
        )
        return
    history = result.job.output("train").meta["history"]
    first_start = round_ends[0] - history[0]["seconds"]
    summary = summarize_rounds(
        peer="fedcell",
        sites=sites,
        launch_epoch=launch_epoch,
        first_round_start_epoch=first_start,
        round_end_epochs=round_ends,
    )
    summary["mode"] = mode
    print(RESULT_PREFIX + json.dumps(summary))


def run_fedcell(sites: int, rounds: int, mode: str) -> dict[str, Any]:
    launch = time.time()
    command = [
        sys.executable,
        __file__,
        "--child",
        "--sites",
        str(sites),
        "--rounds",
        str(rounds),
        "--mode",
        mode,
        "--launch-epoch",
        repr(launch),
    ]
    done = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        return parse_result(done.stdout)
    except ValueError as exc:
        return {"peer": "fedcell", "sites": sites, "error": f"{exc}; stderr: {done.stderr[-2000:]}"}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--sites", type=int, nargs="+", default=[2, 8, 64])
    parser.add_argument("--peer-sites", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--peer-rounds", type=int, default=10)
    parser.add_argument("--no-peers", action="store_true")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="threads", help=argparse.SUPPRESS)
    parser.add_argument("--launch-epoch", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.sites[0], args.rounds, args.mode, args.launch_epoch)
        return

    runs: list[dict[str, Any]] = []
    report: dict[str, Any] = {"rounds": args.rounds}
    for n in args.sites:
        run = run_fedcell(n, args.rounds, "threads")
        runs.append(run)
        report[f"round_s_sim_{n}"] = run.get("round_s")
        if n == 2:
            report["first_round_end_s"] = run.get("first_round_end_s")
    procs = run_fedcell(2, args.rounds, "processes")
    runs.append(procs)
    report["round_s_procs_2"] = procs.get("round_s")
    report["first_round_end_s_procs_2"] = procs.get("first_round_end_s")
    if not args.no_peers:
        from peers import run_peer

        for peer in ("nvflare", "flower"):
            for n in args.peer_sites:
                run = run_peer(peer, n, rounds=args.peer_rounds, timeout=900)
                runs.append(run)
                report[f"{peer}_round_s_sim_{n}"] = run.get("round_s")
                report[f"{peer}_first_round_end_s_{n}"] = run.get("first_round_end_s")
                if run.get("round_s") and report.get(f"round_s_sim_{n}"):
                    report[f"speedup_vs_{peer}_sim_{n}"] = (
                        run["round_s"] / report[f"round_s_sim_{n}"]
                    )
    report["errors"] = {
        f"{r.get('peer')}-{r.get('sites')}": r["error"] for r in runs if "error" in r
    }
    if args.json:
        print(json.dumps(report))
        return
    print(f"{'configuration':<32}{'s/round':>12}{'launch→round 1 (s)':>22}")
    for run in runs:
        label = f"{run.get('peer')} {run.get('mode', 'sim')} {run.get('sites')} sites"
        if "error" in run:
            print(f"{label:<32}  error: {run['error'][:200]}")
        else:
            print(f"{label:<32}{run['round_s']:>12.4f}{run['first_round_end_s']:>22.2f}")
    for key, value in report.items():
        if key.startswith("speedup"):
            print(f"{key}: {value:.0f}x")


if __name__ == "__main__":
    main()
