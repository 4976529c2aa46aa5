"""The exchange between a :class:`~fedcell.executors.script_runner.ScriptRunner` and the user's
Client-API script: one contract, two carriers (a thread in this process, or a child process).

Who does what::

    executor (asyncio, site side)                    script (blocking, user side)
    ─────────────────────────────                    ────────────────────────────
    ScriptExchange.run_task(task) ──ScriptTask──▶    flare.receive()   = session.next_task()
          awaits the task's future  ◀─ScriptResult─  flare.send(model) = session.submit(...)
    ScriptExchange.fail(traceback)  ◀─ScriptFailure─ the script raised
    ScriptExchange.script_ended(..) ◀── exit ──────  the thread returned / the process exited
    ScriptExchange.close()          ──── None ───▶   flare.is_running() → False

The script *pulls* tasks (``next_task`` waits until the executor has one): a script that trains
for an hour holds no open request that could time out, and a task is only ever in one place —
in the queue, or taken by the script and awaited by the executor.

:class:`ScriptExchange` is the single source of truth and lives on the executor's event loop;
only where queued tasks wait differs. :class:`LoopExchange` (process mode) queues them for a
coroutine that forwards each to the child process (:mod:`fedcell.executors.script_process`).
:class:`ThreadExchange` (thread mode) queues them in a thread-safe queue that the script's
thread takes from itself, so asking for the next task costs the event loop nothing: in the
simulator one loop serves every site, and a round trip through it per task
(``run_coroutine_threadsafe``) cost about 0.9 ms of an 8-site round (12.9 → 12.0 ms).
Results and failures reach the loop with ``call_soon_threadsafe``
(:mod:`fedcell.executors.script_thread`) or from cell handlers. So *failed* vs *crashed*, stale
results and cancellation behave the same in both modes:

- the script raised → every awaited task (and every later one) fails with
  :class:`~fedcell.errors.TaskFailedError` carrying the traceback;
- the script ended (returned, ``sys.exit``, killed) while a task was awaited, or a task arrives
  after it ended → :class:`~fedcell.errors.SiteCrashedError`;
- a task cancelled before the script took it is skipped; a result for a task nobody awaits any
  more is logged and dropped.

The script side sees a :class:`ScriptSession` (blocking calls). The executor binds one to the
script's thread (thread mode) with :func:`bind_thread_session`; ``fedcell.client.init()`` looks it
up there first, then in the environment variables :data:`ENV_URL`, :data:`ENV_TOKEN` and
:data:`ENV_CELL` that a child process inherits (process mode). Everything that crosses a process
boundary is a registered wire dataclass below, encoded by the safe codec (never pickle).
"""

from __future__ import annotations

import abc
import asyncio
import logging
import queue
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedcell.engine.dispatcher import Task
from fedcell.engine.gil_turns import SCRIPT_TURN
from fedcell.errors import ConfigError, RequestTimeoutError, SiteCrashedError, TaskFailedError
from fedcell.fl_model import FLModel
from fedcell.transports.codec import wire_type
from fedcell.transports.message import new_id

__all__ = [
    "CHANNEL",
    "ENV_CELL",
    "ENV_TOKEN",
    "ENV_URL",
    "LoopExchange",
    "ScriptExchange",
    "ScriptFailure",
    "ScriptLog",
    "ScriptResult",
    "ScriptSession",
    "ScriptTask",
    "SiteInfo",
    "ThreadExchange",
    "bind_thread_session",
    "displayed_text",
    "format_script_error",
    "thread_session",
]

#: Environment of a script child process: where its site listens, the secret it must present,
#: and the cell name it must use.
ENV_URL = "FEDCELL_SCRIPT_URL"
ENV_TOKEN = "FEDCELL_SCRIPT_TOKEN"
ENV_CELL = "FEDCELL_SCRIPT_CELL"

#: Cell channel of the process carrier; topics are the operations below.
CHANNEL = "fedcell.script"


@wire_type("fedcell.script.SiteInfo")
@dataclass(frozen=True)
class SiteInfo:
    """What the script learns at ``flare.init()``."""

    site_name: str
    job_id: str
    params_format: str = "pytorch"
    train_task: str = "train"
    evaluate_task: str = "validate"
    submit_model_task: str = "submit_model"
    config: dict[str, Any] = field(default_factory=dict)


