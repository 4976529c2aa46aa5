"""The Client API: ``import fedcell.client as flare``.

A training script written for NVIDIA FLARE's Client API runs on fedcell with only its import
line changed::

    import fedcell.client as flare

    flare.init()
    while flare.is_running():
        input_model = flare.receive()            # FLModel: params, current_round, meta ...
        net.load_state_dict(input_model.params)
        ...train...
        flare.send(flare.FLModel(params=net.state_dict(), metrics={"accuracy": acc},
                                 meta={"NUM_STEPS_CURRENT_ROUND": steps}))

This module is a synchronous facade at the edge of an asyncio system: every call blocks only the
script's own thread. The script is run by a :class:`~fedcell.executors.script_runner.ScriptRunner`
executor, either on a thread of the site process or as a child process; ``init()`` finds out which:

1. a session bound to the calling thread (thread mode) gives this thread its own state, so the
   simulator can run many sites' scripts in one process;
2. otherwise the ``FEDCELL_SCRIPT_*`` environment a ScriptRunner gives its child (process mode)
   makes ``init()`` connect to the site over a local cell and present its token;
3. otherwise the script is not running under fedcell, and ``init()`` says how to run it.

Calling anything else before ``init()`` raises :class:`~fedcell.errors.ConfigError` saying so.
Importing this module is cheap (no torch, no sockets): it must stay under 0.3 s because it sits
at the top of every training script. Semantics of each call: :mod:`fedcell.client.api`.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from fedcell.client.api import AnalyticsDataType, ClientAPI
from fedcell.errors import ConfigError
from fedcell.executors.script_protocol import ENV_URL, thread_session
from fedcell.fl_model import FLModel, ParamsType

__all__ = [
    "AnalyticsDataType",
    "FLModel",
    "ParamsType",
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

_logger = logging.getLogger("fedcell.client")
_thread_state = threading.local()
_process_api: ClientAPI | None = None
_process_lock = threading.Lock()

_HOW_TO_RUN = (
    "run this script through a fedcell job: give it to a ScriptRunner executor "
    "(fedcell.executors.ScriptRunner(script='train.py')) and run the job in the simulator or on "
    "a site, rather than starting it with `python train.py`"
)


def _current() -> ClientAPI:
    api: ClientAPI | None = getattr(_thread_state, "api", None) or _process_api
    if api is None:
        raise ConfigError(
            "the fedcell Client API is not initialized: call flare.init() at the start of the "
            f"script, and {_HOW_TO_RUN}"
        )
    return api


def init(rank: str | int | None = None) -> None:
    """Connect this script to the fedcell site running it. A second call is ignored.

    Parameters
    ----------
    rank:
        The process rank in multi-process training (``RANK`` from the environment by default).

    Raises
    ------
    ConfigError
        If the script is not running under a fedcell ScriptRunner.
    AuthenticationError
        If the site refuses this process's token (process mode).
    ConnectError
        If the site cannot be reached (process mode).
    """
    global _process_api
    rank_name = str(rank) if rank is not None else os.environ.get("RANK", "0")
    session = thread_session()
    if session is not None:
        if getattr(_thread_state, "api", None) is not None:
            _logger.warning("flare.init() called more than once; later calls are ignored")
            return
        _thread_state.api = ClientAPI(session, rank_name)
        return
    with _process_lock:
        if _process_api is not None:
            _logger.warning("flare.init() called more than once; later calls are ignored")
            return
        if ENV_URL not in os.environ:
            raise ConfigError(f"flare.init() found no fedcell site to serve: {_HOW_TO_RUN}")
        from fedcell.executors.script_process import connect_script_session

        _process_api = ClientAPI(connect_script_session(), rank_name)


def receive(timeout: float | None = None) -> FLModel | None:
    """The current task's model; waits for the next task if none is held.

    Returns ``None`` once the job is over or when ``timeout`` seconds pass without a task.

    Raises
    ------
    ConfigError
        If ``init()`` was not called.
    """
    return _current().receive(timeout)


def send(model: FLModel, clear_cache: bool = True) -> None:
    """Answer the current task with ``model``.

    Raises
    ------
    ConfigError
        If ``init()`` was not called, ``model`` is not an FLModel, or no task is held.
    """
    _current().send(model, clear_cache)


def clear() -> None:
    """Forget the current task's model without answering it."""
    _current().clear()


def is_running() -> bool:
    """Wait for the next task; ``False`` once the site has no more work for this script."""
    return _current().is_running()


def is_train() -> bool:
    """Whether the current task is the training task."""
    return _current().is_train()


def is_evaluate() -> bool:
    """Whether the current task is the evaluation task."""
    return _current().is_evaluate()


def is_submit_model() -> bool:
    """Whether the current task asks the script to submit its (best) model."""
    return _current().is_submit_model()


def get_task_name() -> str | None:
    """The current task's name, or ``None`` when no task is held."""
    return _current().get_task_name()


def get_site_name() -> str:
    """This site's name."""
    return _current().get_site_name()


def get_job_id() -> str:
    """The running job's id."""
    return _current().get_job_id()


def system_info() -> dict[str, Any]:
    """``{"site_name": ..., "job_id": ...}``."""
    return _current().system_info()


def get_config() -> dict[str, Any]:
    """The executor's configuration for this script (user ``config`` plus site and task names)."""
    return _current().get_config()


def log(key: str, value: Any, data_type: AnalyticsDataType | str, **kwargs: Any) -> None:
    """Send a tracking record (``flare.log("loss", 0.3, AnalyticsDataType.SCALAR, global_step=5)``)
    to the site log."""
    _current().log(key, value, data_type, **kwargs)


def patch(trainer: Any, restore_state: bool = True, load_state_dict_strict: bool = True) -> None:
    """Make a PyTorch Lightning ``Trainer`` load each round's global model and send its result.

    Calls ``init()`` unless the script did; Lightning is imported only here. Semantics:
    :mod:`fedcell.client.lightning`.

    Raises
    ------
    ConfigError
        If ``trainer`` is not a Lightning ``Trainer``, spans several processes, Lightning is
        not installed, or the script is not running under a fedcell ScriptRunner.
    """
    try:
        from fedcell.client.lightning import patch as patch_lightning_trainer
    except ImportError as exc:
        raise ConfigError(
            f"flare.patch() needs PyTorch Lightning: pip install 'fedcell[lightning]' ({exc})"
        ) from exc
    patch_lightning_trainer(trainer, restore_state, load_state_dict_strict)
