"""Stream round trips, window, broadcast and admission over in-memory endpoint pairs."""

from __future__ import annotations

import asyncio
import os
import platform
import sys
import time
from typing import Any

import numpy as np
import pytest
import torch
from stream_harness import StreamNet

from fedcell.errors import ConfigError, StreamError
from fedcell.transports import compression
from fedcell.transports.base import Buffer
from fedcell.transports.codec import ArraySpec
from fedcell.transports.message import Message
from fedcell.transports.stream import StreamConfig
from fedcell.transports.stream_protocol import Ack, Data
from fedcell.transports.stream_receiver import ArrayPool

KiB = 1024
SMALL = StreamConfig(threshold=0, chunk_size=64 * KiB, window=256 * KiB, codec="none",
                     stall_timeout=5.0)  # fmt: skip


def _numpy_payload(seed: int = 0) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    return {
        "layers": [rng.standard_normal((123, 77)).astype(np.float32) for _ in range(3)],
        "bias": rng.integers(0, 1 << 40, size=1001, dtype=np.int64),
        "tiny": np.arange(3, dtype=np.uint8),
        "empty": np.zeros((0, 5), dtype=np.float64),
        "meta": {"round": 7, "name": "fedavg", "tags": ("a", "b")},
    }


def _assert_same(received: Any, sent: Any) -> None:
    if isinstance(sent, np.ndarray):
        assert isinstance(received, np.ndarray)
        assert received.dtype == sent.dtype and received.shape == sent.shape
        assert np.array_equal(received, sent)
    elif isinstance(sent, torch.Tensor):
        assert isinstance(received, torch.Tensor)
        assert received.dtype == sent.dtype and received.shape == sent.shape
        assert torch.equal(received, sent)
    elif isinstance(sent, dict):
        assert received.keys() == sent.keys()
        for key in sent:
            _assert_same(received[key], sent[key])
    elif isinstance(sent, (list, tuple)):
        assert type(received) is type(sent) and len(received) == len(sent)
        for r, s in zip(received, sent, strict=True):
            _assert_same(r, s)
    else:
        assert received == sent


def test_numpy_payload_round_trip_across_chunk_and_array_boundaries() -> None:
    async def main() -> None:
        # Prepare: 64 KiB chunks over arrays of 37,884 / 8,008 / 3 bytes: chunks span arrays.
        net = StreamNet()
        a, b = net.add("a", SMALL), net.add("b", SMALL)
        payload = _numpy_payload()
        message = Message.create("a", "b", "train", payload, topic="model", headers={"r": 1})
        try:
            # Execute
            await a.send_message("b", message)
            received = await net.next_delivery("b")
        finally:
            await net.close()
        # Assert
        assert received.envelope == message.envelope
        _assert_same(received.payload, payload)
        assert received.payload["layers"][0].flags.writeable
        stats_a, stats_b = a.statistics(), b.statistics()
        assert stats_a.streams_sent == 1 and stats_b.streams_received == 1
        assert stats_b.bytes_received == stats_a.bytes_sent == 3 * 123 * 77 * 4 + 1001 * 8 + 3
        assert stats_a.open_outbound == stats_b.open_inbound == 0
        assert stats_b.inbound_bytes_admitted == 0

    asyncio.run(main())


def test_torch_bf16_round_trip_keeps_dtype_and_bits() -> None:
    async def main() -> None:
        net = StreamNet()
        a = net.add("a", SMALL)
        net.add("b", SMALL)
        torch.manual_seed(0)
        payload = {
            "w": torch.randn(300, 129).to(torch.bfloat16),
            "h": torch.randn(1000).to(torch.float16),
            "i": torch.arange(5000, dtype=torch.int32),
        }
        try:
            await a.send_message("b", Message.create("a", "b", "train", payload))
            received = await net.next_delivery("b")
        finally:
            await net.close()
        _assert_same(received.payload, payload)

    asyncio.run(main())


def test_payload_without_arrays_streams_as_an_empty_stream() -> None:
    async def main() -> None:
        net = StreamNet()
        a = net.add("a", SMALL)
        net.add("b", SMALL)
        try:
            await a.send_message("b", Message.create("a", "b", "ch", {"x": [1, 2, 3]}))
            received = await net.next_delivery("b")
        finally:
            await net.close()
        assert received.payload == {"x": [1, 2, 3]}

    asyncio.run(main())


