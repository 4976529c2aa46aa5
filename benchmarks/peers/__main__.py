"""Command line of the peer benchmarks, run from the repository root with fedcell's python.

``python -m benchmarks.peers setup [nvflare] [flower]``
    Create (or reuse) the peers' virtualenvs; default: both.
``python -m benchmarks.peers run [--peer NAME] [--sites N ...] [--rounds R] [--timeout S]``
    Run the named peers (default: both) one after the other, never in parallel (the machine's
    cores are the measured resource), and print each :func:`benchmarks.peers.run_peer` result
    as one JSON line.

Both exit 1 if anything failed.
"""

from __future__ import annotations

import argparse
import json
import sys

from . import PEERS, run_peer
from .setup_peers import PeerSetupError, ensure_peer


def _setup(names: list[str]) -> int:
    for name in names:
        try:
            python = ensure_peer(name)
        except PeerSetupError as exc:
            print(f"{name}: FAILED: {exc}", file=sys.stderr)
            return 1
        print(f"{name}: ready at {python}")
    return 0


def _run(names: list[str], sites: list[int], rounds: int, timeout: float) -> int:
    failed = False
    for name in names:
        for n_sites in sites:
            result = run_peer(name, n_sites, rounds, timeout)
            failed = failed or "error" in result
            print(json.dumps(result, sort_keys=True), flush=True)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run ``setup`` or ``run``."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.peers")
    commands = parser.add_subparsers(dest="command", required=True)
    setup = commands.add_parser("setup", help="create the peers' virtualenvs")
    setup.add_argument("peers", nargs="*", help=f"any of {', '.join(PEERS)}; default: all")
    run = commands.add_parser("run", help="run the peers on the rounds workload")
    run.add_argument("--peer", action="append", choices=PEERS, help="repeatable; default: all")
    run.add_argument("--sites", type=int, nargs="+", default=[2, 8])
    run.add_argument("--rounds", type=int, default=20)
    run.add_argument("--timeout", type=float, default=600.0, help="seconds per peer run")
    args = parser.parse_args(argv)
    if args.command == "setup":
        return _setup(args.peers or list(PEERS))
    return _run(args.peer or list(PEERS), args.sites, args.rounds, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
