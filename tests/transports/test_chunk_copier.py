"""Received chunks copied into their arrays on the copier's thread, beside the event loop."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading

import numpy as np
import pytest
from stream_harness import StreamNet

import fedcell.transports.stream_receiver as receiver
from fedcell.errors import StreamError, StreamIntegrityError
from fedcell.transports import codec
from fedcell.transports.message import Envelope, Message
from fedcell.transports.stream import StreamConfig
from fedcell.transports.stream_protocol import Data, parse_header
from fedcell.transports.stream_receiver import (
    COPIED_APART_MIN_BYTES,
    COPIER_MIN_CORES,
    COPY_AHEAD,
    ArrayPool,
    ChunkCopier,
    MessageSink,
)

MiB = 1024 * 1024


def sink_for(payload: dict[str, np.ndarray], copier: ChunkCopier) -> tuple[MessageSink, list[memoryview]]:
    tree, buffers = codec.encode(payload)
    tree = codec.unpack_tree(codec.pack_tree(tree))
    specs = codec.array_specs(tree)
    envelope = Envelope("site-1", "server", "model")
    return MessageSink(envelope, tree, specs, ArrayPool(64 * MiB), copier), [
        memoryview(b).cast("B") for b in buffers
    ]


def test_chunks_land_in_the_arrays_large_pieces_on_the_copier_thread() -> None:
    rng = np.random.default_rng(0)
    payload = {"w": rng.standard_normal(3 * MiB // 4).astype(np.float32), "b": np.arange(10.0)}
    copier = ChunkCopier(threaded=True)
    threads: set[str] = set()
    real_submit = copier.submit

    def watched(target: memoryview, data: object) -> concurrent.futures.Future[None]:
        future = real_submit(target, data)  # type: ignore[arg-type]
        future.add_done_callback(lambda _: threads.add(threading.current_thread().name))
        return future

    copier.submit = watched  # type: ignore[method-assign]
    sink, buffers = sink_for(payload, copier)
    raw = b"".join(bytes(b) for b in buffers)
    chunk = 1 * MiB  # chunks that span both arrays, and a short last one
    for offset in range(0, len(raw), chunk):
        sink.write(offset, [memoryview(raw)[offset : offset + chunk]])
    message = sink.finish("digest")
    copier.close()
    assert np.array_equal(message.payload["w"], payload["w"])
    assert np.array_equal(message.payload["b"], payload["b"])
    assert any(name.startswith("fedcell-stream-copy") for name in threads)
    assert not any(t.name.startswith("fedcell-stream-copy") for t in threading.enumerate())


def test_a_failed_copy_fails_the_stream_at_finish() -> None:
    class Broken(ChunkCopier):
        def submit(self, target: memoryview, data: object) -> concurrent.futures.Future[None]:
            future: concurrent.futures.Future[None] = concurrent.futures.Future()
            future.set_exception(MemoryError("no room"))
            return future

    sink, buffers = sink_for({"w": np.ones(COPIED_APART_MIN_BYTES, np.uint8)}, Broken(threaded=True))
    sink.write(0, buffers)
    with pytest.raises(StreamError, match=r"copying received chunks.*no room"):
        sink.finish("digest")


def test_copies_run_at_most_copy_ahead_behind_the_writer() -> None:
    started: list[concurrent.futures.Future[None]] = []

    class Held(ChunkCopier):
        def submit(self, target: memoryview, data: object) -> concurrent.futures.Future[None]:
            future: concurrent.futures.Future[None] = concurrent.futures.Future()
            started.append(future)
            return future

    size = COPIED_APART_MIN_BYTES
    sink, buffers = sink_for({"w": np.ones((COPY_AHEAD + 3) * size, np.uint8)}, Held(threaded=True))
    whole = buffers[0]
    release = threading.Timer(0.05, lambda: [f.set_result(None) for f in list(started) if not f.done()])
    release.start()
    for i in range(COPY_AHEAD):
        sink.write(i * size, [whole[i * size : (i + 1) * size]])
    assert len(started) == COPY_AHEAD  # nothing waited yet
    sink.write(COPY_AHEAD * size, [whole[COPY_AHEAD * size : (COPY_AHEAD + 1) * size]])
    assert started[0].done()  # the writer waited for the oldest copy before going on
    release.join()
    for f in started:
        if not f.done():
            f.set_result(None)
    sink.abort()


@pytest.mark.parametrize("closed", [True, False])
def test_unthreaded_or_closed_copies_run_on_the_callers_thread(closed: bool) -> None:
    copier = ChunkCopier(threaded=closed)
    if closed:
        copier.close()
    assert not copier.threaded
    with pytest.raises(RuntimeError, match="no thread"):
        copier.submit(memoryview(bytearray(8)), b"abcdefgh")
    payload = {"w": np.arange(COPIED_APART_MIN_BYTES, dtype=np.uint8)}
    sink, buffers = sink_for(payload, copier)
    sink.write(0, buffers)
    assert bytes(codec.writable_bytes(sink._arrays[0])) == payload["w"].tobytes()  # written now
    assert not any(t.name.startswith("fedcell-stream-copy") for t in threading.enumerate())


def test_the_copier_thread_is_used_only_with_enough_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(receiver, "_usable_cores", lambda: COPIER_MIN_CORES - 1)
    assert not ChunkCopier().threaded  # the sink copies inline
    monkeypatch.setattr(receiver, "_usable_cores", lambda: COPIER_MIN_CORES)
    assert ChunkCopier().threaded


def test_endpoints_stream_through_the_copier_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    # Endpoints made as on a machine with cores to spare: chunks of 512 KiB go to the thread.
    monkeypatch.setattr(receiver, "_usable_cores", lambda: 64)
    config = StreamConfig(threshold=0, chunk_size=512 * 1024, window=2 * MiB, codec="none",
                          stall_timeout=5.0)  # fmt: skip
    rng = np.random.default_rng(1)
    payload = {f"w{i}": rng.standard_normal(300_000 + i).astype(np.float32) for i in range(4)}

    def corrupt_chunk_3_of_the_second_stream(src: str, dst: str, frames: list[bytes]) -> list[bytes] | None:
        header = parse_header(frames[0], 1 << 30)
        if not isinstance(header, Data):
            return frames
        if header.sid not in sids:
            sids.append(header.sid)
        if sids.index(header.sid) == 1 and header.seq == 3:
            data = bytearray(frames[1])
            data[7] ^= 0x10
            return [frames[0], bytes(data)]
        return frames

    sids: list[int] = []

    async def main() -> None:
        net = StreamNet()
        a, b = net.add("a", config), net.add("b", config)
        net.tamper = corrupt_chunk_3_of_the_second_stream
        try:
            assert b._copier.threaded
            await a.send_message("b", Message.create("a", "b", "ch", payload))
            first = (await net.next_delivery("b")).payload
            for key, value in payload.items():
                assert np.array_equal(first[key], value)
            with pytest.raises(StreamIntegrityError, match="chunk 3 fails its checksum"):
                await a.send_message("b", Message.create("a", "b", "ch", payload))
            await a.send_message("b", Message.create("a", "b", "ch", payload))
            third = (await net.next_delivery("b")).payload
            for key, value in payload.items():
                assert np.array_equal(third[key], value)
            assert net.delivered["b"].empty()  # nothing of the corrupted stream was handed on
        finally:
            await net.close()

    asyncio.run(main())
    assert not any(t.name.startswith("fedcell-stream-copy") for t in threading.enumerate())
