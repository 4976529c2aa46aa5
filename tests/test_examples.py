"""Every example runs as a user would run it (fewer rounds)."""

from __future__ import annotations

import runpy
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture
def isolated_imports(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Examples import sibling modules (model.py ...): keep them out of other tests."""
    before = set(sys.modules)
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield
    for name in set(sys.modules) - before:
        if not name.startswith(("fedcell", "torch", "numpy", "_")):
            del sys.modules[name]


def test_dag_example_keeps_the_better_branch(tmp_path: Path, isolated_imports: None) -> None:
    make_job = runpy.run_path(str(EXAMPLES / "dag" / "job.py"), run_name="example")["make_job"]
    result = make_job(rounds=1).simulate(n_clients=2, workspace=tmp_path)
    assert result.ok, result.job.reason
    best = result.job.output("best")
    branches = {name: result.job.output(name).metrics["accuracy"] for name in ("lr_0_1", "lr_0_01")}
    assert best.meta["chosen"] == max(branches, key=branches.__getitem__)
    assert best.metrics["accuracy"] == max(branches.values())
