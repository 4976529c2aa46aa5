"""The delaying/cutting proxy itself, and a cut stream through it between two cells on loopback.

These need no namespaces (and no root): everything runs on this process's event loop over
``127.0.0.1``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

import numpy as np
import pytest
from delay_proxy import DelayProxy

from fedcell.errors import UnreachableError
from fedcell.transports.cell import Cell, CellConfig
from fedcell.transports.message import Message
from fedcell.transports.stream import StreamConfig

MiB = 1024 * 1024

pytestmark = pytest.mark.integration


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def _until(predicate: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


def test_the_proxy_delays_each_direction_and_a_cut_resets_its_connections() -> None:
    async def main() -> None:
        # Prepare: an echo server behind a proxy adding 50 ms each way
        echo = await asyncio.start_server(_echo, "127.0.0.1", 0)
        proxy = DelayProxy(("127.0.0.1", echo.sockets[0].getsockname()[1]), delay=0.05)
        await proxy.start()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            # Execute + Assert: a round trip costs both delays
            started = time.monotonic()
            writer.write(b"ping")
            assert await reader.readexactly(4) == b"ping"
            assert 0.1 <= time.monotonic() - started < 1.0
            # a cut armed for 1 MiB resets the connection in the middle of a 4 MiB transfer
            proxy.cut(after_bytes=MiB)
            with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
                writer.write(bytes(4 * MiB))
                await writer.drain()
                await reader.readexactly(4 * MiB)
            assert await proxy.wait_cut() == 1
            assert proxy.stats.bytes_upstream < 4 * MiB
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
            # new connections get through as before
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            writer.write(b"again")
            assert await reader.readexactly(5) == b"again"
            writer.close()
            await writer.wait_closed()
            assert proxy.stats.connections == 2 and proxy.stats.cuts == 1
        finally:
            await proxy.close()
            echo.close()
            await echo.wait_closed()

    asyncio.run(main())


def test_a_stream_cut_near_its_end_is_dropped_by_the_receiver_when_the_sender_says_hello() -> None:
    """The cut lands after the sender handed every chunk to the kernel: no later chunk reveals
    the gap, and the sender's CANCEL cannot get through. The receiver must not keep the stream
    (and its admission budget, here smaller than one model) until the 30 s stall timeout."""

    async def main() -> None:
        # Prepare: site -> proxy -> server over tcp loopback; the server admits one model at a time
        stream = StreamConfig(codec="none", max_inbound_bytes=16 * MiB)
        received: list[int] = []

        async def on_model(message: Message) -> int:
            received.append(int(message.payload["w"][0]))
            return received[-1]

        async with Cell("server", listen="tcp://127.0.0.1:0",
                        config=CellConfig(stream=stream)) as server:  # fmt: skip
            server.register("model", on_model)
            host, port = server.url.removeprefix("tcp://").rsplit(":", 1)
            proxy = DelayProxy((host, int(port)), delay=0.0)
            await proxy.start()
            try:
                async with Cell("site-1", parent=f"tcp://127.0.0.1:{proxy.port}",
                                config=CellConfig(stream=stream)) as site:  # fmt: skip
                    model = {"w": np.full(12 * MiB, 1, dtype=np.float32)}  # 48 MiB
                    # Execute: cut every connection 1.5 MiB before the stream's end
                    proxy.cut(after_bytes=48 * MiB - 3 * MiB // 2)
                    with pytest.raises(UnreachableError, match="transport reports disconnected"):
                        await site.request("server", "model", model, timeout=60)
                    await _until(lambda: site.parent == "server", timeout=10)
                    started = time.monotonic()
                    model["w"][:] = 2
                    reply = await site.request("server", "model", model, timeout=60)
                    seconds = time.monotonic() - started
            finally:
                await proxy.close()
            stats = server.statistics().streams

        # Assert: the fresh stream was served at once; the cut one failed and was never handed on
        assert reply == 2 and received == [2]
        assert seconds < 10, f"the fresh stream waited {seconds:.1f} s behind the cut one"
        assert stats.streams_failed == 1 and stats.streams_received == 1
        assert stats.open_inbound == 0 and stats.inbound_bytes_admitted == 0

    asyncio.run(main())
