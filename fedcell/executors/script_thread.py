"""Thread mode of the ScriptRunner: the user's script runs on a thread of the site process.

The script is compiled and executed in a fresh ``__main__`` namespace (``__name__ ==
"__main__"``, ``__file__`` set), on its own thread, once per job: its ``while
flare.is_running():`` loop lives across rounds. ``runpy.run_path`` is *not* used, because it
swaps ``sys.modules["__main__"]`` and ``sys.argv[0]`` for the whole process, which corrupts both
when several sites' scripts run at once (the simulator runs every site in one process).

Process-wide state a script expects is routed per thread instead (:class:`_ThreadRouting`):

- ``sys.argv`` reads as ``[script, *args]`` on the script's thread (argparse and click read
  ``sys.argv[1:]``); other threads see the original argv.
- ``sys.stdout``/``sys.stderr`` writes from the script's thread become lines of the site log
  (``INFO`` for stdout, ``WARNING`` for stderr); other threads write where they did before.
- the script's folder is on ``sys.path`` while a script from it runs (so ``from net import Net``
  finds the file next to it), reference-counted across concurrent scripts.

Threads the script starts itself are not routed (their output goes to the process's streams).

The script talks to its executor through :class:`ThreadSession`: it takes tasks from the
:class:`~fedcell.executors.script_protocol.ThreadExchange`'s thread-safe queue itself and hands
results, failures and log records to the loop with ``call_soon_threadsafe``: the event loop is
never blocked by the script, and the script blocks only itself. What ``flare.receive()`` returns is the task's own model, not a copy: the site
runtime decodes each site's payload separately, so the script may train on it in place. What
``flare.send`` hands over *is* copied (tensors and arrays), because the result is encoded and
streamed after ``send`` returns while a script may go on training its live ``state_dict()``
tensors; process mode gets that guarantee from serialization. Cost: one model copy per round.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, SupportsIndex, TextIO

import numpy as np

from fedcell.engine.gil_turns import SCRIPT_TURN
from fedcell.executors.script_protocol import (
    ScriptLog,
    ScriptResult,
    ScriptSession,
    ScriptTask,
    SiteInfo,
    ThreadExchange,
    bind_thread_session,
    displayed_text,
    format_script_error,
)
from fedcell.fl_model import FLModel

__all__ = ["ThreadScriptHost", "ThreadSession"]

_routes = threading.local()


def _private_copy(value: Any) -> Any:
    """A copy of ``value`` that shares no array/tensor memory with it."""
    if isinstance(value, dict):
        return {k: _private_copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_private_copy(v) for v in value)
    if isinstance(value, np.ndarray):
        return value.copy()
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor):
        return value.detach().clone()
    return value


def _private_model(model: FLModel) -> FLModel:
    return replace(
        model,
        params=_private_copy(model.params),
        optimizer_params=_private_copy(model.optimizer_params),
    )


class ThreadSession(ScriptSession):
    """The script's end of the exchange in thread mode (called on the script's thread)."""

    def __init__(
        self,
        site_info: SiteInfo,
        exchange: ThreadExchange,
        loop: asyncio.AbstractEventLoop,
        on_log: Callable[[ScriptLog], None],
    ) -> None:
        self.site_info = site_info
        self._exchange = exchange
        self._loop = loop
        self._on_log = on_log

    def next_task(self, timeout: float | None = None) -> ScriptTask | None:
        return self._exchange.take(timeout)

    def submit(self, result: ScriptResult) -> None:
        model = _private_model(result.model)
        self.call_on_loop(self._exchange.submit, ScriptResult(result.task_id, model))

    def log(self, record: ScriptLog) -> None:
        self.call_on_loop(self._on_log, record)

    def call_on_loop(self, callback: Callable[..., None], *args: Any) -> None:
        """Run ``callback(*args)`` on the executor's loop; dropped if the loop is closed."""
        with contextlib.suppress(RuntimeError):  # a closed loop has nobody left to tell
            self._loop.call_soon_threadsafe(callback, *args)


