"""PyTorch Lightning on the Client API: ``flare.patch(trainer)``.

A Lightning script becomes federated with one call and the usual loop::

    import fedcell.client as flare

    trainer = Trainer(max_epochs=2, ...)
    flare.patch(trainer)                 # calls flare.init() if the script did not
    while flare.is_running():
        input_model = flare.receive()
        trainer.validate(model, datamodule=dm)   # evaluates the received global model
        trainer.fit(model, datamodule=dm)        # trains from it, then sends the result

``patch`` appends two callbacks to the trainer, as NVIDIA FLARE's ``flare.patch`` does, so a
FLARE Lightning script runs with only its import line changed: this module also carries the
Client API (``import fedcell.client.lightning as flare`` mirrors ``import
nvflare.client.lightning as flare``), and Trainers of both Lightning distributions
(``lightning.pytorch`` and the standalone ``pytorch_lightning`` FLARE's examples use) are served.

:class:`FLCallback` moves models between the trainer and the task the Client API holds:

- ``trainer.fit`` starts from the global model: at ``on_fit_start`` (after the optimizers are
  built, before the sanity check and the fit loop) the held task's params are loaded into the
  LightningModule in place, so the optimizers keep pointing at the same tensors. If no task is
  held, fit waits for one (``flare.receive()``), so a script that only calls ``fit`` in a loop
  works too; once the job is over, fit returns without training. A fit for a task of another
  kind is not answered (a warning says so).
- after fit (``on_fit_end``), a *train* task is answered with the module's ``state_dict()``,
  the trainer's logged values (``trainer.callback_metrics``) as metrics and
  ``meta["NUM_STEPS_CURRENT_ROUND"]``: the optimizer steps this fit took (what FedAvg weighs
  by), plus whatever the module keeps in a ``__fl_meta__`` dict. These two hooks run on every
  ``fit``, even one whose loop has nothing to do (``on_train_start``, FLARE's choice, is
  skipped then, and the round would never be answered).
- the first ``trainer.validate`` of a task (before fit) loads and evaluates the global model;
  its metrics are the ones sent for the task (they win over same-named metrics of the locally
  trained model, as in FLARE: controllers select and stop on the global model's scores). For an
  *evaluate* task they are the whole answer. Any later ``validate`` (or one with no task held)
  evaluates the module as it is and never waits.
- tasks of other kinds (``submit_model``) are left to the script (``flare.send``).

A task's model is recognised by identity: the Client API returns the same ``FLModel`` object from
``receive()`` until the task is answered, so "already loaded" and "already evaluated" need no
round counter that could drift from the server's.

Repeated ``fit`` calls. A Trainer counts epochs and steps over its whole life: a second
``fit`` with ``max_epochs=2`` finds two epochs done and trains nothing. The per-round budget is
therefore read once, at ``patch`` time (``max_epochs``, ``max_steps``, ``min_epochs``,
``min_steps``), and every later ``fit`` moves the limits to *done so far + budget* at
``on_fit_start``, before the fit loop checks them. FLARE bumps the limits after each round from
``estimated_stepping_batches`` instead; counting the steps actually taken keeps
``NUM_STEPS_CURRENT_ROUND`` exact, and keeping the counters running (rather than resetting the
loop) keeps logger steps, epoch-based LR schedules and checkpoint names monotonic across rounds.
The sanity-check validation runs in the first fit only.

:class:`RestoreState` carries the optimizers', LR schedulers' and precision plugin's (AMP grad
scaler) state from one fit to the next: each ``fit`` builds fresh optimizers through
``configure_optimizers()``, which would otherwise drop momentum and schedules every round.

One training process per site: a trainer spanning several processes (DDP) is refused, because
the Client API serves one process per script.

This module imports Lightning and torch; ``fedcell.client`` imports it only when ``patch`` is
called, so ``import fedcell.client`` stays cheap.
"""

from __future__ import annotations

import copy
import logging
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn

import fedcell.client as flare

# FLARE's Lightning scripts call the whole Client API through ``import nvflare.client.lightning as
# flare``; the same names are here, so ``import fedcell.client.lightning as flare`` works as well.
from fedcell.client import (
    AnalyticsDataType,
    FLModel,
    ParamsType,
    clear,
    get_config,
    get_job_id,
    get_site_name,
    get_task_name,
    init,
    is_evaluate,
    is_running,
    is_submit_model,
    is_train,
    log,
    receive,
    send,
    system_info,
)
from fedcell.client.api import ClientAPI
from fedcell.errors import ConfigError

if TYPE_CHECKING:
    import pytorch_lightning

    #: A Trainer of either Lightning distribution.
    AnyTrainer = Trainer | pytorch_lightning.Trainer

__all__ = [
    "FL_META_KEY",
    "NUM_STEPS_CURRENT_ROUND",
    "AnalyticsDataType",
    "FLCallback",
    "FLModel",
    "ParamsType",
    "RestoreState",
    "clear",
    "get_config",
    "get_job_id",
    "get_site_name",
    "get_task_name",
    "init",
    "is_evaluate",
    "is_running",
    "is_submit_model",
    "is_train",
    "log",
    "patch",
    "receive",
    "send",
    "system_info",
]

