"""examples/lightning runs as a user runs it (fewer rounds)."""

from __future__ import annotations

import runpy
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from lightning_parts import LIGHTNING_WARNINGS  # type: ignore[import-not-found]

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "lightning"
pytestmark = LIGHTNING_WARNINGS


@pytest.fixture
def example_imports(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The example's folder on sys.path (the server imports model.py from it), and its
    ``model`` module kept out of other tests (other examples have a model.py too)."""
    sys.modules.pop("model", None)
    monkeypatch.syspath_prepend(str(EXAMPLE))
    yield
    sys.modules.pop("model", None)


def test_lightning_example_trains_and_validates_the_global_model(
    tmp_path: Path, example_imports: None
) -> None:
    # Prepare
    job = runpy.run_path(str(EXAMPLE / "job.py"), run_name="example")["make_job"](rounds=2)

    # Execute
    result = job.simulate(n_clients=2, workspace=tmp_path)

    # Assert
    assert result.ok, result.job.reason
    output = result.job.output("train")
    history = output.meta["history"]
    assert [sorted(record["ok"]) for record in history] == [["site-1", "site-2"]] * 2
    for record in history:
        assert {"val_loss", "val_accuracy", "train_loss"} <= set(record["metrics"])
    validation = output.meta["validation"]
    assert set(validation) >= {"val_loss", "val_accuracy"}
    assert validation["val_accuracy"] > 0.4  # 4 classes: chance is 0.25
    from model import LitClassifier  # type: ignore[import-not-found]

    saved = torch.load(result.model_files["train"], weights_only=True)
    LitClassifier().load_state_dict(saved)  # the final global model is the module's
