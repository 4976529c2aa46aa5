"""lightning: FedAvg over the Lightning script fl_train.py on simulated sites, with a final
validation of the global model at every site.

Run it:  python examples/lightning/job.py            (2 sites, threads)
    or:  fedcell simulate examples/lightning/job.py -n 4 --mode processes
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fedcell.controllers import FedAvg
from fedcell.engine.job import Job
from fedcell.executors.script_runner import ScriptRunner

HERE = Path(__file__).resolve().parent


def make_job(rounds: int = 5) -> Job:
    job = Job("lightning")
    job.add(FedAvg(rounds=rounds, model="model:LitClassifier", final_validation=True), name="train")
    job.add_executor(ScriptRunner(script="fl_train.py"), tasks=("train", "validate"))
    job.add_file(HERE / "fl_train.py")
    job.add_file(HERE / "model.py")
    return job


job = make_job()

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", "--n-clients", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    result = make_job(args.rounds).simulate(n_clients=args.n_clients, progress=True)
    print(f"job {result.job.state.value} in {result.job.duration:.1f} s; results in {result.workspace}")
    print("final validation:", result.job.output("train").meta.get("validation"))
