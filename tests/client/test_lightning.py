"""``flare.patch(trainer)``: a real Lightning Trainer federated by FedAvg in the simulator."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import pytest
import torch
from lightning_parts import (  # type: ignore[import-not-found]
    BATCH_SIZE,
    LIGHTNING_WARNINGS,
    SITE_SAMPLES,
    TinyClassifier,
)

from fedcell.controllers import FedAvg
from fedcell.engine.job import Job
from fedcell.executors.script_runner import ScriptRunner

HERE = Path(__file__).resolve().parent
pytestmark = LIGHTNING_WARNINGS

EPOCHS_PER_ROUND = 2


def weighted_mean(states: list[dict[str, torch.Tensor]], weights: list[int]) -> dict[str, torch.Tensor]:
    total = sum(weights)
    return {
        name: sum(w * state[name].double() for state, w in zip(states, weights, strict=True)) / total
        for name in states[0]
    }


def assert_same_weights(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name].double(), expected[name].double(), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "script_mode",
    # A script process imports Lightning itself: 10-40 s on a loaded 2-core machine.
    ["thread", pytest.param("subprocess", marks=[pytest.mark.integration, pytest.mark.slow])],
)
def test_fedavg_rounds_train_from_the_aggregated_model_and_report_metrics(
    tmp_path: Path, script_mode: Literal["thread", "subprocess"]
) -> None:
    # Prepare: 3 FedAvg rounds over 2 sites of different sizes (FedAvg weighs by steps).
    rounds = 3
    records = tmp_path / "records"
    records.mkdir()
    job = Job("lightning-fedavg")
    job.add(FedAvg(rounds=rounds, model="lightning_parts:TinyClassifier"), name="train")
    job.add_executor(
        ScriptRunner(script="lightning_script.py", args=[str(records)], mode=script_mode),
        tasks=("train",),
    )
    job.add_file(HERE / "lightning_script.py")
    job.add_file(HERE / "lightning_parts.py")

    # Execute
    result = job.simulate(n_clients=2, workspace=tmp_path / "run")

    # Assert: every round started (validation and training) from the global model ...
    assert result.ok, result.job.reason
    sites = ["site-1", "site-2"]
    steps = [EPOCHS_PER_ROUND * SITE_SAMPLES[site] // BATCH_SIZE for site in sites]
    seen = {(site, r): torch.load(records / f"{site}-{r}.pt") for site in sites for r in range(rounds)}
    expected_global = TinyClassifier(seed=0).state_dict()  # what the server's factory built
    for r in range(rounds):
        for site in sites:
            record = seen[site, r]
            assert_same_weights(record["at_validate"], expected_global)
            assert_same_weights(record["at_train_start"], expected_global)
            # ... every fit really trained its round's epochs (Lightning counts across fits) ...
            assert record["epoch"] == EPOCHS_PER_ROUND * (r + 1)
            assert record["global_step"] == steps[sites.index(site)] * (r + 1)
            # ... with the optimizer and LR schedule carried over from the previous fit.
            assert bool(record["momentum_at_start"]) == (r > 0)
            assert record["lr_at_start"] == pytest.approx(0.1 * 0.5 ** (EPOCHS_PER_ROUND * r))
        # ... and the next global model is the step-weighted mean of what the fits sent.
        expected_global = weighted_mean([seen[site, r]["after_fit"] for site in sites], steps)
    final = result.job.output("train")
    assert_same_weights({k: torch.as_tensor(v) for k, v in final.params.items()}, expected_global)

    # Metrics flow back: the global model's validation scores and the local training loss.
    history = final.meta["history"]
    for r, record in enumerate(history):
        assert sorted(record["ok"]) == sites
        reported = record["metrics"]
        for name in ("val_loss", "val_accuracy"):
            per_site = [seen[site, r]["global_metrics"][name] for site in sites]
            expected = sum(w * m for w, m in zip(steps, per_site, strict=True)) / sum(steps)
            assert reported[name] == pytest.approx(expected, rel=1e-6)
        assert reported["train_loss"] > 0
    assert history[-1]["metrics"]["val_loss"] < history[0]["metrics"]["val_loss"]