#: The two distributions of Lightning: the ``lightning`` package and the standalone
#: ``pytorch_lightning`` (what FLARE's examples import). Both are installed together; their
#: Trainers call callbacks by hook name, so one callback class serves both.
_LIGHTNING_PACKAGES = ("lightning.pytorch", "pytorch_lightning")

#: Attribute of a LightningModule whose dict is added to the meta of every train result.
FL_META_KEY = "__fl_meta__"
#: Meta key of the optimizer steps a train result took (FedAvg's default weight).
NUM_STEPS_CURRENT_ROUND = "NUM_STEPS_CURRENT_ROUND"

_logger = logging.getLogger("fedcell.client.lightning")


def patch(
    trainer: AnyTrainer,
    restore_state: bool = True,
    load_state_dict_strict: bool = True,
) -> None:
    """Make ``trainer`` exchange models with the fedcell site, round after round.

    Initializes the Client API (``flare.init()``) unless the script did, then appends an
    :class:`FLCallback` (and a :class:`RestoreState`) to ``trainer.callbacks``. A second call
    on the same trainer changes nothing.

    Parameters
    ----------
    trainer:
        The ``Trainer`` the script trains with (``lightning.pytorch`` or ``pytorch_lightning``).
    restore_state:
        Carry optimizer, LR-scheduler and grad-scaler state from each fit to the next.
    load_state_dict_strict:
        The ``strict`` argument of ``load_state_dict`` when the global model is loaded: with
        ``False``, params missing on either side are skipped.

    Raises
    ------
    ConfigError
        If ``trainer`` is not a Lightning ``Trainer``, spans several processes, or the script
        is not running under a fedcell ScriptRunner.
    """
    if not _is_trainer(trainer):
        raise ConfigError(
            "flare.patch() takes a lightning.pytorch (or pytorch_lightning) Trainer, not "
            f"{type(trainer).__name__}"
        )
    if trainer.world_size > 1:
        raise ConfigError(
            f"flare.patch(): the trainer spans {trainer.world_size} processes; fedcell's Client "
            "API serves one training process per site script (use one device, or strategy "
            "'auto' on a single GPU)"
        )
    callbacks: list[Callback] = trainer.callbacks  # type: ignore[union-attr]  # set in __init__
    if not any(isinstance(callback, FLCallback) for callback in callbacks):
        callbacks.append(FLCallback(_client_api(), trainer, load_state_dict_strict))
    if restore_state and not any(isinstance(callback, RestoreState) for callback in callbacks):
        callbacks.append(RestoreState())


def _is_trainer(candidate: object) -> bool:
    for package in _LIGHTNING_PACKAGES:
        module = sys.modules.get(package)  # a Trainer of a package implies it is imported
        if module is not None and isinstance(candidate, module.Trainer):
            return True
    return False


def _client_api() -> ClientAPI:
    try:
        return flare._current()
    except ConfigError:
        flare.init()
        return flare._current()


@dataclass(frozen=True)
class _RoundBudget:
    """A fit's limits as the trainer was configured (-1 or ``None``: no limit)."""

    max_epochs: int | None
    max_steps: int
    min_epochs: int | None
    min_steps: int | None

    @classmethod
    def of(cls, trainer: AnyTrainer) -> _RoundBudget:
        fit_loop = trainer.fit_loop
        return cls(
            fit_loop.max_epochs,
            fit_loop.epoch_loop.max_steps,
            fit_loop.min_epochs,
            fit_loop.epoch_loop.min_steps,
        )

    def apply_after(self, trainer: Trainer, epochs_done: int, steps_done: int) -> None:
        """Set the trainer's limits to this budget on top of what is already done."""
        fit_loop = trainer.fit_loop
        fit_loop.max_epochs = _shifted(self.max_epochs, epochs_done)
        fit_loop.epoch_loop.max_steps = _shifted(self.max_steps, steps_done)
        fit_loop.min_epochs = _shifted(self.min_epochs, epochs_done)
        fit_loop.epoch_loop.min_steps = _shifted(self.min_steps, steps_done)


def _shifted(limit: Any, done: int) -> Any:
    return limit if limit is None or limit < 0 else done + limit


def _scalar_metrics(logged: Mapping[str, Any]) -> dict[str, float]:
    """The one-element values of ``logged`` (``trainer.callback_metrics``) as floats."""
    metrics: dict[str, float] = {}
    for name, value in logged.items():
        if isinstance(value, torch.Tensor):
            if value.numel() == 1:
                metrics[name] = float(value.item())
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            metrics[name] = float(value)
    return metrics


