"""Job templates: `fedcell job templates` / `job create`, and every template runs when simulated."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from fedcell.cli import main as cli
from fedcell.engine.job import Job
from fedcell.errors import ConfigError
from fedcell.templates import TEMPLATES, create, parse_sites


@pytest.fixture
def isolated_imports(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Templates import their own modules (net.py, split_halves.py): keep them to the test."""
    before = set(sys.modules)
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield
    for name in set(sys.modules) - before:
        if not name.startswith(("fedcell", "torch", "numpy", "_")):
            del sys.modules[name]


def test_templates_command_lists_every_template_with_its_nodes() -> None:
    # Execute
    shown = CliRunner().invoke(cli, ["job", "templates"], env={"COLUMNS": "200"})

    # Assert
    assert shown.exit_code == 0, shown.output
    for template in TEMPLATES.values():
        assert template.name in shown.output and template.nodes in shown.output
    assert set(TEMPLATES) == {"fedavg-pytorch", "cyclic", "cross-site-eval", "split-learning"}


@pytest.mark.parametrize(
    ("name", "config_format", "expected_metric"),
    [
        ("fedavg-pytorch", "json", "accuracy"),
        ("cyclic", "yaml", "accuracy"),
        ("cross-site-eval", "toml", "accuracy"),
        ("split-learning", "yaml", "train_loss"),
    ],
)
def test_each_template_creates_a_folder_that_simulates_to_the_end(
    name: str, config_format: str, expected_metric: str, tmp_path: Path, isolated_imports: None
) -> None:
    # Prepare
    folder, results = tmp_path / name, tmp_path / "results"
    runner = CliRunner()

    # Execute
    created = runner.invoke(cli, ["job", "create", "-t", name, str(folder),
                                  "--format", config_format])  # fmt: skip
    simulated = runner.invoke(
        cli, ["simulate", str(folder), "-n", "2", "--quiet", "-w", str(results)]
    )

    # Assert: the folder is a job folder with its scripts, and the job finished with metrics
    assert created.exit_code == 0, created.output
    assert (folder / f"job.{config_format}").is_file()
    assert Job.load(folder).name == name
    scripts = {p.name for p in (folder / "custom").iterdir()}
    assert scripts and all((folder / "custom" / s).stat().st_size > 0 for s in scripts)
    assert simulated.exit_code == 0, simulated.output
    result = json.loads((results / "result.json").read_text())
    assert result["state"] == "finished", result
    metrics = [row[expected_metric] for row in result["metrics"] if expected_metric in row]
    assert len(metrics) >= 2, result["metrics"]
    if expected_metric == "accuracy":
        assert all(0.0 <= value <= 1.0 for value in metrics) and metrics[-1] > 0.5
    else:  # the loss of split learning's second epoch is below the first's
        assert 0.0 < metrics[-1] < metrics[0]


def test_cross_site_eval_template_fills_the_whole_matrix(
    tmp_path: Path, isolated_imports: None
) -> None:
    # Prepare
    create("cross-site-eval", tmp_path / "job")

    # Execute
    result = Job.load(tmp_path / "job").simulate(2, workspace=tmp_path / "results")

    # Assert: the global model and both local models, each evaluated at both sites
    assert result.ok, result.job.reason
    evaluation = result.job.output("cross_site")
    assert evaluation["missing"] == []
    assert set(evaluation["models"]) == {"train", "site-1", "site-2"}
    assert all(set(row) == {"site-1", "site-2"} for row in evaluation["matrix"].values())


def test_site_names_bind_the_executors_and_set_min_sites(
    tmp_path: Path, isolated_imports: None
) -> None:
    # Execute
    create("fedavg-pytorch", tmp_path / "named", sites=parse_sites("north,south"))
    create("fedavg-pytorch", tmp_path / "counted", sites=parse_sites("3"))
    create("split-learning", tmp_path / "split", sites=parse_sites("features-site,labels-site"))

    # Assert
    named = Job.load(tmp_path / "named")
    assert named.min_sites == 2 and [b.sites for b in named.executors] == [("north", "south")]
    named.validate(["north", "south"])
    with pytest.raises(ConfigError, match="unknown site"):
        named.validate(["site-1", "site-2"])
    counted = Job.load(tmp_path / "counted")
    assert counted.min_sites == 3 and [b.sites for b in counted.executors] == [None]
    split = Job.load(tmp_path / "split").nodes["split"].controller
    assert (split.data_site, split.label_site) == ("features-site", "labels-site")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-t", "no-such"], "unknown job template 'no-such'; templates: fedavg-pytorch"),
        (["-t", "split-learning", "--sites", "3"], "split-learning runs on exactly two sites"),
        (["-t", "cyclic", "--sites", "0"], "--sites 0: a job needs at least one site"),
        (["-t", "cyclic", "--sites", "a,a"], "names a site twice"),
        (["-t", "cyclic", "--sites", "a b"], "'a b' is not a site name"),
    ],
)
def test_create_refusals_are_one_error_line(
    args: list[str], message: str, tmp_path: Path, isolated_imports: None
) -> None:
    # Execute
    outcome = CliRunner().invoke(cli, ["job", "create", *args, str(tmp_path / "job")])

    # Assert
    assert outcome.exit_code == 1
    assert outcome.output.startswith("Error: ") and message in outcome.output
    assert "Traceback" not in outcome.output
    assert not (tmp_path / "job").exists()


def test_create_refuses_a_folder_that_is_not_empty(tmp_path: Path, isolated_imports: None) -> None:
    # Prepare
    (tmp_path / "notes.txt").write_text("mine")

    # Execute
    outcome = CliRunner().invoke(cli, ["job", "create", "-t", "cyclic", str(tmp_path)])

    # Assert
    assert outcome.exit_code == 1 and "not an empty folder" in outcome.output
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
