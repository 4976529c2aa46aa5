"""Measure the peers (NVIDIA FLARE 2.9.0, Flower 1.42.0) on fedcell's rounds workload.

fedcell's benchmarks compare against the peers in the same run, on the same machine, with the
same workload: FedAvg of a 10,504-parameter MLP (``peer_workload.RoundsMLP``), synthetic data
made at each site, one SGD step per round, N simulated sites. A caller in fedcell's virtualenv
calls :func:`run_peer`; it runs the peer's script (``nvflare_rounds.py``, ``flower_rounds.py``)
with the peer's own interpreter, from the virtualenvs that :mod:`benchmarks.peers.setup_peers`
builds outside fedcell's, and parses the one result line the script prints
(:mod:`benchmarks.peers.peer_timing` has the contract and the figures' definitions).

Isolation and clean-up. Each run gets a scratch folder (its ``HOME`` and workspace, deleted
afterwards), a wall-clock limit, its own process session, and a token in its environment
(``FEDCELL_PEER_RUN=<uuid>``). When the run ends, times out or fails, every process that still
carries the token is terminated by its id: the script's children, and the daemons that left the
session, such as Ray's ``raylet`` and ``gcs_server``. Only processes this run started carry the
token, so nothing else on the machine is touched.

Failures never raise into the caller: the returned dict then holds an ``"error"`` string (and the
tail of the peer's output), so one broken peer does not sink a benchmark run.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from .peer_timing import WARMUP_ROUNDS, parse_result
from .setup_peers import PEER_REQUIREMENTS, ensure_peer, is_peer_ready, peer_python

__all__ = ["MAX_SITES", "PEERS", "ensure_peer", "run_peer"]

PEERS = tuple(PEER_REQUIREMENTS)
PEERS_DIR = Path(__file__).resolve().parent
PEER_SCRIPTS = {
    "nvflare": PEERS_DIR / "nvflare_rounds.py",
    "flower": PEERS_DIR / "flower_rounds.py",
}
# NVIDIA FLARE's simulator runs a process per site (about 0.4 GiB each on this workload):
# past 32 sites it would take the whole 24 GiB machine.
MAX_SITES = {"nvflare": 32, "flower": 1000}
RUN_TOKEN_VARIABLE = "FEDCELL_PEER_RUN"
OUTPUT_TAIL_CHARS = 4000
TERMINATE_GRACE_S = 5.0


def _processes_with_token(token: str) -> list[int]:
    marker = f"{RUN_TOKEN_VARIABLE}={token}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            environment = Path("/proc", entry, "environ").read_bytes()
        except OSError:  # gone already, or not ours to read
            continue
        if marker in environment.split(b"\0"):
            found.append(int(entry))
    return found


def _terminate_run(token: str) -> None:
    """Terminate every process that carries the run's token: SIGTERM, a grace period, SIGKILL."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = _processes_with_token(token)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + TERMINATE_GRACE_S
        while pids and time.monotonic() < deadline:
            time.sleep(0.1)
            pids = _processes_with_token(token)
        if not pids:
            return


def _peer_environment(name: str, token: str) -> dict[str, str]:
    environment = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONHOME")}
    environment[RUN_TOKEN_VARIABLE] = token
    environment["PATH"] = os.pathsep.join(
        (str(peer_python(name).parent), os.environ.get("PATH", os.defpath))
    )
    environment["PYTHONUNBUFFERED"] = "1"
    return environment


def _failure(name: str, n_sites: int, rounds: int, error: str, output: str = "") -> dict[str, Any]:
    result: dict[str, Any] = {"peer": name, "sites": n_sites, "rounds": rounds, "error": error}
    if output:
        result["output_tail"] = output[-OUTPUT_TAIL_CHARS:]
    return result


def run_peer(name: str, n_sites: int, rounds: int = 20, timeout: float = 600.0) -> dict[str, Any]:
    """Run peer ``name`` on the rounds workload with ``n_sites`` simulated sites.

    Parameters
    ----------
    name
        ``"nvflare"`` or ``"flower"``.
    n_sites
        Number of simulated sites, 1 to ``MAX_SITES[name]``.
    rounds
        FedAvg rounds; more than ``peer_timing.WARMUP_ROUNDS`` (the steady-state figure skips
        the first ones).
    timeout
        Wall-clock limit for the whole peer run, start-up included, in seconds.

    Returns
    -------
    dict
        On success: ``peer``, ``sites``, ``rounds``, ``round_s`` (steady-state median seconds per
        round), ``first_round_end_s`` (launch to the end of round 1), ``round_end_s``,
        ``round_durations_s``, ``peer_version``, ``wall_s`` (the whole run) and ``load_1min``
        (the machine's 1-minute load average before and after: figures taken on a machine
        busy with other work are slower, Flower's most of all). On failure:
        ``peer``, ``sites``, ``rounds``, ``error`` and, where the peer printed anything,
        ``output_tail``. Nothing is raised.
    """
    if name not in PEER_SCRIPTS:
        return _failure(name, n_sites, rounds, f"unknown peer {name!r}; known: {list(PEERS)}")
    if not 1 <= n_sites <= MAX_SITES[name]:
        return _failure(name, n_sites, rounds, f"{name} runs 1 to {MAX_SITES[name]} sites here")
    if rounds <= WARMUP_ROUNDS:
        return _failure(name, n_sites, rounds, f"rounds must exceed {WARMUP_ROUNDS}")
    if not is_peer_ready(name):
        return _failure(
            name, n_sites, rounds,
            f"{name} is not installed; run `python -m benchmarks.peers setup {name}`",
        )
    token = uuid.uuid4().hex
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix=f"fedcell-{name}-") as workdir:
        launch_epoch = time.time()
        command = [
            str(peer_python(name)), str(PEER_SCRIPTS[name]),
            "--sites", str(n_sites), "--rounds", str(rounds),
            "--launch-epoch", repr(launch_epoch), "--workdir", workdir,
        ]
        try:
            process = subprocess.Popen(
                command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                errors="replace", env=_peer_environment(name, token), start_new_session=True,
            )
        except OSError as exc:
            return _failure(name, n_sites, rounds, f"cannot start {command[0]}: {exc}")
        try:
            output, _ = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _terminate_run(token)
            output, _ = process.communicate()
            return _failure(name, n_sites, rounds, f"timed out after {timeout:.0f} s", output)
        finally:
            _terminate_run(token)
        wall_s = time.time() - launch_epoch
    try:
        result = parse_result(output)
    except ValueError as exc:
        return _failure(name, n_sites, rounds, f"exit code {process.returncode}: {exc}", output)
    if "error" in result:
        result["output_tail"] = output[-OUTPUT_TAIL_CHARS:]
    result["wall_s"] = wall_s
    result["load_1min"] = [load_before, os.getloadavg()[0]]
    return result
