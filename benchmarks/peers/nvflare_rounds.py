"""Run the rounds workload in NVIDIA FLARE 2.9's simulator and print one result line.

Run with the NVIDIA FLARE virtualenv's python (``benchmarks.peers.run_peer`` does)::

    ~/.cache/fedcell-peers/nvflare/bin/python benchmarks/peers/nvflare_rounds.py --sites 2

The job is the 2.9 recipe path: ``FedAvgRecipe`` (PyTorch) with the model given by class path
(``{"class_path": "peer_workload.RoundsMLP", "args": {}}``, which saves a model copy in the job
process), the client-API script ``nvflare_client.py`` at each site, run by ``SimEnv`` and
``recipe.execute``. ``HOME``, ``TMPDIR`` and the simulator workspace point into a scratch folder,
so that no ``~/.nvflare`` setting leaks in or out and nothing is left behind.

Timing. NVIDIA FLARE's FedAvg controller logs ``Round <r> started.`` at each round start and
``Finished FedAvg.`` after the last one, with millisecond timestamps, in the server's JSON log
(``server/log.json``, one record a line; the text log splits these messages over lines). The
end of round ``r`` is the start of round ``r + 1`` (the end of the run for the last round); the
controller saves the 10k-parameter model in between, a negligible cost.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import sys
import tempfile
import time
import traceback
from importlib.metadata import version
from pathlib import Path

from peer_timing import format_result, summarize_rounds

PEERS_DIR = Path(__file__).resolve().parent
ROUND_STARTED = re.compile(r"Round (\d+) started\.")
FEDAVG_FINISHED = "Finished FedAvg."
CONTROLLER_LOGGER = "FedAvg"
JOB_NAME = "fedcell_rounds"


def _log_epoch(stamp: str) -> float:
    """Epoch seconds of a logging ``asctime`` stamp (local time, ``,mmm`` milliseconds)."""
    return datetime.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def read_round_instants(server_log: Path, rounds: int) -> tuple[float, list[float]]:
    """Return ``(first round start, [round ends])`` from the FedAvg controller's server log.

    Raises
    ------
    ValueError
        If the log does not show every round start and the end of FedAvg.
    """
    starts: dict[int, float] = {}
    finished: float | None = None
    for line in server_log.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
            logger, message, stamp = record["name"], str(record["message"]), record["asctime"]
        except (ValueError, KeyError, TypeError):
            continue
        if logger != CONTROLLER_LOGGER:
            continue
        started = ROUND_STARTED.search(message)
        if started:
            starts[int(started.group(1))] = _log_epoch(stamp)
        elif FEDAVG_FINISHED in message:
            finished = _log_epoch(stamp)
    if sorted(starts) != list(range(rounds)) or finished is None:
        raise ValueError(
            f"{server_log} shows round starts {sorted(starts)} and FedAvg "
            f"{'finished' if finished is not None else 'unfinished'}; expected {rounds} rounds"
        )
    return starts[0], [starts[r] for r in range(1, rounds)] + [finished]


def run(sites: int, rounds: int, workdir: Path) -> tuple[float, list[float]]:
    """Run the FedAvg job in the simulator; return the round instants from the server log."""
    from nvflare.app_opt.pt.recipes.fedavg import FedAvgRecipe
    from nvflare.recipe import SimEnv

    recipe = FedAvgRecipe(
        name=JOB_NAME,
        model={"class_path": "peer_workload.RoundsMLP", "args": {}},
        min_clients=sites,
        num_rounds=rounds,
        train_script=str(PEERS_DIR / "nvflare_client.py"),
    )
    workspace_root = workdir / "simulation"
    env = SimEnv(num_clients=sites, workspace_root=str(workspace_root))
    recipe.execute(env)
    server_logs = sorted((workspace_root / JOB_NAME / "server").rglob("log.json"))
    if not server_logs:
        raise FileNotFoundError(f"no server log.json under {workspace_root / JOB_NAME / 'server'}")
    return read_round_instants(server_logs[0], rounds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="NVIDIA FLARE simulator on the rounds workload")
    parser.add_argument("--sites", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--launch-epoch", type=float, default=time.time(),
                        help="when the caller launched this process (default: now)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="scratch folder for HOME and the workspace (default: a temp folder)")
    args = parser.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="fedcell-nvflare-"))
    for scratch in ("home", "tmp"):
        (workdir / scratch).mkdir(parents=True, exist_ok=True)
    os.environ["TMPDIR"] = str(workdir / "tmp")
    tempfile.tempdir = None  # the peer's own temporary files go to the scratch folder too
    os.environ["HOME"] = str(workdir / "home")
    os.environ.pop("NVFLARE_SIMULATOR_WORKSPACE_ROOT", None)
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(PEERS_DIR), os.environ.get("PYTHONPATH", "")) if p
    )
    base = {
        "peer": "nvflare", "sites": args.sites, "rounds": args.rounds,
        "peer_version": version("nvflare"),
    }
    try:
        first_start, round_ends = run(args.sites, args.rounds, workdir)
        result = summarize_rounds(
            peer="nvflare", sites=args.sites, launch_epoch=args.launch_epoch,
            first_round_start_epoch=first_start, round_end_epochs=round_ends,
        )
    except Exception as exc:  # the caller gets the error in the result line, not a traceback
        traceback.print_exc()
        print(format_result({**base, "error": f"{type(exc).__name__}: {exc}"}), flush=True)
        return 1
    print(format_result({**result, **base}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
