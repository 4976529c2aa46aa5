"""Command line: ``python -m benchmarks.peers [--peer NAME] [--sites N ...] [--rounds R]``.

Runs the named peers (default: all) one after the other, never in parallel (the machine's cores
are the measured resource), and prints each :func:`benchmarks.peers.run_peer` result as one JSON
line. Exits 1 if any run failed.
"""

from __future__ import annotations

import argparse
import json
import sys

from . import PEERS, run_peer


def main(argv: list[str] | None = None) -> int:
    """Run the peers on the rounds workload and print one JSON line per run."""
    parser = argparse.ArgumentParser(description="Run the peers on the rounds workload")
    parser.add_argument("--peer", action="append", choices=PEERS, help="repeatable; default: all")
    parser.add_argument("--sites", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per peer run")
    args = parser.parse_args(argv)
    failed = False
    for name in args.peer or PEERS:
        for n_sites in args.sites:
            result = run_peer(name, n_sites, args.rounds, args.timeout)
            failed = failed or "error" in result
            print(json.dumps(result, sort_keys=True), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