class _LogLines:
    """A text sink that turns whole lines into log records."""

    def __init__(self, logger: logging.Logger, level: int, prefix: str) -> None:
        self._logger = logger
        self._level = level
        self._prefix = prefix
        self._pending = ""

    def write(self, text: str) -> int:
        *lines, pending = (self._pending + text).split("\n")
        self._pending = pending.rpartition("\r")[2]  # a redrawn line only keeps its last state
        for line in lines:
            self._emit(displayed_text(line))
        return len(text)

    def finish(self) -> None:
        """Log the unterminated last line, if any."""
        if self._pending:
            self._emit(self._pending)
            self._pending = ""

    def _emit(self, line: str) -> None:
        # A log handler created on the script's thread may hold the routed stream itself
        # (``logging.basicConfig()`` in the script): while emitting, writes go to the original
        # stream instead of coming back here forever.
        _routes.emitting = True
        try:
            self._logger.log(self._level, "%s%s", self._prefix, line)
        finally:
            _routes.emitting = False


class _RoutedStream:
    """Stands in for ``sys.stdout``/``sys.stderr``: the script's thread writes to its log sink,
    every other thread to the stream that was there before (which also answers every other
    attribute: ``encoding``, ``fileno``, ``buffer`` ...)."""

    def __init__(self, original: TextIO, attribute: str) -> None:
        self.original = original
        self._attribute = attribute

    def _sink(self) -> _LogLines | None:
        sink: _LogLines | None = getattr(_routes, self._attribute, None)
        if sink is None or getattr(_routes, "emitting", False):
            return None
        return sink

    def write(self, text: str) -> int:
        sink = self._sink()
        return sink.write(text) if sink is not None else self.original.write(text)

    def writelines(self, lines: Iterable[str]) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        if self._sink() is None:
            self.original.flush()

    def isatty(self) -> bool:
        return False if self._sink() is not None else self.original.isatty()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.original, name)


class _RoutedArgv(list[str]):
    """Stands in for ``sys.argv``: reads on a script's thread see that script's argv."""

    def _current(self) -> list[str]:
        argv: list[str] | None = getattr(_routes, "argv", None)
        return argv if argv is not None else list(super().__iter__())

    def __getitem__(self, index: Any) -> Any:
        return self._current()[index]

    def __iter__(self) -> Iterator[str]:
        return iter(self._current())

    def __len__(self) -> int:
        return len(self._current())

    def __contains__(self, item: object) -> bool:
        return item in self._current()

    def __eq__(self, other: object) -> bool:
        return self._current() == other

    __hash__ = None

    def __repr__(self) -> str:
        return repr(self._current())

    def copy(self) -> list[str]:
        return list(self._current())

    def index(self, value: str, start: SupportsIndex = 0, stop: SupportsIndex = sys.maxsize) -> int:
        return self._current().index(value, start, stop)

    def count(self, value: str) -> int:
        return self._current().count(value)


