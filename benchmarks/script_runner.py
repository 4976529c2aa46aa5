"""ScriptRunner overhead: the time a task takes to reach a Client-API script and come back.

Usage::

    python benchmarks/script_runner.py [--sites 8] [--rounds 200] [--floats 10]

For each mode (``thread``, ``subprocess``) it starts one ScriptRunner per site on a script that
adds 1 to its params and sends them back, then times rounds: one ``train`` task to every site at
once (``asyncio.gather`` of :func:`fedcell.executors.run_task`), results averaged into the next
round's params. No network and no server: this is the executor's share of a round (thread mode:
queues and one result copy; subprocess mode: the private ipc cell both ways). The median and p90
of the second half of the rounds are printed (the first half absorbs the children's start-up).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from fedcell.engine.dispatcher import Task
from fedcell.executors import ScriptRunner, SiteContext, run_task
from fedcell.fl_model import FLModel

SCRIPT = """
import fedcell.client as flare

flare.init()
while flare.is_running():
    model = flare.receive()
    flare.send(flare.FLModel(params={k: v + 1 for k, v in model.params.items()},
                             meta={"NUM_STEPS_CURRENT_ROUND": 1}))
"""


async def measure(script: Path, mode: str, sites: int, rounds: int, floats: int) -> list[float]:
    runners = [ScriptRunner(script=script, mode=mode, params_format="numpy") for _ in range(sites)]  # type: ignore[arg-type]
    for index, runner in enumerate(runners):
        await runner.start(SiteContext(f"site-{index}", "bench"))
    params = {"w": np.zeros(floats, dtype=np.float32)}
    seconds = []
    try:
        for round_number in range(rounds):
            started = time.perf_counter()
            results = await asyncio.gather(
                *(
                    run_task(runner, Task("train", FLModel(params=params, current_round=round_number)), f"site-{i}")
                    for i, runner in enumerate(runners)
                )
            )
            failed = [r for r in results if not r.ok]
            if failed:
                raise RuntimeError(failed[0].error)
            params = {"w": sum(r.data.params["w"] for r in results) / sites}
            seconds.append(time.perf_counter() - started)
    finally:
        for runner in runners:
            await runner.stop()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--floats", type=int, default=10, help="float32 values in the model")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        script = Path(folder) / "echo_train.py"
        script.write_text(SCRIPT)
        for mode in ("thread", "subprocess"):
            seconds = asyncio.run(measure(script, mode, args.sites, args.rounds, args.floats))
            steady = sorted(seconds[len(seconds) // 2 :])
            print(
                f"{mode:10s} sites={args.sites} model={args.floats * 4 / 1e6:.3f} MB "
                f"round median={statistics.median(steady) * 1e3:.2f} ms "
                f"p90={steady[int(len(steady) * 0.9)] * 1e3:.2f} ms"
            )


if __name__ == "__main__":
    main()
