"""Stream endpoints wired through bounded in-memory queues, for the stream tests.

Each direction between two endpoints is a bounded queue drained by one pump task that calls the
receiver's ``handle``, as a cell's receive loop would. Frames are copied on the way (the receiver
never sees the sender's memory) unless ``copy=False``. Hooks let a test tamper with, drop, delay or observe frames.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from fedcell.errors import StreamError
from fedcell.transports.base import Buffer
from fedcell.transports.message import Message
from fedcell.transports.stream import StreamConfig, StreamEndpoint
from fedcell.transports.stream_protocol import parse_header

Tamper = Callable[[str, str, list[bytes]], "list[bytes] | None"]
Observer = Callable[[str, str, Any], None]


class StreamNet:
    """A set of named endpoints that can stream to each other."""

    def __init__(self, queue_size: int = 64, *, copy: bool = True) -> None:
        self.queue_size = queue_size
        self.copy = copy
        self.endpoints: dict[str, StreamEndpoint] = {}
        self.delivered: dict[str, asyncio.Queue[Message]] = {}
        self.failures: list[tuple[str, str, int, StreamError]] = []
        self.tamper: Tamper | None = None
        self.delay = 0.0
        self.observers: list[Observer] = []
        self._queues: dict[tuple[str, str], asyncio.Queue[list[bytes]]] = {}
        self._pumps: list[asyncio.Task[None]] = []

    def add(self, name: str, config: StreamConfig | None = None, **kwargs: Any) -> StreamEndpoint:
        inbox: asyncio.Queue[Message] = asyncio.Queue()
        self.delivered[name] = inbox

        async def send(peer: str, frames: list[Buffer]) -> None:
            await self._send(name, peer, frames)

        async def deliver(message: Message) -> None:
            inbox.put_nowait(message)

        def on_failure(peer: str, sid: int, error: StreamError) -> None:
            self.failures.append((name, peer, sid, error))

        endpoint = StreamEndpoint(
            send, deliver, config, name=name, on_failure=on_failure, **kwargs
        )
        self.endpoints[name] = endpoint
        return endpoint

    async def _send(self, src: str, dst: str, frames: list[Buffer]) -> None:
        # copy=False passes read-only views, as the in-process transport does.
        copied = [bytes(f) if self.copy else memoryview(f).toreadonly() for f in frames]
        for observe in self.observers:
            observe(src, dst, parse_header(copied[0], 1 << 30))
        if self.tamper is not None:
            tampered = self.tamper(src, dst, copied)
            if tampered is None:
                return
            copied = tampered
        queue = self._queues.get((src, dst))
        if queue is None:
            queue = self._queues[(src, dst)] = asyncio.Queue(self.queue_size)
            self._pumps.append(asyncio.get_running_loop().create_task(self._pump(src, dst, queue)))
        await queue.put(copied)

    async def _pump(self, src: str, dst: str, queue: asyncio.Queue[list[bytes]]) -> None:
        while True:
            frames = await queue.get()
            if self.delay:
                await asyncio.sleep(self.delay)
            await self.endpoints[dst].handle(src, list(frames))

    async def next_delivery(self, name: str, timeout: float = 10.0) -> Message:
        return await asyncio.wait_for(self.delivered[name].get(), timeout)

    async def close(self) -> None:
        for endpoint in self.endpoints.values():
            await endpoint.close()
        for pump in self._pumps:
            pump.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)
