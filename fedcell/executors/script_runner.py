"""``ScriptRunner``: run a Client-API training script (``import fedcell.client as flare``) as a
site's executor.

The script is started once per job, at :meth:`ScriptRunner.start`, and serves every task of the
job from its ``while flare.is_running():`` loop; :meth:`ScriptRunner.stop` makes
``flare.is_running()`` return ``False`` so the script ends by itself. Two modes, one contract
(:mod:`fedcell.executors.script_protocol`):

``mode="thread"``
    The script runs on a thread of the site process (:mod:`fedcell.executors.script_thread`).
    No serialization, no extra process: the fastest path and the simulator's default. The
    script shares the process with the site, so it cannot be killed if it hangs.
``mode="subprocess"``
    The script runs as a child Python process that reaches its site over a private local cell
    after presenting a random token (:mod:`fedcell.executors.script_process`). A script that
    segfaults or leaks memory takes only itself down; the site reports *crashed* and keeps
    serving.

Outcomes: a script that raises makes its task *failed* with the traceback; a script that exits
or dies without answering makes it *crashed* (see :func:`fedcell.executors.base.run_task`).
Its stdout/stderr lines and ``flare.log`` records go to the site log.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fedcell.engine.dispatcher import Task
from fedcell.errors import ConfigError
from fedcell.executors.base import Executor, SiteContext
from fedcell.executors.params import PARAMS_FORMATS, ParamsFormat
from fedcell.executors.script_protocol import SiteInfo
from fedcell.fl_model import FLModel

__all__ = ["ScriptRunner"]


@dataclass
class ScriptRunner(Executor):
    """Runs a Client-API script for the life of a job.

    Attributes
    ----------
    script:
        The script file; a relative path is resolved against the site's job workspace when one
        is given, else against the current directory.
    args:
        Its command-line arguments (``sys.argv[1:]`` as the script sees it).
    mode:
        ``"thread"`` (in the site process) or ``"subprocess"`` (a child process over a local
        cell).
    params_format:
        How ``flare.receive()`` hands params over: ``"pytorch"`` tensors (default),
        ``"numpy"`` arrays, or ``"native"`` (as they travelled). Results go back as sent.
    train_task, evaluate_task, submit_model_task:
        Task names answered, and what ``flare.is_train()``/``is_evaluate()``/
        ``is_submit_model()`` compare against.
    config:
        Extra entries for ``flare.get_config()`` (wire-encodable values).
    stop_grace:
        Seconds the script gets to end after the job ends; a child process is then killed.
    """

    script: str | Path = "train.py"
    args: list[str] = field(default_factory=list)
    mode: Literal["thread", "subprocess"] = "thread"
    params_format: ParamsFormat = "pytorch"
    train_task: str = "train"
    evaluate_task: str = "validate"
    submit_model_task: str = "submit_model"
    config: dict[str, Any] = field(default_factory=dict)
    stop_grace: float = 10.0
    _host: Any = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.mode not in ("thread", "subprocess"):
            raise ConfigError(f"ScriptRunner mode must be 'thread' or 'subprocess', not {self.mode!r}")
        if self.params_format not in PARAMS_FORMATS:
            raise ConfigError(
                f"ScriptRunner params_format must be one of {', '.join(PARAMS_FORMATS)}, "
                f"not {self.params_format!r}"
            )
        if not all(isinstance(a, str) for a in self.args):
            raise ConfigError(f"ScriptRunner args must be strings, got {self.args!r}")

    @property
    def task_names(self) -> tuple[str, ...]:
        return (self.train_task, self.evaluate_task, self.submit_model_task)

    def _resolve_script(self, site: SiteContext) -> Path:
        path = Path(self.script)
        if not path.is_absolute() and site.workspace is not None:
            path = site.workspace / path
        if not path.is_file():
            raise ConfigError(f"ScriptRunner script {str(path)!r} does not exist or is not a file")
        return path

    async def start(self, site: SiteContext) -> None:
        """Launch the script.

        Raises
        ------
        ConfigError
            If the script file is missing or the runner is already started.
        ConnectError
            If process mode cannot open its local cell.
        """
        if self._host is not None:
            raise ConfigError("ScriptRunner.start() called twice; stop() it first")
        path = self._resolve_script(site)
        info = SiteInfo(
            site_name=site.site_name,
            job_id=site.job_id,
            params_format=self.params_format,
            train_task=self.train_task,
            evaluate_task=self.evaluate_task,
            submit_model_task=self.submit_model_task,
            config=dict(self.config),
        )
        if self.mode == "thread":
            from fedcell.executors.script_thread import ThreadScriptHost

            host: Any = ThreadScriptHost(path, list(self.args), info, site.logger)
        else:
            from fedcell.executors.script_process import ProcessScriptHost

            host = ProcessScriptHost(path, list(self.args), info, site.logger)
        await host.start()
        self._host = host

    async def execute(self, task: Task) -> FLModel:
        """Hand ``task`` to the script and return what it sends back.

        Raises
        ------
        ConfigError
            If the runner is not started, the task name is not one it answers, or the task's
            data is not an FLModel.
        TaskFailedError
            If the script raised (the message holds its traceback).
        SiteCrashedError
            If the script ended, or its process died, without answering.
        """
        if self._host is None:
            raise ConfigError("ScriptRunner.execute() before start()")
        if task.name not in self.task_names:
            raise ConfigError(
                f"ScriptRunner answers tasks {', '.join(self.task_names)}, not {task.name!r}"
            )
        model: FLModel = await self._host.exchange.run_task(task)
        return model

    async def stop(self) -> None:
        """End the script (``flare.is_running()`` turns ``False``); idempotent."""
        host, self._host = self._host, None
        if host is not None:
            await host.stop(self.stop_grace)
