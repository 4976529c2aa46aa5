"""Executors: the site-side half of a task, and the registry that names them.

The interface a site runtime drives — :class:`Executor`, :class:`SiteContext` and
:func:`run_task` (an executor's outcome → ``ok``/``failed``/``crashed``) — is defined in
:mod:`fedcell.engine.executor` (the engine depends on it) and re-exported here for executor
authors.

Executors are dataclasses: their fields are their whole configuration, so a job can export and
rebuild them (the job folder format is the engine's business) and ``repr`` shows what runs.
``execute`` must never block the event loop: user code runs on a worker thread or in another
process.

Lookup by name (for job files and the CLI) goes through :func:`get_executor_class`: built-ins are
listed in :data:`BUILTINS` and imported on first use (so ``import fedcell.executors`` does not
import torch), third parties register through the entry-point group ``fedcell.executors``
(``name = "package.module:ExecutorClass"``) or at run time with :func:`register_executor`.
Nothing scans folders.
"""

from __future__ import annotations

import importlib
import traceback
from importlib.metadata import entry_points
from typing import Any

from fedcell.engine.dispatcher import Task
from fedcell.engine.executor import Executor, SiteContext, run_task
from fedcell.errors import ConfigError, TaskFailedError
from fedcell.fl_model import FLModel

__all__ = [
    "BUILTINS",
    "ENTRY_POINT_GROUP",
    "Executor",
    "SiteContext",
    "get_executor_class",
    "register_executor",
    "run_task",
    "task_config",
    "task_model",
    "user_code_failed",
]

ENTRY_POINT_GROUP = "fedcell.executors"

#: name -> "module:Class" of the built-in executors (imported lazily).
BUILTINS: dict[str, str] = {
    "script": "fedcell.executors.script_runner:ScriptRunner",
    "numpy": "fedcell.executors.numpy_executor:NumpyExecutor",
    "torch": "fedcell.executors.torch_executor:TorchExecutor",
}

_registered: dict[str, type[Executor]] = {}


def task_model(task: Task) -> FLModel:
    """The FLModel a task carries.

    Raises
    ------
    ConfigError
        If the task's data is not an FLModel.
    """
    if not isinstance(task.data, FLModel):
        raise ConfigError(f"task {task.name!r} carries {type(task.data).__name__}, not an FLModel")
    return task.data


def task_config(task: Task, model: FLModel) -> dict[str, Any]:
    """What a training function gets as ``config``: task props plus the round counters."""
    return {
        **task.props,
        "current_round": model.current_round,
        "total_rounds": model.total_rounds,
    }


def user_code_failed(what: str, exc: BaseException) -> TaskFailedError:
    """A TaskFailedError whose message carries ``exc``'s traceback."""
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return TaskFailedError(f"{what} raised:\n{text}")


def register_executor(name: str, executor_cls: type[Executor], *, replace: bool = False) -> None:
    """Make ``executor_cls`` available as ``name``.

    Raises
    ------
    ConfigError
        If ``name`` is taken by another class and ``replace`` is false, or the class is not an
        :class:`Executor`.
    """
    if not (isinstance(executor_cls, type) and issubclass(executor_cls, Executor)):
        raise ConfigError(f"{executor_cls!r} is not a fedcell Executor subclass")
    existing = _registered.get(name)
    if existing is not None and existing is not executor_cls and not replace:
        raise ConfigError(f"executor name {name!r} is already registered to {existing.__name__}")
    _registered[name] = executor_cls


def _load(spec: str) -> type[Executor]:
    module_name, _, attr = spec.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"cannot load executor {spec}: {exc}") from exc
    if not (isinstance(cls, type) and issubclass(cls, Executor)):
        raise ConfigError(f"{spec} is not a fedcell Executor subclass")
    return cls


def get_executor_class(name: str) -> type[Executor]:
    """The executor class registered as ``name`` (run-time, built-in, then entry point).

    Raises
    ------
    ConfigError
        If no executor has that name, or its entry point does not load.
    """
    if name in _registered:
        return _registered[name]
    spec = BUILTINS.get(name)
    if spec is None:
        spec = next((ep.value for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name), None)
    if spec is None:
        known = ", ".join(sorted(set(BUILTINS) | set(_registered)))
        raise ConfigError(f"no executor named {name!r} (known: {known})")
    cls = _load(spec)
    _registered[name] = cls
    return cls
