"""In-memory transport: ``inproc://name``.

The default for unit tests and the threaded simulator. A listener registers ``name`` in a
process-wide table; ``connect`` creates a pair of bounded queues, one per direction. Frames are
passed by reference (no copy): the sender must not mutate them after ``send`` (the transport
contract), and the receiver gets them as read-only ``memoryview``s.

All endpoints of one listener live on one asyncio event loop; crossing loops is refused with a
clear error rather than corrupting asyncio state.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Sequence
from urllib.parse import urlsplit

from fedcell.errors import ConfigError, ConnectError, TransportClosedError, WouldBlockError
from fedcell.transports.base import Buffer, Connection, Listener, Transport

__all__ = ["InprocTransport"]

_listeners: dict[str, InprocListener] = {}
_ids = itertools.count(1)
_CLOSED = object()


def _name_of(url: str) -> str:
    parts = urlsplit(url)
    name = parts.netloc + parts.path
    if not name:
        raise ConfigError(f"inproc URL {url!r} has no name (expected inproc://name)")
    return name


def _readonly(frame: Buffer) -> memoryview:
    view = memoryview(frame)
    return view if view.readonly else view.toreadonly()


class InprocConnection(Connection):
    def __init__(self, peer: str, inbox: asyncio.Queue[object], outbox: asyncio.Queue[object]):
        super().__init__()
        self.peer = peer
        self._inbox = inbox
        self._outbox = outbox
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise TransportClosedError(f"inproc connection to {self.peer} is closed")

    async def send(self, frames: Sequence[Buffer]) -> None:
        self._check_open()
        message = [_readonly(f) for f in frames]
        await self._outbox.put(message)
        self._count_sent(message)

    def send_nowait(self, frames: Sequence[Buffer]) -> None:
        self._check_open()
        message = [_readonly(f) for f in frames]
        try:
            self._outbox.put_nowait(message)
        except asyncio.QueueFull:
            raise WouldBlockError(
                f"inproc queue to {self.peer} is full ({self._outbox.maxsize} messages)"
            ) from None
        self._count_sent(message)

    async def recv(self) -> list[Buffer]:
        if self._closed and self._inbox.empty():
            raise TransportClosedError(f"inproc connection to {self.peer} is closed")
        item = await self._inbox.get()
        if item is _CLOSED:
            self._closed = True
            self._inbox.put_nowait(_CLOSED)  # later recv calls fail too
            self._notify_state("disconnected")
            raise TransportClosedError(f"inproc peer {self.peer} closed the connection")
        frames: list[Buffer] = item  # type: ignore[assignment]
        self._count_received(frames)
        return frames

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        _put_sentinel(self._outbox)
        _put_sentinel(self._inbox)


def _put_sentinel(queue: asyncio.Queue[object]) -> None:
    # The sentinel must get through even when the queue is full: make room by growing it.
    try:
        queue.put_nowait(_CLOSED)
    except asyncio.QueueFull:
        queue._maxsize += 1  # type: ignore[attr-defined]
        queue.put_nowait(_CLOSED)


class InprocListener(Listener):
    def __init__(self, name: str, queue_size: int) -> None:
        self.url = f"inproc://{name}"
        self._name = name
        self._queue_size = queue_size
        self._loop = asyncio.get_running_loop()
        self._pending: asyncio.Queue[InprocConnection | None] = asyncio.Queue()
        self._accepted: list[InprocConnection] = []
        self._closed = False

    def _connect(self) -> InprocConnection:
        if asyncio.get_running_loop() is not self._loop:
            raise ConfigError(f"{self.url} lives on another event loop; use ipc:// across loops")
        a_to_b: asyncio.Queue[object] = asyncio.Queue(self._queue_size)
        b_to_a: asyncio.Queue[object] = asyncio.Queue(self._queue_size)
        client_id = next(_ids)
        client = InprocConnection(self.url, inbox=b_to_a, outbox=a_to_b)
        server = InprocConnection(f"inproc-client-{client_id}", inbox=a_to_b, outbox=b_to_a)
        self._pending.put_nowait(server)
        return client

    async def accept(self) -> Connection:
        if self._closed:
            raise TransportClosedError(f"listener {self.url} is closed")
        conn = await self._pending.get()
        if conn is None:
            self._pending.put_nowait(None)
            raise TransportClosedError(f"listener {self.url} is closed")
        self._accepted.append(conn)
        return conn

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if _listeners.get(self._name) is self:
            del _listeners[self._name]
        self._pending.put_nowait(None)
        for conn in self._accepted:
            await conn.close()


class InprocTransport(Transport):
    """Bounded in-memory queues; ``inproc://name``."""

    schemes = ("inproc",)

    async def listen(self, url: str) -> Listener:
        name = _name_of(url)
        if name in _listeners:
            raise ConnectError(f"{url} is already bound in this process")
        listener = InprocListener(name, self.options.queue_size)
        _listeners[name] = listener
        return listener

    async def connect(self, url: str) -> Connection:
        name = _name_of(url)
        listener = _listeners.get(name)
        if listener is None:
            raise ConnectError(f"nothing listens on {url} in this process")
        conn = listener._connect()
        conn._notify_state("connected")
        return conn
