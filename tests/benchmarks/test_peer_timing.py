"""The peers' result line and round figures (benchmarks/peers/peer_timing.py), without the peers.

The module is loaded from its file: ``benchmarks`` is a folder of scripts, not an installed
package, and this test must not need either peer's virtualenv.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

PEER_TIMING_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "peers" / "peer_timing.py"


def _load_peer_timing() -> ModuleType:
    spec = importlib.util.spec_from_file_location("peer_timing_under_test", PEER_TIMING_PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


peer_timing = _load_peer_timing()


def test_summary_is_the_median_after_the_warmup_rounds() -> None:
    # Prepare: launch at 100 s, round 1 starts at 108 s; rounds last 3, 2, 1, 5, 1, 1 s.
    ends = [111.0, 113.0, 114.0, 119.0, 120.0, 121.0]

    # Execute
    summary = peer_timing.summarize_rounds(
        peer="flower", sites=2, launch_epoch=100.0,
        first_round_start_epoch=108.0, round_end_epochs=ends,
    )

    # Assert: the first two rounds (3 s, 2 s) are left out of the median of 1, 5, 1, 1.
    assert summary["round_durations_s"] == [3.0, 2.0, 1.0, 5.0, 1.0, 1.0]
    assert summary["round_s"] == 1.0
    assert summary["first_round_end_s"] == 11.0
    assert summary["round_end_s"][-1] == 21.0
    assert summary["rounds"] == 6


def test_summary_refuses_too_few_rounds_and_time_going_backwards() -> None:
    with pytest.raises(ValueError, match="at least 3"):
        peer_timing.summarize_rounds(
            peer="nvflare", sites=2, launch_epoch=0.0,
            first_round_start_epoch=1.0, round_end_epochs=[2.0, 3.0],
        )
    with pytest.raises(ValueError, match="not increasing"):
        peer_timing.summarize_rounds(
            peer="nvflare", sites=2, launch_epoch=0.0,
            first_round_start_epoch=1.0, round_end_epochs=[2.0, 4.0, 3.0],
        )


def test_parse_result_takes_the_last_result_line_among_peer_noise() -> None:
    # Prepare: peer log lines, an earlier result, then the final one.
    stdout = "\n".join([
        "2026-11-26 06:18:30,391 - FedAvg - INFO - Round 0 started.",
        peer_timing.format_result({"peer": "flower", "round_s": 9.0}),
        "INFO :      Strategy execution finished in 7.64s",
        peer_timing.format_result({"peer": "flower", "round_s": 0.1}),
        "",
    ])

    # Execute
    result = peer_timing.parse_result(stdout)

    # Assert
    assert result == {"peer": "flower", "round_s": 0.1}


@pytest.mark.parametrize(
    ("stdout", "message"),
    [
        ("no result here\n", "no result line"),
        (peer_timing.RESULT_PREFIX + "{not json", "malformed"),
        (peer_timing.RESULT_PREFIX + "[1, 2]", "not a JSON object"),
    ],
)
def test_parse_result_rejects_missing_or_malformed_lines(stdout: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        peer_timing.parse_result(stdout)
