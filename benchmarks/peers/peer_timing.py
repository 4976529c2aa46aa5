"""The result line that every peer script prints, and how round timings become the two figures.

Standard library only: the peer scripts import it inside the peers' virtualenvs, and
``benchmarks.peers`` imports it in fedcell's to parse what they print.

Contract. A peer script prints exactly one line ``FEDCELL_PEER_RESULT <json object>`` on stdout
(anything else it or its peer prints is ignored). The object always has ``peer``, ``sites`` and
``rounds``, plus either the timings or an ``error`` string. The timings come from round-end
instants taken on the peer's server side (wall-clock epoch seconds) and the launch instant (when
the caller started the peer process):

- ``round_end_s``: each round's end, in seconds since launch;
- ``round_durations_s``: round ``r`` lasts from the end of round ``r - 1`` (or, for round 1, from
  the server's first round start) to its own end;
- ``round_s``: the steady-state round, the median duration of the rounds after the first
  ``WARMUP_ROUNDS`` (so a run needs at least ``WARMUP_ROUNDS + 1`` rounds);
- ``first_round_end_s``: launch to the end of round 1, start-up included.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from typing import Any

RESULT_PREFIX = "FEDCELL_PEER_RESULT "
WARMUP_ROUNDS = 2


def summarize_rounds(
    *,
    peer: str,
    sites: int,
    launch_epoch: float,
    first_round_start_epoch: float,
    round_end_epochs: Sequence[float],
) -> dict[str, Any]:
    """Turn round-end instants into the result object (see the module docstring).

    Raises
    ------
    ValueError
        If there are not more than ``WARMUP_ROUNDS`` rounds or the instants are not increasing.
    """
    if len(round_end_epochs) <= WARMUP_ROUNDS:
        raise ValueError(
            f"{peer}: {len(round_end_epochs)} round ends measured; a steady-state figure needs "
            f"at least {WARMUP_ROUNDS + 1}"
        )
    starts = [first_round_start_epoch, *round_end_epochs[:-1]]
    durations = [end - start for start, end in zip(starts, round_end_epochs, strict=True)]
    if any(duration < 0 for duration in durations):
        raise ValueError(f"{peer}: round instants are not increasing: {list(round_end_epochs)}")
    return {
        "peer": peer,
        "sites": sites,
        "rounds": len(round_end_epochs),
        "round_s": statistics.median(durations[WARMUP_ROUNDS:]),
        "first_round_end_s": round_end_epochs[0] - launch_epoch,
        "round_end_s": [round(end - launch_epoch, 4) for end in round_end_epochs],
        "round_durations_s": [round(duration, 4) for duration in durations],
    }


def format_result(result: dict[str, Any]) -> str:
    """Return the one stdout line that carries ``result``."""
    return RESULT_PREFIX + json.dumps(result, sort_keys=True)


def parse_result(stdout: str) -> dict[str, Any]:
    """Return the object of the last result line in ``stdout``.

    Raises
    ------
    ValueError
        If no line carries a result, or the last one is not a JSON object.
    """
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            try:
                result = json.loads(line[len(RESULT_PREFIX):])
            except json.JSONDecodeError as exc:
                raise ValueError(f"malformed peer result line: {line[:200]!r}") from exc
            if not isinstance(result, dict):
                raise ValueError(f"peer result is not a JSON object: {line[:200]!r}")
            return result
    raise ValueError("the peer printed no result line")
