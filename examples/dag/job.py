"""A DAG job: two FedAvg branches with different learning rates run in parallel, a custom node
keeps the better global model, and cross-site evaluation scores it at every site.

        ┌── lr_0_1  (FedAvg) ──┐
    ────┤                      ├── best (KeepBetter) ── cross_site (CrossSiteEval)
        └── lr_0_01 (FedAvg) ──┘

Each branch sends its own task name, answered at every site by its own copy of the training
script configured with that branch's learning rate. ``cross_site`` evaluates the kept model and
each site's local-only model (trained on that site's data alone, the baseline to beat) at every
site: a model × site accuracy matrix, printed and saved in the results folder.

Run it:  python examples/dag/job.py   or   fedcell simulate examples/dag/job.py -n 3
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
HELLO = HERE.parent / "hello-pytorch"
CYCLIC = HERE.parent / "cyclic"  # fl_train_eval.py: answers validate and submit_model too
sys.path[:0] = [str(HERE), str(HELLO)]  # keep_better.py; model.py (the initial model)

from keep_better import KeepBetter  # noqa: E402
from rich.console import Console  # noqa: E402

from fedcell.controllers import CrossSiteEval, FedAvg  # noqa: E402
from fedcell.controllers.cross_site_eval import matrix_table  # noqa: E402
from fedcell.engine.job import Job  # noqa: E402
from fedcell.executors.script_runner import ScriptRunner  # noqa: E402

LEARNING_RATES = {"lr_0_1": 0.1, "lr_0_01": 0.01}


def make_job(rounds: int = 3) -> Job:
    job = Job("dag-pick-lr")
    for branch, lr in LEARNING_RATES.items():
        task = f"train-{branch}"
        job.add(FedAvg(rounds=rounds, model="model:Net", train_task=task), name=branch)
        job.add_executor(ScriptRunner(script="fl_train.py", train_task=task, config={"lr": lr}),
                         tasks=(task,))
    job.add(KeepBetter(metric="accuracy"), name="best", after=list(LEARNING_RATES))
    job.add(CrossSiteEval(models="both", metric="accuracy"), name="cross_site", after=["best"])
    job.add_executor(ScriptRunner(script="fl_train_eval.py"), tasks=("validate", "submit_model"))
    job.add_file(HELLO / "fl_train.py")
    job.add_file(HELLO / "model.py")
    job.add_file(CYCLIC / "fl_train_eval.py")
    return job


job = make_job()

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", "--n-clients", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    result = make_job(args.rounds).simulate(n_clients=args.n_clients, progress=True)
    best = result.job.output("best")
    print(f"kept {best.meta['chosen']} with accuracy {best.metrics['accuracy']:.3f}; "
          f"results in {result.workspace}")
    Console().print(matrix_table(result.job.output("cross_site"), "accuracy"))