class FLCallback(Callback):
    """Loads each task's global model into the LightningModule and answers the task.

    See the module notes for when models are loaded, evaluated and sent.

    Parameters
    ----------
    api:
        The script's Client API.
    trainer:
        The trainer whose configured limits make the per-round budget.
    load_state_dict_strict:
        ``strict`` for ``load_state_dict`` of the global model.
    """

    def __init__(
        self, api: ClientAPI, trainer: AnyTrainer, load_state_dict_strict: bool = True
    ) -> None:
        super().__init__()
        self._api = api
        self._budget = _RoundBudget.of(trainer)
        self._strict = load_state_dict_strict
        self._loaded: FLModel | None = None  # the task model last loaded into the module
        self._evaluating: FLModel | None = None  # validated now: its metrics are the global's
        self._global_metrics: tuple[FLModel, dict[str, float]] | None = None
        self._fit_start_step = 0

    def _held_model(self) -> FLModel | None:
        """The held task's model, without waiting when none is held."""
        if self._api.get_task_name() is None:
            return None
        return self._api.receive()

    def _load(self, pl_module: LightningModule, model: FLModel) -> None:
        self._loaded = model
        if model.params:
            try:
                pl_module.load_state_dict(model.params, strict=self._strict)
            except (RuntimeError, TypeError) as exc:
                raise ConfigError(
                    f"the global model of round {model.current_round} does not fit "
                    f"{type(pl_module).__name__}: {exc}"
                ) from exc

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.current_epoch or trainer.global_step:
            trainer.num_sanity_val_steps = 0
        model = self._held_model() or self._api.receive()
        if model is None:
            _logger.info("no task left for trainer.fit(): the job is over, nothing to train")
            # A limit already reached ends the loop before its first epoch (min_epochs or
            # min_steps would overrule trainer.should_stop).
            trainer.fit_loop.max_epochs = trainer.current_epoch
            return
        self._budget.apply_after(trainer, trainer.current_epoch, trainer.global_step)
        self._load(pl_module, model)
        self._fit_start_step = trainer.global_step

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        model = self._held_model()
        if model is None:
            return
        if not self._api.is_train():
            _logger.warning(
                "trainer.fit() ran for task %r, which fit does not answer (only the train task "
                "is); answer it with trainer.validate() or flare.send()",
                self._api.get_task_name(),
            )
            return
        metrics = _scalar_metrics(trainer.callback_metrics)
        if self._global_metrics is not None and self._global_metrics[0] is model:
            metrics.update(self._global_metrics[1])
        meta = {NUM_STEPS_CURRENT_ROUND: trainer.global_step - self._fit_start_step}
        meta.update(_module_meta(pl_module))
        params = {name: value.detach().cpu() for name, value in pl_module.state_dict().items()}
        self._api.send(FLModel(params=params, metrics=metrics, meta=meta))
        self._global_metrics = None

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn != TrainerFn.VALIDATING:
            return  # validation inside fit evaluates the model being trained
        model = self._held_model()
        if model is not None and model is not self._loaded:
            self._load(pl_module, model)
            self._evaluating = model

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        model, self._evaluating = self._evaluating, None
        if model is None or trainer.state.fn != TrainerFn.VALIDATING:
            return
        metrics = _scalar_metrics(trainer.callback_metrics)
        if self._api.is_evaluate():
            self._api.send(FLModel(metrics=metrics))
        else:
            self._global_metrics = (model, metrics)


def _module_meta(pl_module: LightningModule) -> dict[str, Any]:
    meta = getattr(pl_module, FL_META_KEY, None)
    if meta is None:
        return {}
    if not isinstance(meta, dict):
        raise ConfigError(
            f"{type(pl_module).__name__}.{FL_META_KEY} must be a dict, not {type(meta).__name__}"
        )
    return meta


class RestoreState(Callback):
    """Carries optimizer, LR-scheduler and precision-plugin state from one fit to the next."""

    def __init__(self) -> None:
        super().__init__()
        self._optimizer_states: list[dict[str, Any]] = []
        self._scheduler_states: list[dict[str, Any]] = []
        self._precision_state: dict[str, Any] = {}

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._optimizer_states:
            return
        try:
            trainer.strategy.load_optimizer_state_dict(
                {"optimizer_states": self._optimizer_states}
            )
            for config, state in zip(
                trainer.lr_scheduler_configs, self._scheduler_states, strict=False
            ):
                config.scheduler.load_state_dict(state)
            if self._precision_state:
                trainer.precision_plugin.load_state_dict(self._precision_state)
        except (ValueError, KeyError, RuntimeError) as exc:
            raise ConfigError(
                "the optimizer state of the previous round does not fit what "
                f"configure_optimizers() returned this round: {exc} (flare.patch(trainer, "
                "restore_state=False) starts every round with fresh optimizers)"
            ) from exc

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._optimizer_states = [copy.deepcopy(opt.state_dict()) for opt in trainer.optimizers]
        self._scheduler_states = [
            copy.deepcopy(config.scheduler.state_dict()) for config in trainer.lr_scheduler_configs
        ]
        self._precision_state = copy.deepcopy(trainer.precision_plugin.state_dict())
