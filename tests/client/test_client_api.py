"""ClientAPI semantics (what ``fedcell.client`` calls do) against an in-memory session."""

from __future__ import annotations

import queue
from typing import Any

import numpy as np
import pytest
import torch

from fedcell.client.api import AnalyticsDataType, ClientAPI
from fedcell.errors import ConfigError, RequestTimeoutError
from fedcell.executors.params import convert_params
from fedcell.executors.script_protocol import (
    ScriptLog,
    ScriptResult,
    ScriptSession,
    ScriptTask,
    SiteInfo,
)
from fedcell.fl_model import FLModel, ParamsType


class RecordingSession(ScriptSession):
    def __init__(self, params_format: str = "native") -> None:
        self.site_info = SiteInfo(
            "site-3", "job-9", params_format=params_format, config={"lr": 0.1}
        )
        self.tasks: queue.Queue[ScriptTask | None] = queue.Queue()
        self.results: list[ScriptResult] = []
        self.logs: list[ScriptLog] = []

    def next_task(self, timeout: float | None = None) -> ScriptTask | None:
        try:
            return self.tasks.get(timeout=timeout)
        except queue.Empty:
            raise RequestTimeoutError("no task") from None

    def submit(self, result: ScriptResult) -> None:
        self.results.append(result)

    def log(self, record: ScriptLog) -> None:
        self.logs.append(record)


def task(task_id: str, name: str = "train", **fields: Any) -> ScriptTask:
    return ScriptTask(task_id, name, FLModel(**fields))


def test_receive_holds_the_task_until_send_answers_it() -> None:
    session = RecordingSession()
    api = ClientAPI(session)
    session.tasks.put(task("t1", params={"w": np.ones(2)}, current_round=4))
    session.tasks.put(task("t2", params={"w": np.zeros(2)}, current_round=5))

    first = api.receive()
    assert first is not None and api.receive() is first  # same model until answered
    api.send(FLModel(params={"w": np.full(2, 3.0)}))
    second = api.receive()

    assert [r.task_id for r in session.results] == ["t1"]
    sent = session.results[0].model
    assert sent.current_round == 4 and sent.params_type == ParamsType.FULL  # filled from the task
    assert second is not None and second.current_round == 5


def test_send_without_a_task_or_with_a_wrong_type_is_refused() -> None:
    session = RecordingSession()
    api = ClientAPI(session)
    with pytest.raises(ConfigError, match=r"call flare\.receive"):
        api.send(FLModel(params={}))
    session.tasks.put(task("t1"))
    api.receive()
    with pytest.raises(ConfigError, match="takes an FLModel, not dict"):
        api.send({"w": 1})  # type: ignore[arg-type]


def test_clear_cache_false_keeps_the_model_for_later_receives() -> None:
    session = RecordingSession()
    api = ClientAPI(session)
    session.tasks.put(task("t1", params={"w": np.ones(1)}))
    model = api.receive()
    api.send(FLModel(metrics={"loss": 1.0}), clear_cache=False)
    assert api.receive() is model
    api.clear()
    assert api.receive(timeout=0.01) is None


def test_is_running_turns_false_when_the_job_ends() -> None:
    session = RecordingSession()
    api = ClientAPI(session)
    session.tasks.put(task("t1"))
    session.tasks.put(None)

    assert api.is_running()
    api.send(FLModel(metrics={}))
    assert not api.is_running()
    assert api.receive() is None and not api.is_running()


def test_receive_timeout_returns_none_and_keeps_running() -> None:
    session = RecordingSession()
    api = ClientAPI(session)
    assert api.receive(timeout=0.01) is None
    session.tasks.put(task("t1"))
    assert api.is_running()


@pytest.mark.parametrize(
    ("name", "flags"),
    [
        ("train", (True, False, False)),
        ("validate", (False, True, False)),
        ("submit_model", (False, False, True)),
        ("custom", (False, False, False)),
    ],
)
def test_task_kind_predicates(name: str, flags: tuple[bool, bool, bool]) -> None:
    session = RecordingSession()
    api = ClientAPI(session)
    assert (api.is_train(), api.is_evaluate(), api.is_submit_model()) == (False, False, False)
    session.tasks.put(task("t1", name))
    api.receive()
    assert (api.is_train(), api.is_evaluate(), api.is_submit_model()) == flags
    assert api.get_task_name() == name


def test_site_identity_config_and_log() -> None:
    session = RecordingSession()
    api = ClientAPI(session)
    assert api.system_info() == {"site_name": "site-3", "job_id": "job-9"}
    assert (api.get_site_name(), api.get_job_id()) == ("site-3", "job-9")
    config = api.get_config()
    assert config["lr"] == 0.1 and config["train_task"] == "train"

    api.log("loss", 0.25, AnalyticsDataType.SCALAR, global_step=3)

    assert session.logs == [ScriptLog("loss", 0.25, "SCALAR", {"global_step": 3})]


def test_pytorch_format_hands_numpy_params_over_as_tensors_without_copying() -> None:
    session = RecordingSession("pytorch")
    api = ClientAPI(session)
    array = np.arange(3, dtype=np.float32)
    session.tasks.put(task("t1", params={"w": array}))
    received = api.receive()
    assert received is not None
    tensor = received.params["w"]
    assert isinstance(tensor, torch.Tensor) and tensor.dtype == torch.float32
    assert tensor.data_ptr() == array.ctypes.data


def test_numpy_format_converts_tensors_and_refuses_bfloat16() -> None:
    converted = convert_params({"w": torch.ones(2), "n": 3}, "numpy")
    assert isinstance(converted["w"], np.ndarray) and converted["n"] == 3
    with pytest.raises(ConfigError, match="'b' is a bfloat16 tensor"):
        convert_params({"b": torch.ones(2, dtype=torch.bfloat16)}, "numpy")
    with pytest.raises(ConfigError, match="params_format"):
        convert_params({}, "jax")
    assert convert_params(None, "pytorch") is None
