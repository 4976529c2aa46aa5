"""Every way a stream can fail is rejected clearly, and the endpoint keeps serving afterwards."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import msgpack
import numpy as np
import pytest
import xxhash
from stream_harness import StreamNet

from fedcell.errors import (
    StreamCancelledError,
    StreamError,
    StreamIntegrityError,
    StreamStalledError,
    UnreachableError,
)
from fedcell.transports import compression
from fedcell.transports.message import Message
from fedcell.transports.stream import StreamConfig, StreamEndpoint
from fedcell.transports.stream_protocol import Data, Open, pack_header, parse_header

KiB = 1024
CONFIG = StreamConfig(chunk_size=16 * KiB, window=64 * KiB, codec="none", stall_timeout=0.4)
PAYLOAD = np.random.default_rng(0).standard_normal(50_000).astype(np.float32)  # 200 KB, 13 chunks


def _message(payload: Any = PAYLOAD) -> Message:
    return Message.create("a", "b", "ch", payload)


def _header(frames: list[bytes]) -> Any:
    return parse_header(frames[0], 1 << 30)


def _rewrite(frames: list[bytes], **fields: Any) -> list[bytes]:
    raw = msgpack.unpackb(frames[0], raw=False)
    raw.update(fields)
    return [msgpack.packb(raw, use_bin_type=True), *frames[1:]]


async def _still_serves(net: StreamNet, sender: StreamEndpoint) -> None:
    """A clean stream after the failure goes through and nothing else was delivered."""
    payload = np.arange(40_000, dtype=np.int32)
    await sender.send_message("b", _message(payload))
    received = await net.next_delivery("b")
    assert np.array_equal(received.payload, payload)
    assert net.delivered["b"].empty()


def _run_failure(
    tamper: Callable[[str, str, list[bytes]], list[bytes] | None],
    expected: type[StreamError],
    match: str,
    config: StreamConfig = CONFIG,
    payload: Any = PAYLOAD,
) -> StreamNet:
    """Send ``payload`` a→b through ``tamper`` (applied to the first stream only); check the
    sender raises ``expected`` and the receiver reported a failure; then check b still serves."""

    async def main() -> StreamNet:
        net = StreamNet()
        a = net.add("a", config)
        net.add("b", config)
        first_stream: list[int] = []

        def tamper_first(src: str, dst: str, frames: list[bytes]) -> list[bytes] | None:
            sid = _header(frames).sid
            if not first_stream:
                first_stream.append(sid)
            return tamper(src, dst, frames) if sid == first_stream[0] else frames

        net.tamper = tamper_first
        try:
            with pytest.raises(expected, match=match):
                await a.send_message("b", _message(payload))
            assert net.delivered["b"].empty()
            await _still_serves(net, a)
            stats = net.endpoints["b"].statistics()
            assert stats.open_inbound == 0 and stats.inbound_bytes_admitted == 0
        finally:
            await net.close()
        return net

    return asyncio.run(main())


def test_corrupted_chunk_fails_both_sides_with_integrity_error() -> None:
    def flip_a_bit(src: str, dst: str, frames: list[bytes]) -> list[bytes] | None:
        header = _header(frames)
        if isinstance(header, Data) and header.seq == 5:
            data = bytearray(frames[1])
            data[100] ^= 0x01
            return [frames[0], bytes(data)]
        return frames

    net = _run_failure(flip_a_bit, StreamIntegrityError, "chunk 5 fails its checksum")
    assert [(n, type(e)) for n, _, _, e in net.failures] == [("b", StreamIntegrityError)]


def test_lost_chunk_fails_with_integrity_error() -> None:
    def drop_chunk_3(src: str, dst: str, frames: list[bytes]) -> list[bytes] | None:
        header = _header(frames)
        return None if isinstance(header, Data) and header.seq == 3 else frames

    _run_failure(drop_chunk_3, StreamIntegrityError, r"expected chunk 3 at byte 49152 \(a chunk was lost\)")


def test_truncated_stream_fails_at_end() -> None:
    def drop_last_chunk(src: str, dst: str, frames: list[bytes]) -> list[bytes] | None:
        header = _header(frames)
        return None if isinstance(header, Data) and header.seq == 12 else frames

    _run_failure(drop_last_chunk, StreamIntegrityError, "truncated")


def test_wrong_whole_stream_digest_fails() -> None:
    def bad_digest(src: str, dst: str, frames: list[bytes]) -> list[bytes] | None:
        if _header(frames).__class__.__name__ == "End":
            return _rewrite(frames, digest=b"\0" * 16)
        return frames

    _run_failure(bad_digest, StreamIntegrityError, "whole-stream checksum mismatch")


def test_compressed_chunk_that_decompresses_to_other_bytes_fails_the_whole_stream_digest() -> None:
    # A well-formed chunk of the right length, its wire hash recomputed: only the digest over the
    # chunks' raw-content hashes (taken after decompression) can tell it is not what was sent.
    codec = compression.get_codec("blosc2-lz4")
    config = StreamConfig(chunk_size=16 * KiB, window=64 * KiB, codec="blosc2-lz4",
                          stall_timeout=0.4)  # fmt: skip
    payload = np.zeros(50_000, dtype=np.float32)

    def other_content(src: str, dst: str, frames: list[bytes]) -> list[bytes] | None:
        header = _header(frames)
        if isinstance(header, Data) and header.seq == 1 and header.codec != "none":
            packed = bytes(codec.compress(np.ones(header.raw // 4, np.float32).tobytes(), 4))
            return _rewrite([frames[0], packed], hash=xxhash.xxh3_64_intdigest(packed))
        return frames

    net = _run_failure(other_content, StreamIntegrityError, "whole-stream checksum mismatch", config,
                       payload)  # fmt: skip
    assert [(n, type(e)) for n, _, _, e in net.failures] == [("b", StreamIntegrityError)]


def test_a_header_of_another_protocol_version_fails_the_stream_it_names() -> None:
    def version_1(src: str, dst: str, frames: list[bytes]) -> list[bytes] | None:
        return _rewrite(frames, v=1) if isinstance(_header(frames), Open) else frames

    _run_failure(version_1, StreamError, "unsupported stream protocol version 1")


def test_unknown_codec_in_open_is_refused() -> None:
    def unknown_codec(src: str, dst: str, frames: list[bytes]) -> list[bytes] | None:
        return _rewrite(frames, codec="zip-9000") if isinstance(_header(frames), Open) else frames

    _run_failure(unknown_codec, StreamError, "unknown compression codec 'zip-9000'")


def test_chunk_with_an_unannounced_codec_is_refused() -> None:
    def other_codec(src: str, dst: str, frames: list[bytes]) -> list[bytes] | None:
        header = _header(frames)
        if isinstance(header, Data) and header.seq == 2:
            return _rewrite(frames, codec="blosc2-zstd")
        return frames

    _run_failure(other_codec, StreamError, "codec 'blosc2-zstd' was not announced")


def test_chunk_that_does_not_decompress_is_refused() -> None:
    # The chunk's checksum is recomputed over the garbage, so only decompression can catch it.
    def garbage(src: str, dst: str, frames: list[bytes]) -> list[bytes] | None:
        header = _header(frames)
        if isinstance(header, Data) and header.seq == 1 and header.codec != "none":
            junk = b"\x02\x01" + bytes(range(200))
            return _rewrite([frames[0], junk], hash=xxhash.xxh3_64_intdigest(junk))
        return frames

    config = StreamConfig(chunk_size=16 * KiB, window=64 * KiB, codec="blosc2-lz4")
    zeros = np.zeros(50_000, dtype=np.float32)

    async def main() -> None:
        net = StreamNet()
        a = net.add("a", config)
        b = net.add("b", config)
        net.tamper = garbage
        try:
            with pytest.raises(StreamError, match="blosc2-lz4 chunk"):
                await a.send_message("b", _message(zeros))
            net.tamper = None
            await _still_serves(net, a)
            assert b.statistics().rejected_frames == 1
        finally:
            await net.close()

    asyncio.run(main())


def test_oversized_open_header_is_refused() -> None:
    # The receiver accepts headers up to 4 KiB; a payload tree of 2,000 keys is larger.
    small_headers = StreamConfig(chunk_size=16 * KiB, window=64 * KiB, codec="none",
                                 max_header_bytes=4 * KiB)  # fmt: skip

    async def main() -> None:
        net = StreamNet()
        a = net.add("a", CONFIG)
        b = net.add("b", small_headers)
        payload = {f"key-{i}": i for i in range(2000)} | {"w": PAYLOAD}
        try:
            with pytest.raises(StreamError, match="above the 4096 limit"):
                await a.send_message("b", _message(payload))
            assert b.statistics().rejected_frames == 1
            assert [type(e) for *_, e in net.failures] == [StreamError]
            await _still_serves(net, a)
        finally:
            await net.close()

    asyncio.run(main())


def test_malformed_frames_are_counted_and_dropped() -> None:
    async def main() -> None:
        net = StreamNet()
        a = net.add("a", CONFIG)
        b = net.add("b", CONFIG)
        bad_frames: list[list[Any]] = [
            [],
            [b"\xc1garbage"],
            [msgpack.packb([1, 2, 3])],
            [msgpack.packb({"v": 99, "t": "open", "sid": 1})],
            [msgpack.packb({"v": 1, "t": "teleport", "sid": 1})],
            [msgpack.packb({"v": 1, "t": "data", "sid": -1})],
            [msgpack.packb({"v": 1, "t": "ack", "sid": 1, "upto": "lots"})],
            [msgpack.packb(
                {"v": 1, "t": "open", "sid": 1, "kind": "virus", "size": 1, "chunk": 1,
                 "window": 1, "codec": "none", "envelope": b"", "layout": b""}
            )],
        ]
        try:
            for frames in bad_frames:
                await b.handle("a", frames)
            assert b.statistics().rejected_frames == len(bad_frames)
            await _still_serves(net, a)
        finally:
            await net.close()

    asyncio.run(main())


def test_open_with_inconsistent_layout_is_refused() -> None:
    def lie_about_size(src: str, dst: str, frames: list[bytes]) -> list[bytes] | None:
        header = _header(frames)
        return _rewrite(frames, size=header.size + 1) if isinstance(header, Open) else frames

    _run_failure(lie_about_size, StreamError, "arrays hold 200000 bytes; the stream announces 200001")


def test_oversized_chunk_size_in_open_is_refused() -> None:
    def huge_chunks(src: str, dst: str, frames: list[bytes]) -> list[bytes] | None:
        if isinstance(_header(frames), Open):
            return _rewrite(frames, chunk=1 << 40, window=1 << 41)
        return frames

    _run_failure(huge_chunks, StreamError, "chunk size 1099511627776 outside")


def test_stalled_sender_fails_within_the_bound_and_the_receiver_frees_its_budget() -> None:
    async def main() -> None:
        # Prepare: after chunk 4 nothing from the sender reaches the receiver.
        net = StreamNet()
        a = net.add("a", CONFIG)
        b = net.add("b", CONFIG)

        def cut_after_chunk_4(src: str, dst: str, frames: list[bytes]) -> list[bytes] | None:
            header = _header(frames)
            return None if src == "a" and isinstance(header, Data) and header.seq > 4 else frames

        net.tamper = cut_after_chunk_4
        try:
            # Execute
            started = time.monotonic()
            with pytest.raises(StreamStalledError):
                await a.send_message("b", _message())
            elapsed = time.monotonic() - started
            # Assert: both sides give up within 1.25 x stall_timeout (+ scheduling slack).
            assert elapsed < CONFIG.stall_timeout * 1.25 + 0.3
            await asyncio.sleep(0.05)
            assert [type(e) for *_, e in net.failures] == [StreamStalledError]
            assert b.statistics().inbound_bytes_admitted == 0
            net.tamper = None
            await _still_serves(net, a)
        finally:
            await net.close()

    asyncio.run(main())


def test_slow_transfer_that_keeps_moving_never_times_out() -> None:
    async def main() -> None:
        # Prepare: every frame takes 0.1 s; the transfer takes ~1.5 s, almost 4 stall timeouts.
        net = StreamNet()
        a = net.add("a", CONFIG)
        net.add("b", CONFIG)
        net.delay = 0.1
        try:
            started = time.monotonic()
            await a.send_message("b", _message())
            received = await net.next_delivery("b")
            elapsed = time.monotonic() - started
        finally:
            await net.close()
        assert elapsed > 2 * CONFIG.stall_timeout
        assert np.array_equal(received.payload, PAYLOAD)
        assert net.failures == []

    asyncio.run(main())


@pytest.mark.parametrize("side", ["sender", "receiver"])
def test_cancel_from_either_side_fails_both_with_cancelled(side: str) -> None:
    async def main() -> None:
        net = StreamNet()
        a = net.add("a", CONFIG)
        b = net.add("b", CONFIG)
        net.delay = 0.01
        try:
            sending = asyncio.create_task(a.send_message("b", _message()))
            while not [s for s in b.streams() if s.done_bytes > 0]:
                await asyncio.sleep(0.005)
            if side == "sender":
                (info,) = a.streams()
                a.cancel(info.peer, info.sid, "operator abort")
            else:
                (info,) = b.streams()
                b.cancel(info.peer, info.sid, "operator abort")
            with pytest.raises(StreamCancelledError, match="operator abort"):
                await sending
            await asyncio.sleep(0.1)
            assert [(n, type(e)) for n, _, _, e in net.failures] == [("b", StreamCancelledError)]
            assert a.streams() == [] and b.streams() == []
            net.delay = 0.0
            await _still_serves(net, a)
        finally:
            await net.close()

    asyncio.run(main())


def test_cancelling_the_sending_task_cancels_the_receiver() -> None:
    async def main() -> None:
        net = StreamNet()
        a = net.add("a", CONFIG)
        b = net.add("b", CONFIG)
        net.delay = 0.01
        try:
            sending = asyncio.create_task(a.send_message("b", _message()))
            while not [s for s in b.streams() if s.done_bytes > 0]:
                await asyncio.sleep(0.005)
            sending.cancel()
            with pytest.raises(asyncio.CancelledError):
                await sending
            await asyncio.sleep(0.2)
            assert [(n, type(e)) for n, _, _, e in net.failures] == [("b", StreamCancelledError)]
            assert b.streams() == []
        finally:
            await net.close()

    asyncio.run(main())


def test_closing_an_endpoint_cancels_its_streams_on_both_sides() -> None:
    async def main() -> None:
        net = StreamNet()
        a = net.add("a", CONFIG)
        b = net.add("b", CONFIG)
        net.delay = 0.01
        try:
            sending = asyncio.create_task(a.send_message("b", _message()))
            while not b.streams():
                await asyncio.sleep(0.005)
            await b.close()
            with pytest.raises(StreamCancelledError, match="closing"):
                await sending
            with pytest.raises(StreamCancelledError, match="closed"):
                await b.send_message("a", _message())
        finally:
            await net.close()

    asyncio.run(main())


def test_frames_for_unknown_streams_are_ignored() -> None:
    async def main() -> None:
        net = StreamNet()
        a = net.add("a", CONFIG)
        b = net.add("b", CONFIG)
        try:
            await b.handle("a", [pack_header(Data(12345, 0, 0, 10, "none", 0)), b"0123456789"])
            assert b.statistics().rejected_frames == 0 and b.streams() == []
            await _still_serves(net, a)
        finally:
            await net.close()

    asyncio.run(main())


def test_a_peer_the_cell_cannot_reach_fails_the_send_and_leaves_nothing_open() -> None:
    async def main() -> None:
        # Prepare: the cell's send raises, as it does when no route leads to the peer.
        async def no_route(peer: str, frames: list[Any]) -> None:
            raise UnreachableError(f"no route to {peer!r}")

        async def deliver(message: Message) -> None:
            raise AssertionError("nothing can be delivered")

        endpoint = StreamEndpoint(no_route, deliver, CONFIG, name="a")
        try:
            # Execute / Assert
            with pytest.raises(UnreachableError, match="no route to 'nowhere'"):
                await endpoint.send_message("nowhere", _message())
            stats = endpoint.statistics()
            assert endpoint.streams() == [] and stats.open_outbound == 0
            assert stats.streams_failed == 1 and stats.streams_sent == 0
        finally:
            await endpoint.close()

    asyncio.run(main())
