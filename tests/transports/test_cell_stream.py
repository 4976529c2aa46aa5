"""Large payloads and files through cells: the stream layer behind request/broadcast/send_file."""

from __future__ import annotations

import asyncio
import gc
import itertools
import os
import time
import weakref
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedcell.errors import StreamError, UnreachableError
from fedcell.transports import connect
from fedcell.transports.cell import CONTROL_CHANNEL, Cell, CellConfig
from fedcell.transports.message import Message, to_wire
from fedcell.transports.stream import ReceivedFile, StreamConfig, directory_sink

KiB = 1024
CONFIG = CellConfig(
    heartbeat_interval=0.1,
    peer_timeout=3.0,
    stream=StreamConfig(threshold=64 * KiB, chunk_size=64 * KiB, window=256 * KiB),
)
_urls = itertools.count()


async def double(message: Message) -> Any:
    return {name: array * 2 for name, array in message.payload.items()}


@asynccontextmanager
async def star(sinks: dict[str, Path] | None = None) -> AsyncIterator[dict[str, Cell]]:
    sinks = sinks or {}
    async with AsyncExitStack() as stack:
        url = f"inproc://cell-stream-{os.getpid()}-{next(_urls)}"
        server = await stack.enter_async_context(Cell("server", listen=url, config=CONFIG))
        cells = {"server": server}
        for name in ("site-1", "site-2", "site-3"):
            sink = directory_sink(sinks[name]) if name in sinks else None
            cells[name] = await stack.enter_async_context(
                Cell(name, parent=url, config=CONFIG, file_sink=sink)
            )
            cells[name].register("double", double)
        yield cells


def model(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "w": rng.standard_normal((300, 200)).astype(np.float32),  # 234 KiB: several chunks
        "b": rng.standard_normal(7).astype(np.float32),
    }


def test_large_request_and_reply_stream_end_to_end_through_the_server() -> None:
    async def main() -> None:
        async with star() as cells:
            # Execute
            weights = model(1)
            reply = await cells["site-1"].request("site-2", "double", weights, timeout=10)

            # Assert: both directions were streamed, relayed by a server that decoded nothing
            for name, array in weights.items():
                np.testing.assert_array_equal(reply[name], array * 2)
            assert cells["site-2"].statistics().streams.streams_received == 1
            assert cells["site-1"].statistics().streams.streams_received == 1
            server = cells["server"].statistics()
            assert server.streams.streams_received == 0 and server.messages_relayed > 4

    asyncio.run(main())


def test_large_broadcast_encodes_once_and_collects_every_reply() -> None:
    async def main() -> None:
        async with star() as cells:
            weights = model(2)
            results = await cells["server"].broadcast(
                ["site-1", "site-2", "site-3"], "double", weights, timeout=10
            )
            for name in ("site-1", "site-2", "site-3"):
                np.testing.assert_array_equal(results[name]["w"], weights["w"] * 2)
            streams = cells["server"].statistics().streams
            assert streams.streams_sent == 3
            chunks = -(-(weights["w"].nbytes + weights["b"].nbytes) // (64 * KiB))
            assert streams.chunks_encoded == chunks  # once, not once per site

    asyncio.run(main())


def test_send_file_lands_in_the_sink_and_reaches_the_handler(tmp_path: Path) -> None:
    async def main() -> None:
        inbox = tmp_path / "inbox"
        inbox.mkdir()
        source = tmp_path / "weights.bin"
        source.write_bytes(os.urandom(700 * KiB))
        async with star({"site-2": inbox}) as cells:
            got: asyncio.Queue[Message] = asyncio.Queue()

            async def on_file(message: Message) -> None:
                await got.put(message)

            cells["site-2"].register("files", on_file)

            # Execute
            digest = await cells["site-1"].send_file(
                "site-2", source, channel="files", meta={"round": 3}
            )

            # Assert
            message = await asyncio.wait_for(got.get(), 5)
            received = message.payload
            assert isinstance(received, ReceivedFile)
            assert received.digest == digest and received.meta == {"round": 3}
            assert Path(received.path).read_bytes() == source.read_bytes()
            assert message.sender == "site-1"

            # a cell without a file sink refuses files, clearly
            with pytest.raises(StreamError):
                await cells["site-1"].send_file("site-3", source, channel="files")

    asyncio.run(main())


def test_a_streamed_request_to_a_peer_that_goes_silent_fails_as_unreachable() -> None:
    async def main() -> None:
        async with star() as cells:
            # Prepare: a raw peer completes the handshake, then never answers (no GRANT, no ping)
            server = cells["server"]
            mute = await connect(server.url)
            hello = Message.create(
                "mute", "", CONTROL_CHANNEL, {"name": "mute", "claims": {}}, topic="hello"
            )
            await mute.send(to_wire(hello))
            await asyncio.wait_for(_until(lambda: "mute" in server.peers), 5)

            # Execute
            start = time.monotonic()
            with pytest.raises(UnreachableError, match="'mute' is gone"):
                await server.request("mute", "double", model(3), timeout=60)

            # Assert: failed at the peer timeout, long before the stream's stall timeout
            assert time.monotonic() - start < CONFIG.peer_timeout + 2
            assert server.statistics().streams.open_outbound == 0
            await mute.close()

    asyncio.run(main())


async def _until(predicate: Callable[[], bool]) -> None:
    while not predicate():
        await asyncio.sleep(0.01)


def test_a_streamed_broadcast_keeps_no_reply_once_it_is_handed_over() -> None:
    # In-time aggregation over cells: a consumer that drops each reply must hold one at a time,
    # even while the broadcast is still waiting for slower targets.
    async def main() -> None:
        async with star() as cells:
            release = asyncio.Event()

            async def slow_double(message: Message) -> Any:
                await release.wait()
                return await double(message)

            cells["site-3"].unregister("double")
            cells["site-3"].register("double", slow_double)
            replies = cells["server"].broadcast_replies(
                ["site-1", "site-2", "site-3"], "double", model(0), timeout=10
            )
            # Execute: take the two fast replies, keep only weak references to them.
            fast = []
            for _ in range(2):
                site, reply = await anext(replies)
                fast.append(weakref.ref(reply["w"]))
                del reply
            gc.collect()
            # Assert: neither fast reply is still held by the cell while site-3 works.
            assert all(ref() is None for ref in fast)
            release.set()
            site, reply = await anext(replies)
            assert site == "site-3" and np.array_equal(reply["w"], model(0)["w"] * 2)
            await replies.aclose()

    asyncio.run(main())
