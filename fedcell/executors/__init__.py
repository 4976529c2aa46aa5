"""Site-side executors: what runs a task at a site.

``Executor`` and the registry live in :mod:`fedcell.executors.base`; the built-ins are
:class:`~fedcell.executors.script_runner.ScriptRunner` (Client-API scripts, thread or process),
:class:`~fedcell.executors.numpy_executor.NumpyExecutor` (a numpy function) and
:class:`~fedcell.executors.torch_executor.TorchExecutor` (a PyTorch model and train function).
``TorchExecutor`` is resolved on first access so that importing this package never imports torch.
"""

from __future__ import annotations

from typing import Any

from fedcell.executors.base import (
    ENTRY_POINT_GROUP,
    Executor,
    SiteContext,
    get_executor_class,
    register_executor,
    run_task,
)
from fedcell.executors.numpy_executor import NumpyExecutor
from fedcell.executors.script_runner import ScriptRunner

__all__ = [
    "ENTRY_POINT_GROUP",
    "Executor",
    "NumpyExecutor",
    "ScriptRunner",
    "SiteContext",
    "TorchExecutor",
    "get_executor_class",
    "register_executor",
    "run_task",
]


def __getattr__(name: str) -> Any:
    if name == "TorchExecutor":
        return get_executor_class("torch")
    raise AttributeError(f"module 'fedcell.executors' has no attribute {name!r}")