@wire_type("fedcell.script.ScriptTask")
@dataclass(frozen=True)
class ScriptTask:
    """One task as the script receives it."""

    task_id: str
    name: str
    model: FLModel


@wire_type("fedcell.script.ScriptResult")
@dataclass(frozen=True)
class ScriptResult:
    """The script's answer to the task ``task_id``."""

    task_id: str
    model: FLModel


@wire_type("fedcell.script.ScriptFailure")
@dataclass(frozen=True)
class ScriptFailure:
    """The script raised; ``traceback`` is the formatted exception."""

    traceback: str


@wire_type("fedcell.script.ScriptLog")
@dataclass(frozen=True)
class ScriptLog:
    """One ``flare.log(key, value, data_type, **kwargs)`` record."""

    key: str
    value: Any
    data_type: str
    extras: dict[str, Any] = field(default_factory=dict)


class ScriptSession(abc.ABC):
    """The script's end of the exchange. Every call blocks the calling (script) thread only."""

    site_info: SiteInfo

    @abc.abstractmethod
    def next_task(self, timeout: float | None = None) -> ScriptTask | None:
        """Wait for the next task; ``None`` once the job is over.

        Raises
        ------
        RequestTimeoutError
            If ``timeout`` seconds passed without a task.
        """

    @abc.abstractmethod
    def submit(self, result: ScriptResult) -> None:
        """Hand a result to the executor."""

    @abc.abstractmethod
    def log(self, record: ScriptLog) -> None:
        """Pass a log record to the site."""


_binding = threading.local()


def bind_thread_session(session: ScriptSession | None) -> None:
    """Make ``session`` the one ``fedcell.client.init()`` finds on the calling thread."""
    _binding.session = session


def thread_session() -> ScriptSession | None:
    """The session bound to the calling thread, if any."""
    session: ScriptSession | None = getattr(_binding, "session", None)
    return session


def displayed_text(line: str) -> str:
    """What a terminal would show for one output line: the text after its last carriage return
    (progress bars redraw a line with ``\\r``; only its final state is worth a log record)."""
    return line.rstrip("\r").rpartition("\r")[2]


def format_script_error(exc: BaseException, script: Path) -> str:
    """The traceback of ``exc`` from the script's first frame on (the runner's frames dropped)."""
    target = str(script)
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename != target:
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb))


