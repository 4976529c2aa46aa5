"""``flare.patch(trainer)`` task by task: a real Trainer against an in-memory site session."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

import pytest
import torch
from lightning_parts import (  # type: ignore[import-not-found]
    LIGHTNING_WARNINGS,
    TinyClassifier,
    make_trainer,
    site_loaders,
)
from torch import nn

import fedcell.client as flare
from fedcell.client.lightning import FLCallback, RestoreState
from fedcell.errors import ConfigError
from fedcell.executors.script_protocol import (
    ScriptLog,
    ScriptResult,
    ScriptSession,
    ScriptTask,
    SiteInfo,
    bind_thread_session,
)
from fedcell.fl_model import FLModel

pytestmark = LIGHTNING_WARNINGS


class ScriptedSite(ScriptSession):
    """Hands out the queued tasks (``None``: the job is over) and keeps what the script sent."""

    def __init__(self, *tasks: ScriptTask | None) -> None:
        self.site_info = SiteInfo("site-1", "job-1", params_format="pytorch")
        self.tasks: queue.SimpleQueue[ScriptTask | None] = queue.SimpleQueue()
        for task in tasks:
            self.tasks.put(task)
        self.results: list[ScriptResult] = []
        self.waits = 0

    def next_task(self, timeout: float | None = None) -> ScriptTask | None:
        self.waits += 1
        return self.tasks.get(timeout=5)  # a test that waits for a task it never queued fails

    def submit(self, result: ScriptResult) -> None:
        self.results.append(result)

    def log(self, record: ScriptLog) -> None:
        pass

    def close(self) -> None:
        pass


def run_as_script(site: ScriptedSite | None, script: Callable[[], None]) -> None:
    """Run ``script`` on its own thread bound to ``site`` (if any), as a ScriptRunner would, so
    the Client-API state ``flare.init()`` keeps per thread ends with it; re-raise its error."""
    errors: list[BaseException] = []

    def body() -> None:
        bind_thread_session(site)
        try:
            script()
        except BaseException as exc:
            errors.append(exc)
        finally:
            bind_thread_session(None)

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]


def global_params(seed: int = 7) -> dict[str, torch.Tensor]:
    return TinyClassifier(seed=seed).state_dict()


def validation_loss(params: dict[str, torch.Tensor]) -> float:
    model = TinyClassifier()
    model.load_state_dict(params)
    _, loader = site_loaders("site-1")
    x, y = (torch.cat(parts) for parts in zip(*loader, strict=True))
    with torch.no_grad():
        return float(nn.functional.cross_entropy(model(x), y))


def test_evaluate_task_is_answered_with_the_global_models_validation_metrics() -> None:
    # Prepare
    site = ScriptedSite(ScriptTask("t1", "validate", FLModel(params=global_params())))
    model = TinyClassifier(seed=1)
    _, loader = site_loaders("site-1")

    def script() -> None:
        trainer = make_trainer()
        flare.patch(trainer)
        flare.receive()
        trainer.validate(model, dataloaders=loader, verbose=False)

    # Execute
    run_as_script(site, script)

    # Assert: metrics only, of the global model (two equal batches: the logged mean is exact).
    [result] = site.results
    assert result.task_id == "t1" and result.model.params is None
    assert result.model.metrics is not None
    assert result.model.metrics["val_loss"] == pytest.approx(validation_loss(global_params()))


def test_validate_after_fit_evaluates_the_local_model_and_never_waits() -> None:
    # Prepare
    site = ScriptedSite(ScriptTask("t1", "train", FLModel(params=global_params(), current_round=0)))
    model = TinyClassifier(seed=1)
    train_loader, validation_loader = site_loaders("site-1")
    after_fit: dict[str, torch.Tensor] = {}

    def script() -> None:
        trainer = make_trainer(max_epochs=1)
        flare.patch(trainer)
        flare.receive()
        trainer.fit(model, train_loader, validation_loader)
        after_fit.update({k: v.clone() for k, v in model.state_dict().items()})
        trainer.validate(model, dataloaders=validation_loader, verbose=False)

    # Execute
    run_as_script(site, script)

    # Assert: one task taken, the local model kept and sent, with what fit did.
    assert site.waits == 1
    [result] = site.results
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, after_fit[name])
        torch.testing.assert_close(result.model.params[name], after_fit[name])
    assert result.model.current_round == 0
    assert result.model.meta["NUM_STEPS_CURRENT_ROUND"] == 3  # 48 samples, batches of 16
    assert result.model.metrics is not None and result.model.metrics["train_loss"] > 0


class MetaClassifier(TinyClassifier):
    def __init__(self, meta: Any) -> None:
        super().__init__(seed=1)
        self.__fl_meta__ = meta


def test_fit_alone_takes_each_task_keeps_a_step_budget_and_stops_when_the_job_ends() -> None:
    # Prepare: a budget in steps (max_steps=min_steps=2 per round: min_steps would keep a
    # stopped fit going), no flare.receive() in the script.
    site = ScriptedSite(
        ScriptTask("t1", "train", FLModel(params=global_params(1))),
        ScriptTask("t2", "train", FLModel(params=global_params(2))),
        None,
    )
    model = MetaClassifier({"hospital": "north"})
    train_loader, validation_loader = site_loaders("site-1")
    steps: list[int] = []

    def script() -> None:
        trainer = make_trainer(max_epochs=-1, max_steps=2, min_steps=2)
        flare.patch(trainer)
        for _ in range(3):
            trainer.fit(model, train_loader, validation_loader)
            steps.append(trainer.global_step)

    # Execute
    run_as_script(site, script)

    # Assert: two rounds of 2 steps; the third fit found the job over and trained nothing.
    assert steps == [2, 4, 4]
    assert [r.task_id for r in site.results] == ["t1", "t2"]
    for result in site.results:
        assert result.model.meta == {"NUM_STEPS_CURRENT_ROUND": 2, "hospital": "north"}


def test_a_global_model_that_does_not_fit_the_module_is_named() -> None:
    params = global_params()
    params["layers.0.weight"] = torch.zeros(3, 3)
    site = ScriptedSite(ScriptTask("t1", "train", FLModel(params=params, current_round=4)))
    loaders = site_loaders("site-1")

    def script() -> None:
        trainer = make_trainer(max_epochs=1)
        flare.patch(trainer)
        trainer.fit(TinyClassifier(), *loaders)

    with pytest.raises(ConfigError, match=r"global model of round 4 does not fit TinyClassifier"):
        run_as_script(site, script)


def test_fl_meta_must_be_a_dict() -> None:
    site = ScriptedSite(ScriptTask("t1", "train", FLModel(params=global_params())))
    loaders = site_loaders("site-1")

    def script() -> None:
        trainer = make_trainer(max_epochs=1)
        flare.patch(trainer)
        trainer.fit(MetaClassifier(["not", "a", "dict"]), *loaders)

    with pytest.raises(ConfigError, match=r"MetaClassifier.__fl_meta__ must be a dict, not list"):
        run_as_script(site, script)
    assert site.results == []


def test_patch_adds_its_callbacks_once_and_refuses_what_it_cannot_serve() -> None:
    def script() -> None:
        trainer = make_trainer()
        flare.patch(trainer)
        flare.patch(trainer)
        kinds = [type(callback) for callback in trainer.callbacks]
        assert kinds.count(FLCallback) == 1 and kinds.count(RestoreState) == 1
        without_state = make_trainer()
        flare.patch(without_state, restore_state=False)
        assert not any(isinstance(c, RestoreState) for c in without_state.callbacks)
        refusal = r"takes a lightning\.pytorch \(or pytorch_lightning\) Trainer, not Linear"
        with pytest.raises(ConfigError, match=refusal):
            flare.patch(nn.Linear(2, 2))

    run_as_script(ScriptedSite(), script)


def test_patch_outside_a_fedcell_site_says_how_to_run_the_script() -> None:
    def script() -> None:
        with pytest.raises(ConfigError, match="found no fedcell site"):
            flare.patch(make_trainer())

    run_as_script(None, script)


def test_fit_for_a_task_it_does_not_answer_warns_and_sends_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    site = ScriptedSite(ScriptTask("t1", "submit_model", FLModel()))
    loaders = site_loaders("site-1")

    def script() -> None:
        trainer = make_trainer(max_epochs=1)
        flare.patch(trainer)
        trainer.fit(TinyClassifier(), *loaders)

    run_as_script(site, script)

    assert site.results == []
    assert "ran for task 'submit_model', which fit does not answer" in caplog.text


def test_a_flare_style_script_with_pytorch_lightning_and_the_lightning_import_runs() -> None:
    # Prepare: what NVIDIA FLARE's hello-lightning client does, with `nvflare` replaced by
    # `fedcell` in its import line, and the standalone pytorch_lightning distribution.
    import pytorch_lightning

    class FlareStyleNet(pytorch_lightning.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layers = TinyClassifier(seed=1).layers

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            loss = nn.functional.cross_entropy(self.layers(x), y)
            self.log("train_loss", loss)
            return loss

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            x, y = batch
            self.log("val_loss", nn.functional.cross_entropy(self.layers(x), y))

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    received = global_params(3)
    site = ScriptedSite(ScriptTask("t1", "train", FLModel(params=received, current_round=0)), None)
    train_loader, validation_loader = site_loaders("site-1")
    model = FlareStyleNet()
    at_validation: list[torch.Tensor] = []

    def script() -> None:
        import fedcell.client.lightning as flare

        flare.init()
        assert flare.get_site_name() == "site-1"
        trainer = pytorch_lightning.Trainer(
            max_epochs=1, accelerator="cpu", devices=1, logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        )
        flare.patch(trainer)
        while flare.is_running():
            input_model = flare.receive()
            assert input_model is not None and input_model.current_round == 0
            trainer.validate(model, dataloaders=validation_loader, verbose=False)
            at_validation.append(model.layers[0].weight.detach().clone())
            trainer.fit(model, train_loader, validation_loader)

    # Execute
    run_as_script(site, script)

    # Assert: the global model was validated, trained from and answered, with its metrics.
    torch.testing.assert_close(at_validation[0], received["layers.0.weight"])
    [result] = site.results
    assert result.model.meta["NUM_STEPS_CURRENT_ROUND"] == 3
    assert result.model.metrics is not None
    assert result.model.metrics["val_loss"] == pytest.approx(validation_loss(received))


class ShrinkingOptimizerClassifier(TinyClassifier):
    """Optimizes every layer in its first fit, only the last layer afterwards."""

    def __init__(self) -> None:
        super().__init__(seed=1)
        self.fits = 0

    def configure_optimizers(self) -> Any:
        self.fits += 1
        params = self.parameters() if self.fits == 1 else self.layers[2].parameters()
        return torch.optim.SGD(params, lr=0.1, momentum=0.9)


def test_optimizer_state_that_no_longer_fits_is_refused_with_the_way_out() -> None:
    site = ScriptedSite(
        ScriptTask("t1", "train", FLModel(params=global_params())),
        ScriptTask("t2", "train", FLModel(params=global_params())),
    )
    loaders = site_loaders("site-1")
    model = ShrinkingOptimizerClassifier()

    def script() -> None:
        trainer = make_trainer(max_epochs=1)
        flare.patch(trainer)
        trainer.fit(model, *loaders)
        trainer.fit(model, *loaders)

    with pytest.raises(ConfigError, match=r"does not fit what configure_optimizers\(\) returned"):
        run_as_script(site, script)
    assert [r.task_id for r in site.results] == ["t1"]
