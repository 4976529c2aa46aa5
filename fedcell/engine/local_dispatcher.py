"""``LocalDispatcher``: the :class:`~fedcell.engine.dispatcher.Dispatcher` in memory.

Each site is a Python callable ``handler(site, task) -> data``, sync or async. It is how every
controller is unit-tested without a network, and it keeps the network's rules so that a
controller that passes here behaves the same over cells:

- **Payloads cross the wire codec** (``wire=True``, the default): each site decodes its own copy
  of the task and the controller decodes each result, exactly as over a transport. A handler
  cannot mutate the server's global model in place, and a payload the codec refuses fails here
  (a task: :class:`~fedcell.errors.EncodeError` at the controller; a result: that site's
  ``"failed"``).
- **Outcomes map as a site runtime maps them**: data returned → ``"ok"``; the handler raised
  :class:`~fedcell.errors.SiteCrashedError` → ``"crashed"`` (simulates losing the site); any
  other exception → ``"failed"`` with ``"Type: message"``; a handler that never returns (an
  async handler awaiting forever) → ``"timeout"`` at the task's deadline, after which the site's
  work is cancelled, as :meth:`TaskHandle.cancel` does.

Each target runs as its own asyncio task, started in target order. A sync handler runs to
completion on the event loop (deterministic, no threads); an async handler that awaits lets the
others run, which is how tests stagger arrivals or hang a site.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeAlias

from fedcell.engine.dispatcher import Dispatcher, StreamingFold, Task, TaskHandle, TaskResult
from fedcell.errors import ConfigError, SiteCrashedError
from fedcell.transports.codec import decode, encode, pack_tree, unpack_tree

__all__ = ["LocalDispatcher", "SiteHandler"]

SiteHandler: TypeAlias = Callable[[str, Task], Any | Awaitable[Any]]
"""``handler(site, task) -> data`` (or an awaitable of it): one site's behaviour."""


def _wire_copy(value: Any) -> Any:
    """``value`` after a trip through the safe codec, as a receiving cell would see it."""
    tree, buffers = encode(value)
    return decode(unpack_tree(pack_tree(tree)), buffers)


class LocalDispatcher(Dispatcher):
    """Runs tasks by calling per-site handlers in this process.

    Parameters
    ----------
    handlers:
        Site name → handler; the keys are the job's sites, in order.
    wire:
        Pass tasks and results through the wire codec (see the module docstring).

    Raises
    ------
    ConfigError
        If ``handlers`` is empty.
    """

    def __init__(self, handlers: Mapping[str, SiteHandler], *, wire: bool = True) -> None:
        if not handlers:
            raise ConfigError("LocalDispatcher needs at least one site handler")
        self._handlers = dict(handlers)
        self._wire = wire

    @property
    def sites(self) -> Sequence[str]:
        return tuple(self._handlers)

    def broadcast(
        self,
        task: Task,
        targets: Sequence[str] | None = None,
        *,
        fold: StreamingFold | None = None,
    ) -> TaskHandle:
        # Results are handed over whole (nothing streams in memory): ``fold`` takes them whole.
        chosen = tuple(self._handlers if targets is None else targets)
        unknown = [site for site in chosen if site not in self._handlers]
        if unknown:
            raise ConfigError(f"task {task.name!r}: {unknown} are not sites of this job")
        handle = _LocalHandle(task, chosen)
        if self._wire:  # one encode per broadcast; each site decodes its own copy below
            tree, buffers = encode(task)
            packed = pack_tree(tree)
            for site in chosen:
                handle.start(site, self._run(site, lambda: decode(unpack_tree(packed), buffers)))
        else:
            for site in chosen:
                handle.start(site, self._run(site, lambda: task))
        return handle

    async def _run(self, site: str, receive: Callable[[], Task]) -> TaskResult:
        task = receive()
        try:
            data = self._handlers[site](site, task)
            if inspect.isawaitable(data):
                data = await data
            if self._wire:
                data = _wire_copy(data)
        except SiteCrashedError as exc:
            return TaskResult(site, task.name, "crashed", error=str(exc) or "site lost")
        except Exception as exc:
            return TaskResult(site, task.name, "failed", error=f"{type(exc).__name__}: {exc}")
        return TaskResult(site, task.name, "ok", data)


class _LocalHandle(TaskHandle):
    def __init__(self, task: Task, targets: Sequence[str]) -> None:
        super().__init__(task, targets)
        self._work: dict[str, asyncio.Task[TaskResult]] = {}

    def start(self, site: str, work: Awaitable[TaskResult]) -> None:
        running = asyncio.ensure_future(work)
        running.add_done_callback(self._finished)
        self._work[site] = running

    def _finished(self, running: asyncio.Task[TaskResult]) -> None:
        if not running.cancelled():
            result = running.result()
            del self._work[result.site]  # the finished task holds the result: let it go
            self.deliver(result)

    async def abandon(self, sites: tuple[str, ...]) -> None:
        stopping = [self._work[site] for site in sites if site in self._work]
        for running in stopping:
            running.cancel()
        await asyncio.gather(*stopping, return_exceptions=True)
