"""Split learning end to end: the example job in the simulator, with its sites as threads and as
real processes, reaching the centralized accuracy and reporting bytes and time per batch."""

from __future__ import annotations

import csv
import runpy
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "split-learning"
EPOCHS = 3


@pytest.fixture
def example(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """The example's job.py namespace and baseline, with its folder on sys.path."""
    before = set(sys.modules)
    monkeypatch.setattr(sys, "path", [str(EXAMPLE), *sys.path])
    namespace = runpy.run_path(str(EXAMPLE / "job.py"), run_name="example")
    from centralized_baseline import train_centralized

    yield {"make_job": namespace["make_job"], "train_centralized": train_centralized}
    for name in set(sys.modules) - before:
        if not name.startswith(("fedcell", "torch", "numpy", "_")):
            del sys.modules[name]


def check_run(result: Any, central_accuracy: float) -> None:
    assert result.ok, result.job.reason
    output = result.job.output("split")
    assert abs(output.metrics["accuracy"] - central_accuracy) <= 0.02
    assert len(output.meta["history"]) == EPOCHS
    per_batch = output.meta["bytes_per_batch"]
    assert 64 * 16 * 4 * 0.9 < per_batch["data_site"] < 64 * 16 * 4 + 200
    assert 64 * 16 * 4 * 0.9 < per_batch["label_site"] < 64 * 16 * 4 + 200
    # each site saved its trained half into its workspace (the simulator's job/custom folder)
    for half in ("bottom.pt", "top.pt"):
        assert (result.workspace / "job" / "custom" / half).stat().st_size > 1000
    with result.metrics_file.open() as fh:
        rows = list(csv.DictReader(fh))
    assert [row["round"] for row in rows] == [str(epoch) for epoch in range(EPOCHS)]
    assert {"train_loss", "ms_per_batch", "label_site_bytes_per_batch"} <= set(rows[0])


@pytest.mark.integration
def test_split_learning_with_sites_as_threads(example: dict[str, Any], tmp_path: Path) -> None:
    # Prepare
    central_accuracy, _ = example["train_centralized"](EPOCHS)

    # Execute
    result = example["make_job"](EPOCHS).simulate(n_clients=2, workspace=tmp_path)

    # Assert
    check_run(result, central_accuracy)


@pytest.mark.integration
@pytest.mark.slow  # two site processes importing torch: ~15 s, more on a loaded machine
def test_split_learning_with_sites_as_processes(example: dict[str, Any], tmp_path: Path) -> None:
    # Prepare
    central_accuracy, _ = example["train_centralized"](EPOCHS)

    # Execute: each site loads the exported job folder (custom/ holds the example's modules)
    result = example["make_job"](EPOCHS).simulate(n_clients=2, mode="processes", workspace=tmp_path)

    # Assert
    check_run(result, central_accuracy)
    assert (tmp_path / "job" / "custom" / "vertical_data.py").exists()
    for site in ("site-1", "site-2"):
        assert f"{site}: linked to 'server'" in (tmp_path / f"{site}.log").read_text()
