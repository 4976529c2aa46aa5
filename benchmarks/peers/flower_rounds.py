"""Run the rounds workload in Flower 1.42's simulation engine and print one result line.

Run with the Flower virtualenv's python (``benchmarks.peers.run_peer`` does)::

    ~/.cache/fedcell-peers/flower/bin/python benchmarks/peers/flower_rounds.py --sites 8

The app is written by hand (``flwr new`` needs the internet): a ``ClientApp`` whose ``train``
handler loads the global ``ArrayRecord``, runs one SGD step on the node's synthetic batch and
replies with its weights and ``num-examples``; a ``ServerApp`` that runs the Message-API
``FedAvg`` strategy over every node with client-side evaluation off (``fraction_evaluate=0``, as
in the NVIDIA FLARE job). Both run in Flower's simulation runtime (``run_simulation``: the
ServerApp in a thread of this process, the ClientApps in Ray actors, Flower's default backend
configuration). ``run_simulation`` is the in-process form of ``flwr run`` on a local simulation
federation: the same engine and strategy loop, without the detached local SuperLink, FAB build
and per-run app install that ``flwr run`` adds to start-up.

Offline and loopback: telemetry, the update check, Ray's usage stats and the run-time dependency
install are switched off, and ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` keeps Ray's listeners on
127.0.0.1; all are set before Flower or Ray is imported. ``HOME``, ``TMPDIR`` and ``RAY_TMPDIR``
(Ray's session files and sockets) point into a scratch folder, and this folder goes on
``PYTHONPATH`` so that Ray's actor processes import ``peer_workload``.

Timing. The strategy calls its ``evaluate_fn`` before round 1 and after every round's
aggregation, on the server side; each call records ``time.time()``, so the calls give the first
round's start and every round's end.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback
from importlib.metadata import version
from pathlib import Path

from peer_timing import format_result, summarize_rounds

PEERS_DIR = Path(__file__).resolve().parent

OFFLINE_ENVIRONMENT = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
}


def run(sites: int, rounds: int) -> tuple[float, list[float]]:
    """Run FedAvg in the simulation engine; return (first round start, [round ends])."""
    from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation
    from peer_workload import BATCH, RoundsMLP, site_batch, train_one_step

    evaluation_instants: list[float] = []
    client_app = ClientApp()
    server_app = ServerApp()

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        model = RoundsMLP()
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        loss = train_one_step(model, site_batch(int(context.node_config["partition-id"])))
        content = RecordDict({
            "arrays": ArrayRecord(model.state_dict()),
            "metrics": MetricRecord({"train_loss": loss, "num-examples": BATCH}),
        })
        return Message(content=content, reply_to=msg)

    def record_instant(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        evaluation_instants.append(time.time())
        return None

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = FedAvg(
            fraction_train=1.0,
            fraction_evaluate=0.0,
            min_train_nodes=sites,
            min_available_nodes=sites,
        )
        strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(RoundsMLP().state_dict()),
            num_rounds=rounds,
            evaluate_fn=record_instant,
        )

    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=sites)
    if len(evaluation_instants) != rounds + 1:
        raise RuntimeError(
            f"the strategy reached {len(evaluation_instants) - 1} of {rounds} round ends "
            "(see Flower's log above)"
        )
    return evaluation_instants[0], evaluation_instants[1:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Flower simulation on the rounds workload")
    parser.add_argument("--sites", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--launch-epoch", type=float, default=time.time(),
                        help="when the caller launched this process (default: now)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="scratch folder for HOME (default: a temp folder)")
    args = parser.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="fedcell-flower-"))
    for scratch in ("home", "tmp"):
        (workdir / scratch).mkdir(parents=True, exist_ok=True)
    os.environ["TMPDIR"] = str(workdir / "tmp")
    tempfile.tempdir = None  # the peer's own temporary files go to the scratch folder too
    os.environ.update(OFFLINE_ENVIRONMENT)
    os.environ["HOME"] = str(workdir / "home")
    os.environ["RAY_TMPDIR"] = str(workdir)
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(PEERS_DIR), os.environ.get("PYTHONPATH", "")) if p
    )
    base = {
        "peer": "flower", "sites": args.sites, "rounds": args.rounds,
        "peer_version": version("flwr"),
    }
    try:
        first_start, round_ends = run(args.sites, args.rounds)
        result = summarize_rounds(
            peer="flower", sites=args.sites, launch_epoch=args.launch_epoch,
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
