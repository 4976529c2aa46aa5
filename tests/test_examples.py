"""Every example runs as a user would run it (fewer rounds)."""

from __future__ import annotations

import json
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
    # the kept model and each site's local-only model, evaluated at every site
    evaluation = result.job.output("cross_site")
    sites = ["site-1", "site-2"]
    assert evaluation["sites"] == sites and evaluation["missing"] == []
    assert evaluation["models"] == {"best": {"kind": "global", "source": "best"},
                                    **{s: {"kind": "local", "source": s} for s in sites}}
    assert all(0.0 <= evaluation["matrix"][model][site]["accuracy"] <= 1.0
               for model in evaluation["models"] for site in sites)
    saved = tmp_path / "nodes" / "cross_site" / "cross_site_eval.json"
    assert json.loads(saved.read_text()) == evaluation


def test_cyclic_example_relays_the_model_and_cross_evaluates(
    tmp_path: Path, isolated_imports: None
) -> None:
    make_job = runpy.run_path(str(EXAMPLES / "cyclic" / "job.py"), run_name="example")["make_job"]
    result = make_job(rounds=2, shuffle=True).simulate(n_clients=2, workspace=tmp_path)
    assert result.ok, result.job.reason
    hops = result.job.output("cyclic").meta["history"]
    assert [hop["status"] for hop in hops] == ["ok"] * 4
    assert sorted(hop["site"] for hop in hops) == ["site-1", "site-1", "site-2", "site-2"]
    evaluation = result.job.output("cross_site")
    assert list(evaluation["models"]) == ["cyclic", "site-1", "site-2"]
    # the site that trained last holds the final model as its local model
    assert evaluation["matrix"][hops[-1]["site"]] == evaluation["matrix"]["cyclic"]
