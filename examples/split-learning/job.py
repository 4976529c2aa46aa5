"""split-learning: a network cut in two between a data site (features, bottom half) and a label
site (labels, top half), compared with the same network trained centrally.

Run it:  python examples/split-learning/job.py                 (threads)
    or:  python examples/split-learning/job.py --mode processes
    or:  fedcell simulate examples/split-learning/job.py -n 2
"""

from __future__ import annotations

import argparse

import split_net
import vertical_data

from fedcell.controllers.split_learning import SplitLearning
from fedcell.engine.job import Job
from fedcell.executors.split_learning import SplitDataExecutor, SplitLabelExecutor


def make_job(epochs: int = 3, batch_size: int = 64, lr: float = 0.3) -> Job:
    job = Job("split-learning", min_sites=2)
    job.add(
        SplitLearning(
            data_site="site-1", label_site="site-2", epochs=epochs, batch_size=batch_size
        ),
        name="split",
    )
    optimizer_args = {"lr": lr}
    job.add_executor(
        SplitDataExecutor(
            model=split_net.bottom,
            features=vertical_data.features,
            optimizer_args=optimizer_args,
            save_as="bottom.pt",
        ),
        sites=["site-1"],
    )
    job.add_executor(
        SplitLabelExecutor(
            model=split_net.top,
            labels=vertical_data.labels,
            optimizer_args=optimizer_args,
            save_as="top.pt",
        ),
        sites=["site-2"],
    )
    return job


job = make_job()

if __name__ == "__main__":
    from centralized_baseline import train_centralized

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--mode", choices=["threads", "processes"], default="threads")
    args = parser.parse_args()
    result = make_job(args.epochs).simulate(n_clients=2, mode=args.mode)
    if not result.ok:
        raise SystemExit(f"job {result.job.state.value}: {result.job.reason}")
    output = result.job.output("split")
    central_accuracy, _ = train_centralized(args.epochs)
    print(
        f"split learning: accuracy {output.metrics['accuracy']:.4f}, "
        f"{output.meta['ms_per_batch']:.2f} ms/batch, bytes/batch sent {output.meta['bytes_per_batch']}"
    )
    print(f"centralized:    accuracy {central_accuracy:.4f}")
    print(f"results in {result.workspace}")
