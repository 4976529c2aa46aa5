"""A stand-in for ``python -m fedcell.engine.job_process --kit ...`` in the server daemon's tests.

It takes the same arguments and writes what the real one writes (``progress.json``,
``result.json``, output on stdout), so the daemon's lifecycle can be tested without sites
running a job. What it does depends on the job's name in the folder's ``job.json``:

- ``quick``: reports progress, finishes (exit 0);
- ``broken``: prints an error and exits 2 (the job could not run);
- ``stubborn``: ignores SIGTERM (the daemon must kill it);
- anything else: runs until SIGTERM, then writes an ``aborted`` result and exits 1.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path


def write_json(path: Path, tree: dict[str, object]) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(tree))
    os.replace(temporary, path)


def main() -> int:
    parser = argparse.ArgumentParser()
    for option in ("--kit", "--job-dir", "--workspace", "--job-id", "--sites"):
        parser.add_argument(option, required=True)
    args = parser.parse_args()
    name = json.loads((Path(args.job_dir) / "job.json").read_text())["job"]["name"]
    results = Path(args.workspace)
    print(f"stand-in job process {args.job_id} ({name}) for sites {args.sites}", flush=True)
    write_json(results / "progress.json", {"node": "train", "step": 1, "total": 3,
                                           "metrics": {"loss": 0.5}, "time": time.time()})  # fmt: skip
    result = {"job_id": args.job_id, "reason": None, "nodes": {}, "metrics": [], "models": {}}
    if name == "quick":
        write_json(results / "result.json", {**result, "state": "finished"})
        return 0
    if name == "broken":
        print("ConfigError: the job folder is broken", flush=True)
        return 2
    if name == "stubborn":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        def on_term(signum: int, frame: object) -> None:
            write_json(results / "result.json", {**result, "state": "aborted",
                                                 "reason": "aborted by SIGTERM"})  # fmt: skip
            sys.exit(1)

        signal.signal(signal.SIGTERM, on_term)
    while True:
        time.sleep(0.1)


if __name__ == "__main__":
    sys.exit(main())
