"""A TCP proxy that delays every byte by a fixed time per direction and cuts connections on command.

This kernel has no ``netem``, so the network tests get latency and broken connections from this
proxy instead: a client connects to the proxy, which opens a connection to ``upstream`` and
relays both directions.

Delay
    Each direction is a reader and a writer joined by a queue: the reader stamps what it read with
    ``now + delay`` and queues it; the writer sends each piece once its time has come. Reading
    never waits for the delay, so the delay adds latency without capping throughput (a window of
    ``W`` bytes still moves ``W`` per round trip). The queue is bounded (``MAX_QUEUED`` pieces of
    at most ``READ_BYTES``), so a slow receiver slows the sender through TCP, as a router would.
Cut
    :meth:`DelayProxy.cut` aborts every open connection on both sides (a TCP reset: both ends see
    the connection fail at once), either at once or once ``after_bytes`` more bytes went
    upstream (client to server), which lands the cut in the middle of a transfer precisely. Bytes
    read but not yet written are lost, as on a broken link. New connections are accepted as
    before, so a client that reconnects gets through.

Run as a process (inside a namespace)::

    python delay_proxy.py --listen 10.77.1.1:7100 --upstream 10.77.0.2:7000 --delay 0.02

prints ``ready PORT``, then reads commands on stdin: ``cut AFTER_BYTES`` (``0``: now) arms a
cut and prints ``cut CONNECTIONS`` when it happens; end of input stops the proxy.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from dataclasses import dataclass

__all__ = ["DelayProxy"]

READ_BYTES = 256 * 1024
MAX_QUEUED = 256


@dataclass(slots=True)
class ProxyStats:
    """Counters of a :class:`DelayProxy`."""

    connections: int = 0
    open_connections: int = 0
    cuts: int = 0
    connections_cut: int = 0
    bytes_upstream: int = 0
    bytes_downstream: int = 0


class DelayProxy:
    """Relays ``listen`` to ``upstream`` with ``delay`` seconds added in each direction."""

    def __init__(self, upstream: tuple[str, int], delay: float,
                 listen: tuple[str, int] = ("127.0.0.1", 0)) -> None:  # fmt: skip
        self.upstream = upstream
        self.delay = delay
        self.listen = listen
        self.stats = ProxyStats()
        self._server: asyncio.Server | None = None
        self._connections: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._cut_at: int | None = None
        self._cut_done: asyncio.Event = asyncio.Event()

    @property
    def port(self) -> int:
        """The port the proxy listens on."""
        assert self._server is not None, "the proxy is not started"
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, *self.listen)

    def cut(self, after_bytes: int = 0) -> None:
        """Abort every open connection once ``after_bytes`` more bytes went upstream."""
        self._cut_done.clear()
        self._cut_at = self.stats.bytes_upstream + after_bytes
        if after_bytes == 0:
            self._cut_now()

    async def wait_cut(self) -> int:
        """Wait until the armed cut happened; return how many connections it aborted."""
        await self._cut_done.wait()
        return self.stats.connections_cut

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for writers in list(self._connections):
            for writer in writers:
                writer.transport.abort()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # ------------------------------------------------------------------------------------------

    def _cut_now(self) -> None:
        self._cut_at = None
        self.stats.cuts += 1
        self.stats.connections_cut += len(self._connections)
        for client, server in list(self._connections):
            client.transport.abort()
            server.transport.abort()
        self._cut_done.set()

    async def _accept(self, client_in: asyncio.StreamReader,
                      client_out: asyncio.StreamWriter) -> None:  # fmt: skip
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            try:
                server_in, server_out = await asyncio.open_connection(*self.upstream)
            except OSError:
                client_out.transport.abort()
                return
            pair = (client_out, server_out)
            self._connections.add(pair)
            self.stats.connections += 1
            self.stats.open_connections += 1
            try:
                await asyncio.gather(
                    self._pump(client_in, server_out, upstream=True),
                    self._pump(server_in, client_out, upstream=False),
                )
            finally:
                self._connections.discard(pair)
                self.stats.open_connections -= 1
                for writer in pair:
                    writer.transport.abort()
        finally:
            self._tasks.discard(task)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    *, upstream: bool) -> None:  # fmt: skip
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(MAX_QUEUED)

        async def write() -> None:
            while True:
                due, data = await queue.get()
                if not data:
                    writer.write_eof()
                    return
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                writer.write(data)
                await writer.drain()

        writing = asyncio.create_task(write())
        try:
            while True:
                data = await reader.read(READ_BYTES)
                await queue.put((time.monotonic() + self.delay, data))
                if not data:
                    break
                if upstream:
                    self.stats.bytes_upstream += len(data)
                    if self._cut_at is not None and self.stats.bytes_upstream >= self._cut_at:
                        self._cut_now()
                else:
                    self.stats.bytes_downstream += len(data)
            await writing
        except (ConnectionError, OSError):
            pass  # cut, or one side went away: the connection's other half follows
        finally:
            writing.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError, OSError):
                await writing


async def _serve(args: argparse.Namespace) -> None:
    host, port = args.upstream.rsplit(":", 1)
    listen_host, listen_port = args.listen.rsplit(":", 1)
    proxy = DelayProxy((host, int(port)), args.delay, (listen_host, int(listen_port)))
    await proxy.start()
    loop = asyncio.get_running_loop()
    commands = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(commands), sys.stdin)
    print(f"ready {proxy.port}", flush=True)
    try:
        while line := (await commands.readline()).decode().split():
            if line[0] == "cut" and len(line) == 2:
                before = proxy.stats.connections_cut
                proxy.cut(int(line[1]))
                cut = await proxy.wait_cut()
                print(f"cut {cut - before}", flush=True)
            else:
                print(f"error unknown command {line}", flush=True)
    finally:
        await proxy.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", required=True, help="HOST:PORT to listen on")
    parser.add_argument("--upstream", required=True, help="HOST:PORT to relay to")
    parser.add_argument("--delay", type=float, required=True, help="seconds per direction")
    asyncio.run(_serve(parser.parse_args()))