class _ThreadRouting:
    """Installs the per-thread stand-ins while at least one script thread runs."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0
        self._saved: tuple[Any, Any, Any] | None = None
        self._path_users: dict[str, int] = {}

    def enter(self, argv: list[str], logger: logging.Logger, label: str, folder: str) -> None:
        with self._lock:
            if self._users == 0:
                self._saved = (sys.argv, sys.stdout, sys.stderr)
                sys.argv = _RoutedArgv(sys.argv)
                sys.stdout = _RoutedStream(sys.stdout, "stdout")
                sys.stderr = _RoutedStream(sys.stderr, "stderr")
            self._users += 1
            if self._path_users.get(folder, 0) == 0 and folder not in sys.path:
                sys.path.insert(0, folder)
                self._path_users[folder] = 1
            elif folder in self._path_users:
                self._path_users[folder] += 1
        _routes.argv = argv
        _routes.stdout = _LogLines(logger, logging.INFO, f"[{label}] ")
        _routes.stderr = _LogLines(logger, logging.WARNING, f"[{label}] ")

    def exit(self, folder: str) -> None:
        for name in ("stdout", "stderr"):
            getattr(_routes, name).finish()
            setattr(_routes, name, None)
        _routes.argv = None
        with self._lock:
            self._users -= 1
            if folder in self._path_users:
                self._path_users[folder] -= 1
                if self._path_users[folder] == 0:
                    del self._path_users[folder]
                    if folder in sys.path:
                        sys.path.remove(folder)
            if self._users == 0 and self._saved is not None:
                argv, stdout, stderr = self._saved
                # Restore only what is still ours (someone may have replaced it meanwhile).
                if isinstance(sys.argv, _RoutedArgv):
                    sys.argv = argv
                if isinstance(sys.stdout, _RoutedStream):
                    sys.stdout = stdout
                if isinstance(sys.stderr, _RoutedStream):
                    sys.stderr = stderr
                self._saved = None


_routing = _ThreadRouting()


class ThreadScriptHost:
    """Runs one script on a thread for the life of a job.

    Parameters
    ----------
    script:
        The script file.
    args:
        Its command-line arguments (``sys.argv[1:]`` as the script sees it).
    site_info:
        What ``flare.init()`` tells the script.
    logger:
        The site log; the script's output and ``flare.log`` records go there.
    """

    def __init__(
        self, script: Path, args: list[str], site_info: SiteInfo, logger: logging.Logger
    ) -> None:
        self._script = script
        self._args = args
        self._site_info = site_info
        self._logger = logger
        self._label = f"script {script.name}"
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ended: asyncio.Future[None] | None = None
        self.exchange = ThreadExchange(self._label, logger)

    async def start(self) -> None:
        """Start the script's thread."""
        self._loop = asyncio.get_running_loop()
        self._ended = self._loop.create_future()
        session = ThreadSession(self._site_info, self.exchange, self._loop, self._log_record)
        thread = threading.Thread(
            target=self._run,
            args=(session,),
            name=f"fedcell-script-{self._site_info.site_name}",
            daemon=True,
        )
        thread.start()

    def _log_record(self, record: ScriptLog) -> None:
        self._logger.info(
            "[%s] %s = %r (%s)",
            self._label,
            record.key,
            record.value,
            record.data_type,
            extra={"fedcell_log": record},
        )

    def _on_ended(self, how: str) -> None:
        self.exchange.script_ended(how)
        if self._ended is not None and not self._ended.done():
            self._ended.set_result(None)

    def _run(self, session: ThreadSession) -> None:
        folder = str(self._script.resolve().parent)
        _routing.enter([str(self._script), *self._args], self._logger, self._label, folder)
        bind_thread_session(session)
        how = "returned"
        try:
            code = compile(self._script.read_bytes(), str(self._script), "exec")
            namespace: dict[str, Any] = {
                "__name__": "__main__",
                "__file__": str(self._script),
                "__builtins__": builtins,
                "__doc__": None,
                "__package__": None,
                "__spec__": None,
                "__loader__": None,
                "__cached__": None,
            }
            exec(code, namespace)
        except SystemExit as exc:
            how = "exited" if exc.code in (None, 0) else f"exited with code {exc.code}"
        except BaseException as exc:
            how = "raised"
            session.call_on_loop(self.exchange.fail, format_script_error(exc, self._script))
        finally:
            SCRIPT_TURN.give_back()
            bind_thread_session(None)
            _routing.exit(folder)
            session.call_on_loop(self._on_ended, how)

    async def stop(self, grace: float) -> None:
        """Tell the script the job is over and wait up to ``grace`` seconds for it to end."""
        self.exchange.close()
        if self._ended is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(self._ended), grace)
        except TimeoutError:
            self._logger.warning(
                "%s did not end within %s s after the job ended; its thread is left running",
                self._label,
                grace,
            )
