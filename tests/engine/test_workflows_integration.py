"""Cyclic and CrossSiteEval end to end: sites as real processes (and Client-API scripts)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from workflow_sites import DigitSite

from fedcell.controllers import CrossSiteEval, Cyclic
from fedcell.engine.job import Job
from fedcell.executors.script_runner import ScriptRunner

SITES = ["site-1", "site-2", "site-3"]

SCRIPT = '''\
import numpy as np

import fedcell.client as flare

flare.init()
digit = int(flare.get_site_name().rpartition("-")[2])
while flare.is_running():
    model = flare.receive()
    if flare.is_train():
        flare.send(flare.FLModel(params={"w": model.params["w"] * 10 + digit}))
    elif flare.is_evaluate():
        flare.send(flare.FLModel(metrics={"score": float(model.params["w"][0]) + digit}))
    elif flare.is_submit_model():
        if flare.get_config().get("share_local_model", True):
            flare.send(flare.FLModel(params={"w": np.full(1, 10.0 * digit)}))
        else:
            flare.send(flare.FLModel(meta={"refused": "site policy"}))
'''


@pytest.mark.integration
def test_cyclic_relays_a_streamed_model_hop_by_hop_through_site_processes(
    tmp_path: Path,
) -> None:
    # Prepare: 2 shuffled laps over 3 site processes; site-2 fails in lap 0, so site after it
    # must get the model of the site before it. The 8 MiB blob travels as a stream each hop
    # (site -> server -> next site: the sites have no direct link).
    job = Job("cyclic-processes")
    job.add(Cyclic(rounds=2, order="shuffle", seed=5, model="workflow_sites:initial_params"),
            name="cyclic")  # fmt: skip
    job.add_executor(DigitSite(), sites=["site-1", "site-3"])
    job.add_executor(DigitSite(fail_in_round=0), sites=["site-2"])

    # Execute
    result = job.simulate(sites=SITES, mode="processes", workspace=tmp_path)

    # Assert
    assert result.ok, result.job.reason
    out = result.job.output("cyclic")
    hops = out.meta["history"]
    orders = out.meta["orders"]
    assert [hop["site"] for hop in hops] == orders[0] + orders[1]
    assert [sorted(order) for order in orders] == [SITES, SITES]
    assert orders[0][-1] != orders[1][0]
    ok_sites = [hop["site"] for hop in hops if hop["status"] == "ok"]
    assert [hop["site"] for hop in hops if hop["status"] != "ok"] == ["site-2"]
    assert "no data this round" in next(h["error"] for h in hops if h["status"] == "failed")
    # each ok site appended its digit to what the previous ok site produced
    digits = "".join(site.rpartition("-")[2] for site in ok_sites)
    assert out.params["w"].tolist() == [float(digits)]
    np.testing.assert_array_equal(out.params["blob"][:3], np.full(3, 5.0, np.float32))
    assert out.metrics == {"trainings": 5.0}
    summary = json.loads((tmp_path / "result.json").read_text())
    assert summary["nodes"]["cyclic"]["state"] == "finished"


@pytest.mark.integration
@pytest.mark.slow  # the server notices the lost site after the 10 s peer timeout
def test_cyclic_skips_a_site_process_that_dies(tmp_path: Path) -> None:
    # Prepare: site-2's process exits while training in lap 0; it is gone for lap 1 too.
    job = Job("cyclic-lost-site")
    job.add(Cyclic(rounds=2, model="workflow_sites:initial_params"), name="cyclic")
    job.add_executor(DigitSite(), sites=["site-1", "site-3"])
    job.add_executor(DigitSite(exit_in_round=0), sites=["site-2"])

    # Execute
    result = job.simulate(sites=SITES, mode="processes", workspace=tmp_path)

    # Assert: site-3 got site-1's model both laps
    assert result.ok, result.job.reason
    out = result.job.output("cyclic")
    assert [(hop["site"], hop["status"]) for hop in out.meta["history"]] == [
        ("site-1", "ok"), ("site-2", "crashed"), ("site-3", "ok"),
    ] * 2  # fmt: skip
    assert out.params["w"].tolist() == [1313.0]


@pytest.mark.integration
def test_cross_site_eval_with_client_api_scripts_in_site_processes(tmp_path: Path) -> None:
    # Prepare: a cyclic lap produces the global model; the sites' Client-API scripts answer
    # train, validate and submit_model; site-3's script refuses to share its local model.
    script = tmp_path / "digit_script.py"
    script.write_text(SCRIPT)
    job = Job("cse-processes")
    job.add(Cyclic(initial_params={"w": [0.0]}), name="cyclic")
    job.add(CrossSiteEval(metric="score"), name="cse", after=["cyclic"])
    job.add_executor(ScriptRunner(script=script.name, params_format="numpy"),
                     sites=["site-1", "site-2"])  # fmt: skip
    job.add_executor(ScriptRunner(script=script.name, params_format="numpy",
                                  config={"share_local_model": False}), sites=["site-3"])
    job.add_file(script)

    # Execute
    result = job.simulate(sites=SITES, mode="processes", workspace=tmp_path / "run")

    # Assert: rows cyclic (w=123), site-1 (w=10), site-2 (w=20); site-3 refused
    assert result.ok, result.job.reason
    evaluation = result.job.output("cse")
    expected_w = {"cyclic": 123.0, "site-1": 10.0, "site-2": 20.0}
    assert evaluation["matrix"] == {
        model: {site: {"score": w + int(site[-1])} for site in SITES}
        for model, w in expected_w.items()
    }
    assert evaluation["missing"] == [{
        "model": "site-3", "site": "site-3", "task": "submit_model", "status": "refused",
        "error": "site policy",
    }]  # fmt: skip
    saved = tmp_path / "run" / "nodes" / "cse" / "cross_site_eval.json"
    assert json.loads(saved.read_text()) == evaluation
    summary = json.loads((tmp_path / "run" / "result.json").read_text())
    assert summary["nodes"]["cse"]["output"] == evaluation
    assert "output" not in summary["nodes"]["cyclic"]  # a model: saved as cyclic.model.npz


def test_cross_site_eval_with_a_site_runtime_executor_on_threads(tmp_path: Path) -> None:
    # The same workflow over cells in one process, with executors (not scripts) refusing.
    job = Job("cse-threads")
    job.add(Cyclic(model="workflow_sites:initial_params"), name="cyclic")
    job.add(CrossSiteEval(models="both"), name="cse", after=["cyclic"])
    job.add_executor(DigitSite(), sites=["site-1", "site-3"])
    job.add_executor(DigitSite(refuse_local_model=True), sites=["site-2"])

    result = job.simulate(sites=SITES, workspace=tmp_path)

    assert result.ok, result.job.reason
    evaluation = result.job.output("cse")
    assert list(evaluation["matrix"]) == ["cyclic", "site-1", "site-3"]
    assert evaluation["matrix"]["cyclic"]["site-2"] == {"score": 125.0}
    assert evaluation["matrix"]["site-3"]["site-1"] == {"score": 31.0}
    assert [(m["model"], m["status"]) for m in evaluation["missing"]] == [("site-2", "refused")]
