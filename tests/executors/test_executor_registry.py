"""Executors by name: built-ins (lazy), run-time registrations, errors."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, fields

import pytest

from fedcell.engine.dispatcher import Task
from fedcell.errors import ConfigError
from fedcell.executors import (
    Executor,
    NumpyExecutor,
    ScriptRunner,
    get_executor_class,
    register_executor,
)


@dataclass
class EchoExecutor(Executor):
    @property
    def task_names(self) -> tuple[str, ...]:
        return ("echo",)

    async def execute(self, task: Task) -> object:
        return task.data


def test_builtins_resolve_by_name() -> None:
    assert get_executor_class("script") is ScriptRunner
    assert get_executor_class("numpy") is NumpyExecutor
    assert get_executor_class("torch").__name__ == "TorchExecutor"


def test_registration_and_conflicts() -> None:
    register_executor("test-echo", EchoExecutor)
    register_executor("test-echo", EchoExecutor)  # the same class again is fine
    assert get_executor_class("test-echo") is EchoExecutor
    with pytest.raises(ConfigError, match="already registered"):
        register_executor("test-echo", NumpyExecutor)
    with pytest.raises(ConfigError, match="not a fedcell Executor"):
        register_executor("test-bad", dict)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"no executor named 'nope'.*numpy"):
        get_executor_class("nope")


def test_executors_are_dataclasses_whose_fields_are_their_configuration() -> None:
    runner = ScriptRunner(script="train.py", args=["--epochs", "2"], mode="subprocess")
    exported = {f.name: getattr(runner, f.name) for f in fields(runner) if f.init}
    assert ScriptRunner(**exported) == runner
    assert "_host" not in repr(runner)


@pytest.mark.integration
def test_importing_executors_does_not_import_torch() -> None:
    probe = "import sys, fedcell.executors; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
