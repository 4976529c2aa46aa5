"""The state behind the Client-API facade: one :class:`ClientAPI` per running script.

It adapts a :class:`~fedcell.executors.script_protocol.ScriptSession` (tasks in, results out) to
the calls NVIDIA FLARE scripts make, with FLARE's semantics:

- ``receive()`` returns the current task's model, waiting for a task if none is held; it keeps
  returning the same model until ``send()`` answers it; ``None`` once the job is over (or on a
  ``timeout``).
- ``is_running()`` waits for the next task (the usual ``while flare.is_running():`` loop blocks
  there between rounds) and is ``False`` once the site has no more work.
- ``send(model)`` answers the current task; the result's ``current_round`` defaults to the
  task's and ``params_type`` to ``FULL``. ``clear_cache=False`` keeps the model for later
  ``receive()`` calls.
- ``is_train()``/``is_evaluate()``/``is_submit_model()`` compare the current task's name with the
  executor's configured names (``train``/``validate``/``submit_model`` by default).

Params reach the script in the executor's ``params_format`` (:mod:`fedcell.executors.params`):
torch tensors for ``"pytorch"``, numpy arrays for ``"numpy"``, as they travelled for
``"native"``. Results go back as the script sent them.
"""

from __future__ import annotations

import enum
from dataclasses import replace
from typing import Any

from fedcell.errors import ConfigError, RequestTimeoutError
from fedcell.executors.params import convert_params
from fedcell.executors.script_protocol import ScriptLog, ScriptResult, ScriptSession, ScriptTask
from fedcell.fl_model import FLModel, ParamsType

__all__ = ["AnalyticsDataType", "ClientAPI"]


class AnalyticsDataType(str, enum.Enum):
    """What ``flare.log`` records, as NVIDIA FLARE names it."""

    SCALARS = "SCALARS"
    SCALAR = "SCALAR"
    IMAGE = "IMAGE"
    TEXT = "TEXT"
    METRIC = "METRIC"
    METRICS = "METRICS"
    PARAMETER = "PARAMETER"
    PARAMETERS = "PARAMETERS"
    TAG = "TAG"
    TAGS = "TAGS"

    def __str__(self) -> str:
        return self.value


class ClientAPI:
    """One script's view of its site: the current task, and the calls of ``fedcell.client``.

    Parameters
    ----------
    session:
        The script's end of the exchange with its executor.
    rank:
        The process rank, kept for FLARE compatibility: a ScriptRunner serves one script
        process, so multi-process (``torchrun``) scripts are not supported yet.
    """

    def __init__(self, session: ScriptSession, rank: str | None = None) -> None:
        self._session = session
        self._info = session.site_info
        self.rank = rank
        self._task: ScriptTask | None = None
        self._model: FLModel | None = None
        self._over = False

    def receive(self, timeout: float | None = None) -> FLModel | None:
        if self._model is not None:
            return self._model
        if self._over:
            return None
        try:
            task = self._session.next_task(timeout)
        except RequestTimeoutError:
            return None
        if task is None:
            self._over = True
            self._task = None
            return None
        model = task.model
        self._task = task
        self._model = replace(model, params=convert_params(model.params, self._info.params_format))
        return self._model

    def send(self, model: FLModel, clear_cache: bool = True) -> None:
        if not isinstance(model, FLModel):
            raise ConfigError(f"flare.send() takes an FLModel, not {type(model).__name__}")
        if self._task is None:
            raise ConfigError(
                "flare.send() has no task to answer: call flare.receive() (or "
                "flare.is_running()) first"
            )
        result = model
        if result.current_round is None:
            result = replace(result, current_round=self._task.model.current_round)
        if result.params_type is None and result.params is not None:
            result = replace(result, params_type=ParamsType.FULL)
        self._session.submit(ScriptResult(self._task.task_id, result))
        if clear_cache:
            self._task = None
            self._model = None

    def clear(self) -> None:
        self._task = None
        self._model = None

    def is_running(self) -> bool:
        self.receive()
        return self._model is not None

    def _current_task_is(self, name: str) -> bool:
        return self._task is not None and self._task.name == name

    def is_train(self) -> bool:
        return self._current_task_is(self._info.train_task)

    def is_evaluate(self) -> bool:
        return self._current_task_is(self._info.evaluate_task)

    def is_submit_model(self) -> bool:
        return self._current_task_is(self._info.submit_model_task)

    def get_task_name(self) -> str | None:
        return self._task.name if self._task is not None else None

    def get_site_name(self) -> str:
        return self._info.site_name

    def get_job_id(self) -> str:
        return self._info.job_id

    def system_info(self) -> dict[str, Any]:
        return {"site_name": self._info.site_name, "job_id": self._info.job_id}

    def get_config(self) -> dict[str, Any]:
        return {
            **self._info.config,
            "site_name": self._info.site_name,
            "job_id": self._info.job_id,
            "params_format": self._info.params_format,
            "train_task": self._info.train_task,
            "evaluate_task": self._info.evaluate_task,
            "submit_model_task": self._info.submit_model_task,
        }

    def log(self, key: str, value: Any, data_type: AnalyticsDataType | str, **extras: Any) -> None:
        self._session.log(ScriptLog(key, value, str(data_type), dict(extras)))
