"""Cyclic weight transfer, then cross-site evaluation of the result and of each site's model.

    cyclic (Cyclic: one model visits site-1 → site-2 → … each lap) ──▶ cross_site (CrossSiteEval)

The server never averages: each site trains the model the previous site produced. A site that
drops is skipped and the next one gets the last good model. Every site then evaluates the final
model and every site's own model on its test data (a model × site accuracy matrix, printed and
saved as ``nodes/cross_site/cross_site_eval.json`` in the results folder).

Run it:  python examples/cyclic/job.py [-n 3] [--rounds 3] [--shuffle] [--mode processes]
    or:  fedcell simulate examples/cyclic/job.py -n 3
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
HELLO = HERE.parent / "hello-pytorch"
sys.path.insert(0, str(HELLO))  # model.py (the initial model)

from rich.console import Console  # noqa: E402

from fedcell.controllers import CrossSiteEval, Cyclic  # noqa: E402
from fedcell.controllers.cross_site_eval import matrix_table  # noqa: E402
from fedcell.engine.job import Job  # noqa: E402
from fedcell.executors.script_runner import ScriptRunner  # noqa: E402


def make_job(rounds: int = 3, shuffle: bool = False) -> Job:
    job = Job("cyclic")
    job.add(Cyclic(rounds=rounds, order="shuffle" if shuffle else "fixed", model="model:Net"),
            name="cyclic")
    job.add(CrossSiteEval(models="both", metric="accuracy"), name="cross_site", after=["cyclic"])
    job.add_executor(ScriptRunner(script="fl_train_eval.py"))  # train, validate, submit_model
    job.add_file(HERE / "fl_train_eval.py")
    job.add_file(HELLO / "model.py")
    return job


job = make_job()

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", "--n-clients", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--shuffle", action="store_true", help="a seeded new order every lap")
    parser.add_argument("--mode", choices=("threads", "processes"), default="threads")
    args = parser.parse_args()
    result = make_job(args.rounds, args.shuffle).simulate(
        n_clients=args.n_clients, mode=args.mode, progress=True
    )
    result.job.raise_for_state()
    final = result.job.output("cyclic")
    print(f"cyclic: {len(final.meta['history'])} hops, final accuracy at the last site "
          f"{final.metrics['accuracy']:.3f}; results in {result.workspace}")
    Console().print(matrix_table(result.job.output("cross_site"), "accuracy"))