class ScriptExchange(abc.ABC):
    """Executor-side state of one script run; every method but :meth:`awaits` runs on the
    executor's event loop. Subclasses say where queued tasks wait for the script.

    Parameters
    ----------
    script_label:
        How error messages name the script (``"script train.py"``).
    logger:
        Where dropped results are reported.
    """

    def __init__(self, script_label: str, logger: logging.Logger) -> None:
        self._label = script_label
        self._logger = logger
        self._awaited: dict[str, tuple[str, asyncio.Future[FLModel]]] = {}
        self._failure: str | None = None
        self._end: str | None = None

    @property
    def finished(self) -> bool:
        """Whether the script has ended (returned, raised, exited or died)."""
        return self._end is not None

    async def run_task(self, task: Task) -> FLModel:
        """Queue ``task`` for the script and wait for its result.

        Raises
        ------
        ConfigError
            If ``task.data`` is neither an ``FLModel`` nor ``None``.
        TaskFailedError
            If the script raised (now or before).
        SiteCrashedError
            If the script ended before answering.
        """
        self._raise_if_gone(task.name)
        if task.data is None:
            model = FLModel()
        elif isinstance(task.data, FLModel):
            model = task.data
        else:
            raise ConfigError(
                f"task {task.name!r} carries {type(task.data).__name__}; a Client-API script "
                "receives an FLModel (or nothing)"
            )
        script_task = ScriptTask(new_id(), task.name, model)
        future: asyncio.Future[FLModel] = asyncio.get_running_loop().create_future()
        self._awaited[script_task.task_id] = (task.name, future)
        self._enqueue(script_task)
        try:
            return await future
        finally:
            self._awaited.pop(script_task.task_id, None)

    def awaits(self, task_id: str) -> bool:
        """Whether the executor still waits for task ``task_id`` (callable from any thread: a
        task cancelled while queued is skipped by whoever takes it)."""
        return task_id in self._awaited

    @abc.abstractmethod
    def _enqueue(self, item: ScriptTask | None) -> None:
        """Queue ``item`` for the script (``None``: no more tasks, for every later taker)."""

    def submit(self, result: ScriptResult) -> None:
        """Resolve the task ``result.task_id``; a result nobody awaits is logged and dropped."""
        entry = self._awaited.get(result.task_id)
        if entry is None or entry[1].done():
            self._logger.warning(
                "%s answered task %s, which is no longer awaited (cancelled, or answered "
                "twice); the result is dropped",
                self._label,
                result.task_id,
            )
            return
        entry[1].set_result(result.model)

    def fail_task(self, task_id: str, error: BaseException) -> None:
        """Fail one awaited task (it could not be delivered to the script)."""
        entry = self._awaited.get(task_id)
        if entry is not None and not entry[1].done():
            entry[1].set_exception(error)

    def fail(self, traceback_text: str) -> None:
        """The script raised: fail every awaited task, and every later one, with the traceback."""
        self._failure = traceback_text
        for name, future in self._awaited.values():
            if not future.done():
                future.set_exception(self._failed_error(name))

    def script_ended(self, how: str) -> None:
        """The script is gone (``how``: "returned", "exited with code 1", ...)."""
        if self._end is not None:
            return
        self._end = how
        for name, future in self._awaited.values():
            if not future.done():
                future.set_exception(self._crashed_error(name))

    def close(self) -> None:
        """No more tasks: the script's ``next_task`` returns ``None`` from now on."""
        self._enqueue(None)

    def _raise_if_gone(self, task_name: str) -> None:
        if self._failure is not None:
            raise self._failed_error(task_name)
        if self._end is not None:
            raise self._crashed_error(task_name)

    def _failed_error(self, task_name: str) -> TaskFailedError:
        return TaskFailedError(
            f"{self._label} raised while running task {task_name!r}:\n{self._failure}"
        )

    def _crashed_error(self, task_name: str) -> SiteCrashedError:
        return SiteCrashedError(f"{self._label} {self._end} without answering task {task_name!r}")


class LoopExchange(ScriptExchange):
    """The exchange whose tasks a coroutine on the executor's loop takes (process mode)."""

    def __init__(self, script_label: str, logger: logging.Logger) -> None:
        super().__init__(script_label, logger)
        self._queue: asyncio.Queue[ScriptTask | None] = asyncio.Queue()

    def _enqueue(self, item: ScriptTask | None) -> None:
        self._queue.put_nowait(item)

    async def next_task(self) -> ScriptTask | None:
        """The next task still awaited by the executor; ``None`` after :meth:`close`."""
        while True:
            item = await self._queue.get()
            if item is None:
                self._queue.put_nowait(None)  # every later call sees the end too
                return None
            if self.awaits(item.task_id):
                return item


class ThreadExchange(ScriptExchange):
    """The exchange whose tasks the script's own thread takes (thread mode), without a call
    into the event loop. The script's thread holds
    :data:`~fedcell.engine.gil_turns.SCRIPT_TURN` from a task's arrival until it asks for
    the next one."""

    def __init__(self, script_label: str, logger: logging.Logger) -> None:
        super().__init__(script_label, logger)
        self._queue: queue.SimpleQueue[ScriptTask | None] = queue.SimpleQueue()

    def _enqueue(self, item: ScriptTask | None) -> None:
        self._queue.put(item)

    def take(self, timeout: float | None = None) -> ScriptTask | None:
        """Block the calling thread (never the loop's) until the next task still awaited;
        ``None`` after :meth:`close`.

        Raises
        ------
        RequestTimeoutError
            If no task came within ``timeout`` seconds.
        """
        SCRIPT_TURN.give_back()  # while waiting; a task comes with the turn (see gil_turns)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                item = self._queue.get(timeout=left)
            except queue.Empty:
                raise RequestTimeoutError(f"no task arrived within {timeout} s") from None
            if item is None:
                self._queue.put(None)  # every later call sees the end too
                return None
            if self.awaits(item.task_id):
                SCRIPT_TURN.take()
                return item
