"""CrossSiteEval over LocalDispatcher: the matrix's shape and content for global, local and both,
refusals, dropped cells, one local model at a time, the JSON file and table, config errors and
export."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedcell.controllers import CrossSiteEval
from fedcell.controllers.cross_site_eval import REFUSED, format_matrix, matrix_table, refusal
from fedcell.engine.dispatcher import ControllerContext, Task
from fedcell.engine.job import Job
from fedcell.engine.local_dispatcher import LocalDispatcher, SiteHandler
from fedcell.engine.progress import ProgressEvent
from fedcell.errors import CheckpointError, ConfigError, SiteCrashedError, TooFewResultsError
from fedcell.fl_model import FLModel
from fedcell.transports.codec import decode, encode, pack_tree, unpack_tree

SITES = ("s1", "s2", "s3")


def run(
    controller: CrossSiteEval,
    handlers: Mapping[str, SiteHandler],
    inputs: Mapping[str, Any] | None = None,
    *,
    workspace: Path | None = None,
    wire: bool = True,
    progress: list[ProgressEvent] | None = None,
) -> dict[str, Any]:
    async def main() -> dict[str, Any]:
        dispatcher = LocalDispatcher(handlers, wire=wire)
        ctx = ControllerContext(
            "job-1", "cse", dispatcher, dict(inputs or {}), workspace=workspace,
            progress=None if progress is None else progress.append,
        )  # fmt: skip
        return await controller.run(ctx)

    return asyncio.run(main())


class Site:
    """A site whose local model is ``w = 10 * <its digit>`` and whose validation score of a
    model is ``w + <its digit>``: every cell of the matrix says which model met which data."""

    def __init__(self, log: list[tuple[str, str, Any]] | None = None) -> None:
        self.log = log if log is not None else []

    def __call__(self, site: str, task: Task) -> FLModel:
        digit = int(site[1:])
        if task.name == "submit_model":
            self.log.append((site, task.name, task.data.meta.get("submit_model_name")))
            return FLModel(params={"w": np.full(1, 10.0 * digit)})
        assert task.name == "validate"
        self.log.append((site, task.name, task.data.meta["model_name"]))
        return FLModel(metrics={"score": float(task.data.params["w"][0]) + digit, "label": "x"})


def global_model(w: float) -> FLModel:
    return FLModel(params={"w": np.full(1, w)}, metrics={"accuracy": 0.5})


def test_both_gives_a_row_per_global_and_local_model_and_a_column_per_site() -> None:
    # Prepare
    log: list[tuple[str, str, Any]] = []
    inputs = {"train": global_model(100.0), "summary": {"not": "a model"}}

    # Execute
    out = run(CrossSiteEval(), dict.fromkeys(SITES, Site(log)), inputs)

    # Assert
    assert out["sites"] == list(SITES)
    assert out["models"] == {
        "train": {"kind": "global", "source": "train"},
        **{site: {"kind": "local", "source": site} for site in SITES},
    }
    expected_w = {"train": 100.0, "s1": 10.0, "s2": 20.0, "s3": 30.0}
    assert out["matrix"] == {
        model: {site: {"score": w + int(site[1:])} for site in SITES}
        for model, w in expected_w.items()
    }  # non-numeric metrics are dropped
    assert out["missing"] == []
    assert ("s2", "submit_model", "best_model") in log  # the name NVIDIA FLARE scripts check
    json.dumps(out)  # plain data


def test_global_only_sends_no_submit_task_and_evaluates_every_upstream_model() -> None:
    log: list[tuple[str, str, Any]] = []
    inputs = {"a": global_model(1.0), "b": global_model(2.0)}
    controller = CrossSiteEval(models="global")

    out = run(controller, dict.fromkeys(SITES, Site(log)), inputs)

    assert controller.task_names == ("validate",)
    assert list(out["matrix"]) == ["a", "b"]
    assert out["matrix"]["b"]["s3"] == {"score": 5.0}
    assert {task for _, task, _ in log} == {"validate"}


def test_local_only_ignores_upstream_models() -> None:
    out = run(CrossSiteEval(models="local", sites=["s3", "s1"]),
              dict.fromkeys(SITES, Site()), {"train": global_model(1.0)})  # fmt: skip
    assert out["sites"] == ["s3", "s1"]
    assert list(out["matrix"]) == ["s3", "s1"]
    assert out["matrix"]["s3"] == {"s3": {"score": 33.0}, "s1": {"score": 31.0}}


def test_a_refusal_is_respected_and_recorded_not_an_error() -> None:
    # Prepare: s2 refuses with the helper, s3 the way a Client-API script writes it.
    site = Site()

    def s2(name: str, task: Task) -> FLModel:
        return refusal("site policy") if task.name == "submit_model" else site(name, task)

    def s3(name: str, task: Task) -> FLModel:
        if task.name == "submit_model":
            return FLModel(meta={"refused": "no local model yet"})
        return site(name, task)

    # Execute
    out = run(CrossSiteEval(models="local"), {"s1": site, "s2": s2, "s3": s3})

    # Assert
    assert REFUSED == "refused"
    assert list(out["matrix"]) == ["s1"]
    assert out["matrix"]["s1"] == {"s1": {"score": 11.0}, "s2": {"score": 12.0},
                                   "s3": {"score": 13.0}}  # fmt: skip
    assert out["missing"] == [
        {"model": "s2", "site": "s2", "task": "submit_model", "status": "refused",
         "error": "site policy"},
        {"model": "s3", "site": "s3", "task": "submit_model", "status": "refused",
         "error": "no local model yet"},
    ]  # fmt: skip


def test_dropped_and_malformed_answers_leave_empty_cells_with_reasons() -> None:
    # Prepare: s2 cannot submit (raises) and its validation of s1's model crashes; s3 hangs
    # on validation of the global model and answers the others without metrics.
    site = Site()

    def s2(name: str, task: Task) -> FLModel:
        if task.name == "submit_model":
            raise OSError("disk gone")
        if task.data.meta["model_name"] == "s1":
            raise SiteCrashedError("lost")
        return site(name, task)

    async def s3(name: str, task: Task) -> Any:
        if task.name == "submit_model":
            return "not a model"
        if task.data.meta["model_name"] == "g":
            await asyncio.Event().wait()
        return FLModel(metrics={"note": "no numbers"})

    # Execute
    out = run(CrossSiteEval(task_timeout=0.3), {"s1": site, "s2": s2, "s3": s3},
              {"g": global_model(0.0)})  # fmt: skip

    # Assert: rows g and s1 (s2 and s3 gave no model); None where a cell is missing
    assert out["matrix"] == {
        "g": {"s1": {"score": 1.0}, "s2": {"score": 2.0}, "s3": None},
        "s1": {"s1": {"score": 11.0}, "s2": None, "s3": None},
    }
    missing = {(m["model"], m["site"], m["task"]): (m["status"], m["error"])
               for m in out["missing"]}  # fmt: skip
    assert missing[("g", "s3", "validate")][0] == "timeout"
    assert missing[("s1", "s2", "validate")] == ("crashed", "lost")
    assert missing[("s1", "s3", "validate")][0] == "failed"
    assert "no numeric metrics" in missing[("s1", "s3", "validate")][1]
    assert missing[("s2", "s2", "submit_model")][0] == "failed"
    assert "OSError: disk gone" in missing[("s2", "s2", "submit_model")][1]
    assert missing[("s3", "s3", "submit_model")][0] == "failed"
    assert "expected an FLModel with params, got str" in missing[("s3", "s3", "submit_model")][1]


def test_no_metrics_at_all_fails_the_node() -> None:
    def fails(site: str, task: Task) -> FLModel:
        raise ValueError("cannot validate")

    with pytest.raises(TooFewResultsError, match="no site returned metrics") as caught:
        run(CrossSiteEval(models="global"), dict.fromkeys(SITES, fails), {"g": global_model(0)})
    assert [(r.site, r.status) for r in caught.value.results] == [(s, "failed") for s in SITES]


def test_the_failure_lists_the_empty_cells_not_the_refusals() -> None:
    def site(name: str, task: Task) -> FLModel:
        if task.name == "submit_model":
            return refusal("no") if name == "s1" else FLModel(params={"w": np.zeros(1)})
        raise ValueError("cannot validate")

    with pytest.raises(TooFewResultsError) as caught:
        run(CrossSiteEval(), dict.fromkeys(SITES, site), {"g": global_model(0)})
    assert len(caught.value.results) == 9  # 3 models x 3 sites
    assert {(r.task, r.status) for r in caught.value.results} == {("validate", "failed")}


def test_every_site_refusing_gives_an_empty_matrix() -> None:
    out = run(CrossSiteEval(models="local"), dict.fromkeys(SITES, lambda s, t: refusal("no")))
    assert out["matrix"] == {} and [m["status"] for m in out["missing"]] == ["refused"] * 3


def test_local_models_are_asked_for_and_held_one_at_a_time() -> None:
    # Prepare: without the wire codec the arrays a site submits are the ones the controller
    # holds; when a site is asked for its model, the previous local model must be gone and
    # fully evaluated.
    submitted: list[weakref.ref[np.ndarray]] = []
    events: list[str] = []

    def site(name: str, task: Task) -> FLModel:
        if task.name == "submit_model":
            gc.collect()
            assert all(ref() is None for ref in submitted), "an earlier local model is held"
            events.append(f"submit {name}")
            params = {"w": np.zeros(100_000)}
            submitted.append(weakref.ref(params["w"]))
            return FLModel(params=params)
        events.append(f"validate {task.data.meta['model_name']}@{name}")
        return FLModel(metrics={"score": 1.0})

    # Execute
    out = run(CrossSiteEval(models="local"), dict.fromkeys(("s1", "s2"), site), wire=False)

    # Assert
    assert len(out["matrix"]) == 2
    assert events == ["submit s1", "validate s1@s1", "validate s1@s2",
                      "submit s2", "validate s2@s1", "validate s2@s2"]  # fmt: skip


def test_writes_the_matrix_file_logs_the_table_and_reports_progress(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare
    events: list[ProgressEvent] = []
    caplog.set_level(logging.INFO, logger="fedcell.controller")

    # Execute
    out = run(CrossSiteEval(metric="score"), dict.fromkeys(("s1", "s2"), Site()),
              {"g": global_model(5.0)}, workspace=tmp_path, progress=events)  # fmt: skip

    # Assert
    assert json.loads((tmp_path / "cross_site_eval.json").read_text()) == out
    assert [(e.step, e.total) for e in events] == [(1, 3), (2, 3), (3, 3)]
    table = format_matrix(out, "score")
    assert table in caplog.text
    lines = table.splitlines()
    assert "cross-site evaluation (score)" in lines[0]
    assert any("g (global)" in line and "6.0000" in line and "7.0000" in line for line in lines)
    assert any("s2 (local)" in line and "21.0000" in line and "22.0000" in line
               for line in lines)  # fmt: skip


def test_the_table_shows_why_a_cell_or_a_row_is_missing() -> None:
    evaluation = {
        "sites": ["s1", "s2"],
        "models": {"g": {"kind": "global", "source": "g"}},
        "matrix": {"g": {"s1": {"accuracy": 0.9, "loss": 0.25}, "s2": None}},
        "missing": [
            {"model": "g", "site": "s2", "task": "validate", "status": "timeout", "error": "x"},
            {"model": "s1", "site": "s1", "task": "submit_model", "status": "refused",
             "error": "policy"},
        ],
    }  # fmt: skip
    text = format_matrix(evaluation)
    row = next(line for line in text.splitlines() if "g (global)" in line)
    assert "accuracy=0.9000 loss=0.2500" in row and "- (timeout)" in row
    assert "no local model: s1 refused (policy)" in text
    only_accuracy = format_matrix(evaluation, "accuracy")
    assert "0.9000" in only_accuracy and "loss" not in only_accuracy
    assert matrix_table(evaluation, "accuracy").row_count == 1
    with pytest.raises(ConfigError, match="not a CrossSiteEval output"):
        matrix_table({"sites": []})


@pytest.mark.parametrize(
    ("controller", "inputs", "message"),
    [
        (CrossSiteEval(), {}, "needs an upstream node whose output is an FLModel"),
        (CrossSiteEval(models="global"), {"t": {"a": 1}}, "needs an upstream node"),
        (CrossSiteEval(), {"s1": global_model(0.0)}, "named like sites"),
        (CrossSiteEval(models="local", sites=["s1", "s9"]), {}, "'s9'\\] are not sites"),
    ],
)
def test_run_refuses_a_job_it_cannot_start(
    controller: CrossSiteEval, inputs: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        run(controller, dict.fromkeys(SITES, Site()), inputs)


@pytest.mark.parametrize(
    ("controller", "message"),
    [
        (CrossSiteEval(models="all"),  # type: ignore[arg-type]
         "models must be 'local', 'global' or 'both'"),
        (CrossSiteEval(sites=[]), "sites must be a non-empty list"),
        (CrossSiteEval(sites=["a", "a"]), "names a site twice"),
        (CrossSiteEval(task_timeout=-1), "task_timeout must be a number > 0"),
        (CrossSiteEval(metric=""), "metric must be a non-empty string"),
        (CrossSiteEval(task_props={1: 2}), "task_props must be a dict"),  # type: ignore[dict-item]
        (CrossSiteEval(validate_task=""), "validate_task must be a non-empty string"),
    ],
)  # fmt: skip
def test_validate_names_the_bad_parameter(controller: CrossSiteEval, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        controller.validate()


@pytest.mark.parametrize("config_format", ["json", "yaml", "toml"])
def test_cross_site_eval_round_trips_through_a_job_folder(
    tmp_path: Path, config_format: str
) -> None:
    # Prepare
    controller = CrossSiteEval(
        models="local", sites=["s2", "s1"], task_timeout=60.0, metric="accuracy",
        task_props={"batch_size": 64}, submit_model_task="send_local", validate_task="eval",
    )  # fmt: skip
    job = Job("export")
    job.add(controller, name="cse")

    # Execute
    job.export(tmp_path / "job", format=config_format)  # type: ignore[arg-type]
    loaded = Job.load(tmp_path / "job")

    # Assert
    assert loaded.nodes["cse"].controller == controller
    assert loaded.nodes["cse"].controller.task_names == ("send_local", "eval")


def test_a_resumed_evaluation_skips_completed_models_and_ends_with_the_same_matrix() -> None:
    # Prepare: an uninterrupted run whose checkpoints (one per completed model) are kept.
    saved: list[Any] = []

    async def keep(state: Any) -> None:
        tree, buffers = encode(state)  # as the checkpoint store keeps it
        saved.append(decode(unpack_tree(pack_tree(tree)), [bytes(b) for b in buffers]))

    inputs = {"train": global_model(100.0)}

    async def execute(ctx: ControllerContext) -> dict[str, Any]:
        return await CrossSiteEval().run(ctx)

    full = asyncio.run(execute(ControllerContext(
        "j", "cse", LocalDispatcher(dict.fromkeys(SITES, Site())), dict(inputs), checkpointer=keep
    )))  # fmt: skip
    assert [state["done"][-1] for state in saved] == [
        "global:train",
        "local:s1",
        "local:s2",
        "local:s3",
    ]
    # Execute: "the server crashed while s2's model was evaluated": resume after s1's.
    log: list[tuple[str, str, Any]] = []
    resumed = asyncio.run(execute(ControllerContext(
        "j", "cse", LocalDispatcher(dict.fromkeys(SITES, Site(log))), dict(inputs),
        restored=saved[1],
    )))  # fmt: skip
    # Assert: the same matrix; only s2's and s3's models were asked for and evaluated again.
    assert resumed == full
    assert sorted({entry[2] for entry in log if entry[1] == "validate"}) == ["s2", "s3"]
    assert sorted(site for site, name, _ in log if name == "submit_model") == ["s2", "s3"]


def test_a_restored_state_that_is_not_a_cross_site_evaluation_is_refused() -> None:
    ctx = ControllerContext(
        "j", "cse", LocalDispatcher(dict.fromkeys(SITES, Site())), {}, restored={"lap": 1}
    )
    with pytest.raises(CheckpointError, match="not a cross-site evaluation state"):
        asyncio.run(CrossSiteEval(models="local").run(ctx))
