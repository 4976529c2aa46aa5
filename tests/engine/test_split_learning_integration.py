"""Split learning end to end: the example job in the simulator, with its sites as threads and as
real processes, reaching the centralized accuracy and reporting bytes and time per batch; and no
label or feature bytes in anything any cell sends."""

from __future__ import annotations

import csv
import runpy
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedcell.transports import codec

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "split-learning"
EPOCHS = 3


@pytest.fixture
def example(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """The example's job.py namespace and baseline, with its folder on sys.path."""
    before = set(sys.modules)
    monkeypatch.setattr(sys, "path", [str(EXAMPLE), *sys.path])
    namespace = runpy.run_path(str(EXAMPLE / "job.py"), run_name="example")
    import vertical_data
    from centralized_baseline import train_centralized

    yield {
        "make_job": namespace["make_job"],
        "train_centralized": train_centralized,
        "data": vertical_data,
    }
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


@pytest.mark.integration
def test_no_label_or_feature_bytes_cross_any_cell(
    example: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: record every payload frame the cells encode (messages and streams use codec.encode)
    frames: list[bytes] = []
    original_encode = codec.encode

    def recording_encode(value: Any) -> tuple[Any, list[Any]]:
        tree, buffers = original_encode(value)
        frames.append(codec.pack_tree(tree))
        frames.extend(bytes(memoryview(buffer).cast("B")) for buffer in buffers)
        return tree, buffers

    monkeypatch.setattr(codec, "encode", recording_encode)

    # Execute
    result = example["make_job"](1).simulate(n_clients=2, workspace=tmp_path)

    # Assert: the recorder saw the cut tensors cross (2 per batch)...
    assert result.ok, result.job.reason
    cut_bytes = 64 * 16 * 4
    assert sum(len(frame) == cut_bytes for frame in frames) >= 2 * (3072 // 64)
    # ...but no run of labels (in either site order or id order) and no feature row
    data = example["data"]
    for split in ("train", "validate"):
        label_ids, labels = data.labels(split)
        feature_ids, features = data.features(split)
        by_id = labels[np.argsort(label_ids)]
        needles = [labels[i : i + 12].tobytes() for i in (0, 300, 700)]
        needles += [by_id[i : i + 12].tobytes() for i in (0, 300, 700)]
        needles += [features[i].tobytes() for i in (0, 1, 500)]
        needles += [features[np.argsort(feature_ids)][i].tobytes() for i in (0, 1, 500)]
        for needle in needles:
            assert not any(needle in frame for frame in frames)
