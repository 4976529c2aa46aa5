"""Array sinks: a streamed message's arrays consumed piece by piece, never assembled."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest
import torch
from stream_harness import StreamNet

from fedcell.errors import (
    ProtocolError,
    StreamError,
    StreamIntegrityError,
)
from fedcell.transports.array_sink import ArraySink
from fedcell.transports.codec import ArraySpec
from fedcell.transports.message import Envelope, Message
from fedcell.transports.stream import StreamConfig
from fedcell.transports.stream_protocol import Data, parse_header

KiB = 1024


class Recorder(ArraySink):
    """Copies every piece into arrays shaped like the skeleton's specs; records the calls."""

    def __init__(self, skeleton: Any) -> None:
        self.skeleton = skeleton
        specs = [v for v in _specs(skeleton)]
        self.itemsizes = {s.frame: s.nbytes // max(1, int(np.prod(s.shape))) for s in specs}
        self.buffers = {s.frame: bytearray(s.nbytes) for s in specs}
        self.pieces: list[tuple[int, int, int]] = []
        self.finished = False
        self.aborted: StreamError | None = None

    def write(self, frame: int, start: int, data: memoryview) -> None:
        self.pieces.append((frame, start, data.nbytes))
        self.buffers[frame][start : start + data.nbytes] = data

    def finish(self) -> Any:
        self.finished = True
        return {"folded": sorted(self.buffers)}

    def abort(self, error: StreamError) -> None:
        self.aborted = error


def _specs(value: Any) -> list[ArraySpec]:
    if isinstance(value, ArraySpec):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _specs(v)]
    return []


def _payload() -> dict[str, Any]:
    rng = np.random.default_rng(3)
    return {
        "odd": np.arange(3, dtype=np.uint8),  # shifts every later element off the chunk grid
        "f32": rng.standard_normal(5_001).astype(np.float32),
        "f64": rng.standard_normal((77, 13)),
        "bf16": torch.randn(3_333).to(torch.bfloat16),
        "i16": np.arange(-999, 1000, dtype=np.int16),
        "meta": {"weight": 3, "name": "site-1"},
    }


def _as_bytes(array: Any) -> bytes:
    if isinstance(array, torch.Tensor):
        return bytes(array.view(torch.uint16).numpy().tobytes())
    return bytes(np.ascontiguousarray(array).tobytes())


@pytest.mark.parametrize("codec", ["none", "blosc2-lz4"])
def test_pieces_are_whole_elements_and_add_up_to_every_array(codec: str) -> None:
    async def main() -> None:
        # Prepare: 1000-byte chunks cut elements of every dtype (1, 2, 4, 8 bytes) apart
        config = StreamConfig(chunk_size=1000, window=8 * KiB, codec=codec)
        sinks: list[Recorder] = []

        def hook(peer: str, sid: int, envelope: Envelope, skeleton: Any) -> ArraySink:
            sinks.append(Recorder(skeleton))
            return sinks[-1]

        net = StreamNet()
        sender = net.add("a", config)
        net.add("b", config, array_sink=hook)
        payload = _payload()
        try:
            # Execute
            await sender.send_message("b", Message.create("a", "b", "ch", payload))
            delivered = await net.next_delivery("b")
        finally:
            await net.close()

        # Assert: the sink saw the skeleton first, then whole elements that rebuild every array
        (sink,) = sinks
        assert sink.finished and sink.aborted is None
        assert delivered.payload == {"folded": [0, 1, 2, 3, 4]}
        assert sink.skeleton["meta"] == {"weight": 3, "name": "site-1"}
        assert sink.skeleton["bf16"] == ArraySpec("torch", "bfloat16", (3_333,), 3)
        arrays = [payload[k] for k in ("odd", "f32", "f64", "bf16", "i16")]
        for frame, array in enumerate(arrays):
            assert bytes(sink.buffers[frame]) == _as_bytes(array)
        for frame, start, nbytes in sink.pieces:
            assert start % sink.itemsizes[frame] == 0 and nbytes % sink.itemsizes[frame] == 0
        assert len(sink.pieces) > 20  # really cut in pieces
        stats = net.endpoints["b"].statistics()
        assert stats.streams_received == 1 and stats.arrays_reused == 0

    asyncio.run(main())


