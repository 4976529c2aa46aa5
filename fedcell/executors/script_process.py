"""Process mode of the ScriptRunner: the user's script runs as a child Python process that talks
to its site over a private local cell.

Topology and handshake. For each script run the executor starts a cell named
:data:`HOST_CELL` listening on ``ipc://<private dir>/site.sock`` (the folder is created ``0700``,
so only this user can reach the socket), draws a random token, and starts::

    python -m fedcell.executors.script_launch train.py ARGS...

with :data:`~fedcell.executors.script_protocol.ENV_URL`, ``ENV_TOKEN`` and ``ENV_CELL`` in its
environment. ``flare.init()`` in the child starts a cell named ``ENV_CELL`` whose parent is that
URL and presents the token in its hello claims. The host cell's ``authenticate`` hook compares it
in constant time and checks the name: a process with a wrong token (or name) is refused during
the cell handshake, before any message of it reaches a handler, and its ``flare.init()`` raises
:class:`~fedcell.errors.AuthenticationError`; the host keeps serving. Handlers accept messages
only from the expected child name (the cell layer drops traffic spoofing a neighbour's name).

Messages (channel :data:`~fedcell.executors.script_protocol.CHANNEL`, by topic)::

    child → host   attach  (request)  → SiteInfo          after the handshake
    host  → child  task    (request)  ScriptTask → ack     pushed as the executor queues them
    child → host   result  (request)  ScriptResult → ack  flare.send() returns after the ack
    child → host   failed  (request)  ScriptFailure       the script raised (sent before exit)
    child → host   log     (one-way)  ScriptLog
    host  → child  stop    (one-way)                      job over: is_running() turns False

Tasks are pushed, and queued in the child until ``flare.receive()`` takes them, so no request
stays open while the script trains. The host forwards tasks only after ``attach``.

Liveness is the process itself: the host awaits the child's exit and reports it to the
:class:`~fedcell.executors.script_protocol.LoopExchange` (exit code or signal, plus the last
lines of stderr), which turns awaited tasks into *crashed*. Cell heartbeats are relaxed on this
link (a script busy in a long C call must not be declared gone while its process is alive).
The child's stdout/stderr are read line by line into the site log. ``stop`` sends ``stop``,
waits ``grace`` seconds, then terminates and finally kills the process.

The child side (:class:`CellSession`) runs its cell on an asyncio loop in a daemon thread; the
script's thread blocks on a ``queue.Queue`` of pushed tasks and on
``run_coroutine_threadsafe(...).result()`` for requests.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import contextlib
import hmac
import logging
import os
import queue
import secrets
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import fedcell
from fedcell.errors import (
    AuthenticationError,
    CellError,
    ConfigError,
    EncodeError,
    FedcellError,
    RequestTimeoutError,
    SiteCrashedError,
)
from fedcell.executors.script_protocol import (
    CHANNEL,
    ENV_CELL,
    ENV_TOKEN,
    ENV_URL,
    LoopExchange,
    ScriptFailure,
    ScriptLog,
    ScriptResult,
    ScriptSession,
    ScriptTask,
    SiteInfo,
    displayed_text,
)
from fedcell.transports.cell import Cell, CellConfig, Hello
from fedcell.transports.message import Message

__all__ = [
    "HOST_CELL",
    "CellSession",
    "ProcessScriptHost",
    "close_script_session",
    "connect_script_session",
    "report_script_failure",
]

HOST_CELL = "script-host"
SCRIPT_CELL = "script"
#: The child-host link is local and process exit is watched directly: heartbeats only need to
#: notice a wedged link, not a dead peer.
LINK_CONFIG = CellConfig(heartbeat_interval=5.0, peer_timeout=120.0, connect_timeout=30.0)
#: A result may be a large model; the request's reply waits for all of it to arrive.
RESULT_TIMEOUT = 3600.0
CONTROL_TIMEOUT = 60.0
#: How long a task that could not be delivered waits for the child's exit status.
LINK_LOSS_GRACE = 10.0
STDERR_TAIL_LINES = 20

T = TypeVar("T")


# ----------------------------------------------------------------------------------------------
# site side


class ProcessScriptHost:
    """Runs one script as a child process for the life of a job.

    Parameters
    ----------
    script:
        The script file.
    args:
        Its command-line arguments.
    site_info:
        What ``flare.init()`` tells the script.
    logger:
        The site log; the child's output lines and ``flare.log`` records go there.
    """

    def __init__(
        self, script: Path, args: list[str], site_info: SiteInfo, logger: logging.Logger
    ) -> None:
        self._script = script
        self._args = args
        self._site_info = site_info
        self._logger = logger
        self._label = f"script {script.name}"
        self.exchange = LoopExchange(self._label, logger)
        self._token = secrets.token_urlsafe(32)
        self._folder: str | None = None
        self._cell: Cell | None = None
        self._process: asyncio.subprocess.Process | None = None
        self._attached = asyncio.Event()
        self._exited = asyncio.Event()
        self._stderr_tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def url(self) -> str:
        """Where the child connects (``ipc://...``).

        Raises
        ------
        ConfigError
            Before :meth:`start`.
        """
        if self._cell is None:
            raise ConfigError("ProcessScriptHost.url before start()")
        return self._cell.url

    def _authenticate(self, hello: Hello) -> str:
        token = hello.claims.get("token")
        if not (
            isinstance(token, str) and hmac.compare_digest(token.encode(), self._token.encode())
        ):
            self._logger.warning(
                "%s: refused a process at %s that presented a wrong token",
                self._label,
                hello.connection,
            )
            raise AuthenticationError("wrong script token")
        if hello.name != SCRIPT_CELL:
            raise AuthenticationError(
                f"a script must connect as {SCRIPT_CELL!r}, not {hello.name!r}"
            )
        return hello.name

    async def start(self) -> None:
        """Open the private cell and start the child process.

        Raises
        ------
        ConnectError
            If the local cell cannot listen.
        """
        self._folder = tempfile.mkdtemp(prefix="fedcell-script-")
        cell = Cell(
            HOST_CELL,
            listen=f"ipc://{self._folder}/site.sock",
            config=LINK_CONFIG,
            authenticate=self._authenticate,
        )
        for topic, handler in (
            ("attach", self._on_attach),
            ("result", self._on_result),
            ("failed", self._on_failed),
            ("log", self._on_log),
        ):
            cell.register(CHANNEL, handler, topic)
        try:
            await cell.start()
            self._cell = cell
            self._process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "fedcell.executors.script_launch",
                str(self._script),
                *self._args,
                env=self._child_environment(cell.url),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                limit=1 << 20,
            )
        except BaseException:
            await cell.stop()
            self._cell = None
            shutil.rmtree(self._folder, ignore_errors=True)
            raise
        assert self._process.stdout is not None and self._process.stderr is not None
        self._tasks = [
            asyncio.create_task(self._pump(self._process.stdout, logging.INFO)),
            asyncio.create_task(self._pump(self._process.stderr, logging.WARNING)),
            asyncio.create_task(self._forward_tasks()),
        ]
        self._tasks.append(asyncio.create_task(self._watch(self._tasks[:2])))

    def _child_environment(self, url: str) -> dict[str, str]:
        env = dict(os.environ)
        # The child must import the same fedcell as this process.
        package_root = str(Path(fedcell.__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (package_root, env.get("PYTHONPATH", "")) if p
        )
        env["PYTHONUNBUFFERED"] = "1"
        env[ENV_URL] = url
        env[ENV_TOKEN] = self._token
        env[ENV_CELL] = SCRIPT_CELL
        return env

    def _check_sender(self, message: Message) -> None:
        if message.sender != SCRIPT_CELL:
            raise AuthenticationError(f"{message.sender!r} is not this site's script")

    async def _on_attach(self, message: Message) -> SiteInfo:
        self._check_sender(message)
        self._attached.set()
        return self._site_info

    async def _on_result(self, message: Message) -> None:
        self._check_sender(message)
        if not isinstance(message.payload, ScriptResult):
            raise ConfigError(
                f"a script result must be a ScriptResult, not {type(message.payload).__name__}"
            )
        self.exchange.submit(message.payload)

    async def _on_failed(self, message: Message) -> None:
        self._check_sender(message)
        if not isinstance(message.payload, ScriptFailure):
            raise ConfigError(
                f"a failure report must be a ScriptFailure, not {type(message.payload).__name__}"
            )
        self.exchange.fail(message.payload.traceback)

    async def _on_log(self, message: Message) -> None:
        self._check_sender(message)
        record = message.payload
        if not isinstance(record, ScriptLog):
            self._logger.warning("%s sent a malformed log record; dropped", self._label)
            return
        self._logger.info(
            "[%s] %s = %r (%s)",
            self._label,
            record.key,
            record.value,
            record.data_type,
            extra={"fedcell_log": record},
        )

    async def _forward_tasks(self) -> None:
        assert self._cell is not None
        await self._attached.wait()
        while True:
            task = await self.exchange.next_task()
            if task is None:
                with contextlib.suppress(FedcellError):
                    await self._cell.send(SCRIPT_CELL, CHANNEL, None, topic="stop")
                return
            try:
                await self._cell.request(
                    SCRIPT_CELL, CHANNEL, task, topic="task", timeout=RESULT_TIMEOUT
                )
            except EncodeError as exc:
                self.exchange.fail_task(
                    task.task_id,
                    ConfigError(f"task {task.name!r} cannot be sent to {self._label}: {exc}"),
                )
            except FedcellError as exc:
                # The child is gone or going; its exit, seen by _watch, makes the task crashed
                # with the exit status. A child that stays alive without a link is lost too.
                try:
                    await asyncio.wait_for(self._exited.wait(), LINK_LOSS_GRACE)
                except TimeoutError:
                    self.exchange.fail_task(
                        task.task_id,
                        SiteCrashedError(f"{self._label} cannot be reached: {exc}"),
                    )

    async def _pump(self, stream: asyncio.StreamReader, level: int) -> None:
        while True:
            try:
                line = await stream.readline()
            except ValueError:  # a line above the reader's limit: log what is buffered
                line = await stream.read(1 << 20)
            if not line:
                return
            text = displayed_text(line.decode(errors="replace").rstrip("\n"))
            if level >= logging.WARNING:
                self._stderr_tail.append(text)
            self._logger.log(level, "[%s] %s", self._label, text)

    async def _watch(self, pumps: list[asyncio.Task[None]]) -> None:
        assert self._process is not None
        code = await self._process.wait()
        await asyncio.gather(*pumps, return_exceptions=True)
        if code == 0:
            how = "exited"
        elif code < 0:
            how = f"was killed by signal {signal.Signals(-code).name}"
        else:
            how = f"exited with code {code}"
        if code != 0 and self._stderr_tail:
            how += " (last output: " + " | ".join(self._stderr_tail) + ")"
        self.exchange.script_ended(how)
        self._exited.set()

    async def stop(self, grace: float) -> None:
        """End the job for the script: ask it to stop, then terminate, then kill. Idempotent."""
        self.exchange.close()
        process = self._process
        if process is not None and process.returncode is None:
            try:
                await asyncio.wait_for(process.wait(), grace)
            except TimeoutError:
                self._logger.warning(
                    "%s did not end within %s s; terminating it", self._label, grace
                )
                process.terminate()
                try:
                    await asyncio.wait_for(process.wait(), 5.0)
                except TimeoutError:
                    process.kill()
                    await process.wait()
        for task in self._tasks:
            if not task.done():
                # The watcher ends with the process; the forwarder may wait for an attach that
                # never came.
                task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._cell is not None:
            await self._cell.stop()
            self._cell = None
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None


# ----------------------------------------------------------------------------------------------
# script side (runs in the child process)


class CellSession(ScriptSession):
    """The script's end of the exchange in process mode.

    Use :func:`connect_script_session`; it reads the environment the host set.
    """

    def __init__(self, url: str, token: str, name: str) -> None:
        self._url = url
        self._token = token
        self._name = name
        self._tasks: queue.Queue[ScriptTask | None] = queue.Queue()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="fedcell-script-cell", daemon=True
        )
        self._cell: Cell | None = None
        self._host: str = HOST_CELL
        self._closed = False

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def open(self) -> None:
        """Start the cell, present the token and fetch the site info.

        Raises
        ------
        AuthenticationError
            If the site refuses this process (wrong token or name).
        ConnectError
            If the site does not answer.
        """
        self._thread.start()
        try:
            self.site_info = self._call(self._open())
        except BaseException:
            self.close()
            raise

    async def _open(self) -> SiteInfo:
        cell = Cell(self._name, parent=self._url, config=LINK_CONFIG, claims={"token": self._token})
        cell.register(CHANNEL, self._on_task, "task")
        cell.register(CHANNEL, self._on_stop, "stop")
        try:
            await cell.start()
        except CellError as exc:  # the handshake was answered with a refusal
            raise AuthenticationError(
                f"the fedcell site at {self._url} refused this script process (is "
                f"{ENV_TOKEN} the token its ScriptRunner set?): {exc}"
            ) from exc
        self._cell = cell
        self._host = cell.parent or HOST_CELL
        info = await cell.request(
            self._host, CHANNEL, None, topic="attach", timeout=CONTROL_TIMEOUT
        )
        if not isinstance(info, SiteInfo):
            raise ConfigError(f"the site answered attach with {type(info).__name__}, not SiteInfo")
        return info

    async def _on_task(self, message: Message) -> None:
        if not isinstance(message.payload, ScriptTask):
            raise ConfigError(f"a task must be a ScriptTask, not {type(message.payload).__name__}")
        self._tasks.put(message.payload)

    async def _on_stop(self, message: Message) -> None:
        self._tasks.put(None)

    def next_task(self, timeout: float | None = None) -> ScriptTask | None:
        try:
            task = self._tasks.get(timeout=timeout)
        except queue.Empty:
            raise RequestTimeoutError(f"no task arrived within {timeout} s") from None
        if task is None:
            self._tasks.put(None)  # later calls see the end too
        return task

    def _request(self, topic: str, payload: Any, timeout: float) -> None:
        cell = self._cell
        if cell is None:
            raise CellError("the script's session is closed")
        self._call(cell.request(self._host, CHANNEL, payload, topic=topic, timeout=timeout))

    def submit(self, result: ScriptResult) -> None:
        self._request("result", result, RESULT_TIMEOUT)

    def report_failure(self, traceback_text: str) -> None:
        """Tell the site the script raised (before the process exits)."""
        self._request("failed", ScriptFailure(traceback_text), CONTROL_TIMEOUT)

    def log(self, record: ScriptLog) -> None:
        cell = self._cell
        if cell is None:
            raise CellError("the script's session is closed")
        self._call(cell.send(self._host, CHANNEL, record, topic="log"))

    def close(self) -> None:
        """Leave the site and stop the cell's thread. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._thread.is_alive():
            if self._cell is not None:
                with contextlib.suppress(Exception):
                    self._call(self._cell.stop(), CONTROL_TIMEOUT)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(CONTROL_TIMEOUT)
        self._cell = None
        if not self._loop.is_running():
            self._loop.close()


_session: CellSession | None = None
_session_lock = threading.Lock()


def connect_script_session() -> CellSession:
    """This process's session with its site, opened on first use from the environment.

    Raises
    ------
    ConfigError
        If the environment does not name a site (the process was not started by a
        ScriptRunner).
    AuthenticationError
        If the site refuses the token.
    ConnectError
        If the site does not answer.
    """
    global _session
    with _session_lock:
        if _session is None:
            try:
                url, token, name = (os.environ[k] for k in (ENV_URL, ENV_TOKEN, ENV_CELL))
            except KeyError as exc:
                raise ConfigError(
                    f"{exc.args[0]} is not set: this process was not started by a fedcell "
                    "ScriptRunner"
                ) from None
            session = CellSession(url, token, name)
            session.open()
            _session = session
            atexit.register(close_script_session)
        return _session


def report_script_failure(traceback_text: str) -> None:
    """Report that the script raised, connecting first if the script never called init()."""
    connect_script_session().report_failure(traceback_text)


def close_script_session() -> None:
    """Close this process's session, if open. Idempotent."""
    global _session
    with _session_lock:
        session, _session = _session, None
    if session is not None:
        session.close()