def test_in_flight_bytes_never_exceed_the_window() -> None:
    async def main() -> None:
        # Prepare: observe DATA and ACK headers on the wire; the receiver is slowed down so the
        # sender keeps hitting the window.
        config = StreamConfig(chunk_size=16 * KiB, window=64 * KiB, codec="none")
        net = StreamNet()
        a = net.add("a", config)
        net.add("b", config)
        sent = acked = peak = 0
        data_frames = 0

        def observe(src: str, dst: str, header: Any) -> None:
            nonlocal sent, acked, peak, data_frames
            if isinstance(header, Data):
                sent = header.offset + header.raw
                data_frames += 1
                peak = max(peak, sent - acked)
            elif isinstance(header, Ack):
                acked = max(acked, header.upto)

        net.observers.append(observe)
        net.delay = 0.0005
        payload = np.random.default_rng(1).standard_normal(200_000).astype(np.float32)
        try:
            # Execute
            await a.send_message("b", Message.create("a", "b", "ch", payload))
            received = await net.next_delivery("b")
        finally:
            await net.close()
        # Assert
        assert np.array_equal(received.payload, payload)
        assert data_frames == -(-payload.nbytes // config.chunk_size)
        assert peak == config.window  # the window fills up, and never more
        assert a.statistics().peak_in_flight == config.window

    asyncio.run(main())


def test_forced_compression_round_trip_and_incompressible_chunks_travel_raw() -> None:
    async def main() -> None:
        config = StreamConfig(chunk_size=64 * KiB, window=256 * KiB, codec="blosc2-lz4")
        net = StreamNet()
        a = net.add("a", config)
        net.add("b", config)
        codecs: list[str] = []
        net.observers.append(
            lambda src, dst, h: codecs.append(h.codec) if isinstance(h, Data) else None
        )
        rng = np.random.default_rng(2)
        weights = rng.standard_normal(100_000).astype(np.float32)
        bf16_precision = (weights.view(np.uint32) & 0xFFFF0000).view(np.float32)
        noise = rng.integers(0, 256, size=200_000, dtype=np.uint8)
        payload = {"a": bf16_precision, "b": noise}
        try:
            await a.send_message("b", Message.create("a", "b", "ch", payload))
            received = await net.next_delivery("b")
        finally:
            await net.close()
        _assert_same(received.payload, payload)
        # 400,000 bf16-precision bytes compress; the random bytes do not.
        assert codecs[:6] == ["blosc2-lz4"] * 6
        assert codecs[-3:] == ["none"] * 3
        assert a.statistics().chunks_compressed == codecs.count("blosc2-lz4")

    asyncio.run(main())


class CountingCodec:
    """A registered codec that counts its calls (and compresses with blosc2-lz4)."""

    name = "test-counting"

    def __init__(self) -> None:
        self.compress_calls = 0
        self.inner = compression.get_codec("blosc2-lz4")

    def compress(self, data: Buffer, typesize: int) -> Buffer:
        self.compress_calls += 1
        return self.inner.compress(data, typesize)

    def decompress_into(self, data: Buffer, out: memoryview) -> None:
        self.inner.decompress_into(data, out)


def test_broadcast_encodes_each_chunk_once_and_a_failing_peer_does_not_stop_the_others() -> None:
    async def main() -> None:
        # Prepare
        counting = CountingCodec()
        compression.register_codec(counting, replace=True)
        config = StreamConfig(chunk_size=32 * KiB, window=128 * KiB, codec=counting.name,
                              stall_timeout=1.0)  # fmt: skip
        net = StreamNet()
        server = net.add("server", config)
        for site in ("s1", "s2", "s3", "s4"):
            net.add(site, config)
        weights = np.random.default_rng(3).standard_normal(150_000).astype(np.float32)
        payload = {"w": (weights.view(np.uint32) & 0xFFFF0000).view(np.float32)}
        chunks = -(-payload["w"].nbytes // config.chunk_size)
        data_to: dict[str, int] = {}

        def drop_data_to_s4_after_two(src: str, dst: str, frames: list[bytes]) -> list[bytes] | None:
            if src == "server" and len(frames) > 1:
                data_to[dst] = data_to.get(dst, 0) + 1
                if dst == "s4" and data_to[dst] > 2:
                    return None
            return frames

        net.tamper = drop_data_to_s4_after_two
        message = Message.create("server", "*", "train", payload)
        try:
            # Execute
            outcome = await server.broadcast_message(["s1", "s2", "s3", "s4"], message)
            received = [await net.next_delivery(site) for site in ("s1", "s2", "s3")]
        finally:
            await net.close()
        # Assert
        assert outcome["s1"] is None and outcome["s2"] is None and outcome["s3"] is None
        assert isinstance(outcome["s4"], StreamError)
        assert counting.compress_calls == chunks
        assert server.statistics().chunks_encoded == chunks
        for site, msg in zip(("s1", "s2", "s3"), received, strict=True):
            assert msg.receiver == site
            assert np.array_equal(msg.payload["w"], payload["w"])
        assert net.delivered["s4"].empty()
        assert any(name == "s4" for name, *_ in net.failures)

    asyncio.run(main())


def test_admission_budget_bounds_concurrently_assembling_messages() -> None:
    async def main() -> None:
        # Prepare: 6 sites each send a 400 KB model to a server whose budget fits one model.
        size = 100_000 * 4
        server_config = StreamConfig(chunk_size=32 * KiB, window=64 * KiB, codec="none",
                                     max_inbound_bytes=int(size * 1.5))  # fmt: skip
        net = StreamNet()
        server = net.add("server", server_config)
        sites = [f"site-{i}" for i in range(6)]
        for site in sites:
            net.add(site, server_config)
        net.delay = 0.0002
        admitted_peak = 0
        queued_seen = 0

        def watch(src: str, dst: str, header: Any) -> None:
            nonlocal admitted_peak, queued_seen
            stats = server.statistics()
            admitted_peak = max(admitted_peak, stats.inbound_bytes_admitted)
            queued_seen = max(queued_seen, stats.queued_inbound)

        net.observers.append(watch)
        models = {s: np.full(100_000, i, dtype=np.float32) for i, s in enumerate(sites)}
        try:
            # Execute
            await asyncio.gather(*(
                net.endpoints[s].send_message("server", Message.create(s, "server", "r", models[s]))
                for s in sites
            ))  # fmt: skip
            received = [await net.next_delivery("server") for _ in sites]
        finally:
            await net.close()
        # Assert
        assert {m.sender: float(m.payload[0]) for m in received} == {
            s: float(i) for i, s in enumerate(sites)
        }
        assert admitted_peak == size  # one model at a time: 1.5 models of budget fit one
        assert server.statistics().peak_inbound_bytes_admitted == size
        assert queued_seen >= 4

    asyncio.run(main())


def test_a_message_larger_than_the_budget_is_still_admitted_alone() -> None:
    async def main() -> None:
        config = StreamConfig(chunk_size=32 * KiB, window=64 * KiB, codec="none",
                              max_inbound_bytes=10 * KiB)  # fmt: skip
        net = StreamNet()
        a = net.add("a", config)
        b = net.add("b", config)
        payload = np.arange(50_000, dtype=np.int64)
        try:
            await a.send_message("b", Message.create("a", "b", "ch", payload))
            received = await net.next_delivery("b")
        finally:
            await net.close()
        assert np.array_equal(received.payload, payload)
        assert b.statistics().peak_inbound_bytes_admitted == payload.nbytes

    asyncio.run(main())


def test_auto_codec_compresses_on_a_slow_link_and_learns_the_link_from_acks() -> None:
    async def main() -> None:
        # Prepare: the hint says 100 Mbit/s, so bf16-precision weights (half zeros) get
        # compressed; the acks then measure the in-memory link, hundreds of MB/s (the window
        # holds the whole payload: a sender kept waiting for acks would, rightly, count the
        # receiver's decompression on this same event loop as link time). Random bytes are
        # sent raw whatever the link.
        config = StreamConfig(chunk_size=256 * KiB, window=16 * 1024 * KiB,
                              link_throughput_hint=12.5e6)  # fmt: skip
        net = StreamNet()
        a = net.add("a", config)
        net.add("b", config)
        rng = np.random.default_rng(4)
        weights = rng.standard_normal(2_000_000).astype(np.float32)
        bf16_precision = (weights.view(np.uint32) & 0xFFFF0000).view(np.float32)
        noise = rng.integers(0, 256, 8_000_000, dtype=np.uint8)
        try:
            # Execute: the first stream goes by the hint, the second by the measured link.
            await a.send_message("b", Message.create("a", "b", "ch", bf16_precision))
            first_choices = a.statistics().codec_choices
            measured = a.link_throughput("b")
            await a.send_message("b", Message.create("a", "b", "ch", noise))
            received = [await net.next_delivery("b") for _ in range(2)]
        finally:
            await net.close()
        # Assert
        assert np.array_equal(received[0].payload, bf16_precision)
        assert np.array_equal(received[1].payload, noise)
        assert set(first_choices) <= {"blosc2-lz4", "blosc2-zstd"}
        assert sum(first_choices.values()) == 1
        assert measured > 10 * config.link_throughput_hint
        assert a.statistics().codec_choices == first_choices | {"none": 1}

    asyncio.run(main())


def test_config_is_validated() -> None:
    with pytest.raises(ConfigError, match="window"):
        StreamConfig(chunk_size=1024, window=512)
    with pytest.raises(ConfigError, match="unknown compression codec"):
        StreamConfig(codec="nope")
    with pytest.raises(ConfigError):
        StreamConfig(stall_timeout=0)


def test_a_stream_queued_for_admission_longer_than_the_stall_timeout_survives() -> None:
    async def main() -> None:
        # Prepare: the budget admits one 400 KB model at a time; the first transfer takes several
        # stall timeouts, so the second waits that long for its GRANT, kept alive by QUEUED.
        config = StreamConfig(chunk_size=16 * KiB, window=32 * KiB, codec="none",
                              stall_timeout=0.3, max_inbound_bytes=500_000)  # fmt: skip
        net = StreamNet()
        server = net.add("server", config)
        first, second = net.add("site-1", config), net.add("site-2", config)
        net.delay = 0.02
        model = np.ones(100_000, dtype=np.float32)
        try:
            # Execute
            started = asyncio.get_running_loop().time()
            await asyncio.gather(
                first.send_message("server", Message.create("site-1", "server", "r", model)),
                second.send_message("server", Message.create("site-2", "server", "r", model)),
            )
            elapsed = asyncio.get_running_loop().time() - started
            received = [await net.next_delivery("server") for _ in range(2)]
        finally:
            await net.close()
        # Assert
        assert elapsed > 2 * config.stall_timeout  # the second waited > 1 stall timeout
        assert sorted(m.sender for m in received) == ["site-1", "site-2"]
        assert server.statistics().peak_inbound_bytes_admitted == model.nbytes
        assert net.failures == []

    asyncio.run(main())


def test_an_ack_may_overtake_the_send_that_carried_its_chunk() -> None:
    async def main() -> None:
        # Prepare: every send returns only after the receiver has handled the frames (as a
        # transport that waits for its zero-copy frames to be released can): acks arrive first.
        net = StreamNet()
        a = net.add("a", SMALL)
        b = net.add("b", SMALL)

        async def send_and_wait(peer: str, frames: list[Buffer]) -> None:
            await b.handle("a", [bytes(f) for f in frames])
            await asyncio.sleep(0.001)

        a._send_frames = send_and_wait  # type: ignore[method-assign]
        payload = np.arange(100_000, dtype=np.float64)
        try:
            # Execute
            await a.send_message("b", Message.create("a", "b", "ch", payload))
            received = await net.next_delivery("b")
        finally:
            await net.close()
        # Assert
        assert np.array_equal(received.payload, payload)
        assert a.statistics().rejected_frames == 0

    asyncio.run(main())


def test_received_array_memory_is_reused_only_after_every_view_is_gone() -> None:
    async def main() -> None:
        # Prepare: 2 MiB arrays come from the pool (numpy and a bf16 tensor).
        net = StreamNet()
        a = net.add("a", SMALL)
        b = net.add("b", SMALL)

        def model(value: float) -> dict[str, Any]:
            return {"np": np.full(512 * KiB, value, dtype=np.float32),
                    "pt": torch.full((1024 * KiB,), value, dtype=torch.bfloat16)}  # fmt: skip

        try:
            # Execute: keep a slice of the first model's arrays, drop the rest, receive again.
            await a.send_message("b", Message.create("a", "b", "ch", model(1.0)))
            first = (await net.next_delivery("b")).payload
            kept_np, kept_pt = first["np"][:10], first["pt"][:10]
            del first
            await a.send_message("b", Message.create("a", "b", "ch", model(2.0)))
            second = (await net.next_delivery("b")).payload
            reused_while_held = b.statistics().arrays_reused
            second_pointers = {second["np"].ctypes.data, second["pt"].data_ptr()}
            del second
            await a.send_message("b", Message.create("a", "b", "ch", model(3.0)))
            third = (await net.next_delivery("b")).payload
        finally:
            await net.close()
        # Assert: memory still viewed is never handed out again; dropped memory is.
        assert reused_while_held == 0
        assert np.all(kept_np == 1.0) and bool(torch.all(kept_pt == 1.0))
        assert b.statistics().arrays_reused == 2
        assert {third["np"].ctypes.data, third["pt"].data_ptr()} == second_pointers
        assert np.all(third["np"] == 3.0) and bool(torch.all(third["pt"] == 3.0))
        assert third["np"].flags.writeable and third["pt"].dtype == torch.bfloat16

    asyncio.run(main())


def test_pooled_memory_of_a_size_that_does_not_come_back_is_evicted() -> None:
    # Prepare: a pool holding a dropped 2 MiB array.
    pool = ArrayPool(capacity=64 * 1024 * KiB)
    spec_2mib = ArraySpec("numpy", "<f4", (512 * KiB,), 0)
    spec_3mib = ArraySpec("numpy", "<f4", (768 * KiB,), 0)
    first = pool.allocate(spec_2mib)
    del first
    assert pool.free_bytes == 2 * 1024 * KiB
    # Execute: a 3 MiB array misses; then a 2 MiB one finds nothing left.
    third = pool.allocate(spec_3mib)
    fourth = pool.allocate(spec_2mib)
    # Assert
    assert pool.free_bytes == 0 and pool.reused == 0
    assert third.shape == (768 * KiB,) and fourth.flags.writeable


def _resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _kernel_at_least(major: int, minor: int) -> bool:
    numbers = platform.release().split("-")[0].split(".")
    return (int(numbers[0]), int(numbers[1])) >= (major, minor)


@pytest.mark.skipif(
    sys.platform != "linux" or not _kernel_at_least(5, 14), reason="needs MADV_POPULATE_WRITE"
)
def test_fresh_pooled_memory_is_faulted_in_by_a_worker_before_any_write() -> None:
    async def main() -> None:
        # Prepare: a 64 MiB array that no dropped array can supply.
        pool = ArrayPool(capacity=256 * 1024 * KiB)
        spec = ArraySpec("numpy", "<f4", (16 * 1024 * KiB,), 0)
        before = _resident_bytes()
        # Execute: allocate it and write nothing; give the worker thread time.
        array = pool.allocate(spec)
        deadline = time.monotonic() + 10
        while _resident_bytes() - before < 0.9 * spec.nbytes and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        grown = _resident_bytes() - before
        # Assert: resident before the first write, and an ordinary writable array.
        assert grown >= 0.9 * spec.nbytes
        array[:] = 1.5
        assert array.flags.writeable and bool(np.all(array == 1.5))

    asyncio.run(main())


def test_memory_allocated_off_an_event_loop_is_left_to_fault_in_on_first_write() -> None:
    # Prepare / Execute: no running loop to host the worker.
    pool = ArrayPool(capacity=256 * 1024 * KiB)
    before = _resident_bytes()
    array = pool.allocate(ArraySpec("numpy", "<f4", (16 * 1024 * KiB,), 0))
    time.sleep(0.2)
    # Assert: nothing was faulted in; writing works as usual.
    assert _resident_bytes() - before < 8 * 1024 * KiB
    array[:] = 2.0
    assert bool(np.all(array == 2.0))