def test_a_chunk_failing_its_checksum_aborts_the_sink_after_the_verified_pieces() -> None:
    async def main() -> None:
        config = StreamConfig(chunk_size=4 * KiB, window=16 * KiB, codec="none")
        sinks: list[Recorder] = []

        def hook(peer: str, sid: int, envelope: Envelope, skeleton: Any) -> ArraySink:
            sinks.append(Recorder(skeleton))
            return sinks[-1]

        def corrupt_chunk_3(src: str, dst: str, frames: list[bytes]) -> list[bytes]:
            header = parse_header(frames[0], 1 << 30)
            if isinstance(header, Data) and header.seq == 3:
                return [frames[0], bytes([frames[1][0] ^ 1]) + frames[1][1:]]
            return frames

        net = StreamNet()
        sender = net.add("a", config)
        net.add("b", config, array_sink=hook)
        net.tamper = corrupt_chunk_3
        try:
            with pytest.raises(StreamIntegrityError, match="chunk 3 fails its checksum"):
                await sender.send_message(
                    "b", Message.create("a", "b", "ch", np.arange(10_000, dtype=np.float32))
                )
            assert net.delivered["b"].empty()
        finally:
            await net.close()

        # Only the three verified chunks reached the sink, then it was told why it stops
        (sink,) = sinks
        assert sum(n for _, _, n in sink.pieces) == 3 * 4 * KiB
        assert isinstance(sink.aborted, StreamIntegrityError) and not sink.finished

    asyncio.run(main())


def test_a_hook_that_refuses_fails_the_sender_and_the_endpoint_keeps_serving() -> None:
    async def main() -> None:
        config = StreamConfig(chunk_size=4 * KiB, window=16 * KiB, codec="none")

        def hook(peer: str, sid: int, envelope: Envelope, skeleton: Any) -> ArraySink | None:
            if skeleton.get("refuse"):
                raise ProtocolError("this result has the wrong keys")
            return None  # assembled as usual

        net = StreamNet()
        sender = net.add("a", config)
        net.add("b", config, array_sink=hook)
        try:
            refused = {"refuse": True, "w": np.zeros(10_000, np.float32)}
            with pytest.raises(StreamError, match="the wrong keys"):
                await sender.send_message("b", Message.create("a", "b", "ch", refused))
            kept = {"refuse": False, "w": np.arange(10_000, dtype=np.float32)}
            await sender.send_message("b", Message.create("a", "b", "ch", kept))
            delivered = await net.next_delivery("b")
        finally:
            await net.close()
        np.testing.assert_array_equal(delivered.payload["w"], kept["w"])
        assert net.endpoints["b"].statistics().inbound_bytes_admitted == 0

    asyncio.run(main())


def test_streams_into_array_sinks_cost_a_window_of_the_inbound_budget() -> None:
    async def main() -> None:
        # Prepare: a budget that admits one 400 KiB message at a time, or several sunk streams
        config = StreamConfig(
            chunk_size=16 * KiB, window=64 * KiB, codec="none", max_inbound_bytes=256 * KiB
        )
        net = StreamNet()
        senders = [net.add(name, config) for name in ("a", "c", "d")]
        net.add("b", config, array_sink=lambda peer, sid, env, skeleton: Recorder(skeleton))
        net.delay = 0.001
        try:
            # Execute
            await asyncio.gather(
                *(
                    s.send_message(
                        "b", Message.create(s.name, "b", "ch", np.ones(100 * KiB, np.float32))
                    )
                    for s in senders
                )
            )
            stats = net.endpoints["b"].statistics()
        finally:
            await net.close()

        # Assert: the three streams were admitted together, each charged one window
        assert stats.peak_inbound_bytes_admitted == 3 * 64 * KiB
        assert stats.streams_received == 3

    asyncio.run(main())
