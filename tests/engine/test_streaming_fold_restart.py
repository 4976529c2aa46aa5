"""broadcast_and_wait with a StreamingFold: results folded while they stream in, and the task
restarted without a site whose stream broke after part of it was folded.

``StreamingDispatcher`` plays a runtime whose results arrive as streams (what CellDispatcher does
over cells), deterministically: each site's result goes through ``fold.open_stream`` and the
real element-aligning adapter in small chunks, and a site may be told to break half-way (as a
lost site, a stalled or corrupted stream does) or to stall half-way until the deadline. The last
test runs the same over real cells, a corrupted chunk breaking one site's reply stream.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import weakref
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from typing import Any

import numpy as np
import pytest
from stream_faults import flip_a_bit_in_chunk

from fedcell.controllers.aggregation import WeightedMean
from fedcell.engine.cell_dispatcher import TASK_CHANNEL, CellDispatcher
from fedcell.engine.dispatcher import Dispatcher, StreamingFold, Task, TaskHandle, TaskResult
from fedcell.errors import StreamError, TooFewResultsError
from fedcell.fl_model import FLModel
from fedcell.transports import codec
from fedcell.transports.array_sink import ArraySinkAdapter, skeleton
from fedcell.transports.cell import Cell, CellConfig
from fedcell.transports.message import Message
from fedcell.transports.stream import StreamConfig

SIZE = 1000  # float32 elements per result: 4000 bytes, 10 chunks of 400


def params_of(site: str, attempt: int) -> dict[str, np.ndarray]:
    """A site's result, different per attempt so a test sees which attempt was folded."""
    return {"w": np.full(SIZE, 10.0 * int(site[-1]) + attempt, np.float32)}


class StreamingDispatcher(Dispatcher):
    """Sites whose ok results stream into ``fold`` in 400-byte chunks; ``breaks`` sites fail
    after half their chunks (attempt 1 only), ``stalls`` sites stop half-way and wait, ``slow``
    sites take 20 ms per chunk instead of 1."""

    def __init__(
        self,
        sites: Sequence[str],
        breaks: Sequence[str] = (),
        stalls: Sequence[str] = (),
        slow: Sequence[str] = (),
    ):
        self._sites = tuple(sites)
        self.breaks = set(breaks)
        self.stalls = set(stalls)
        self.slow = set(slow)
        self.calls = dict.fromkeys(self._sites, 0)

    @property
    def sites(self) -> Sequence[str]:
        return self._sites

    def broadcast(
        self, task: Task, targets: Sequence[str] | None = None, *, fold: StreamingFold | None = None
    ) -> TaskHandle:
        handle = _Handle(task, tuple(targets or self._sites))
        for site in handle.targets:
            self.calls[site] += 1
            handle.start(site, self._run(handle, site, task, fold))
        return handle

    async def _run(
        self, handle: _Handle, site: str, task: Task, fold: StreamingFold | None
    ) -> TaskResult:
        value = TaskResult(site, task.name, "ok", FLModel(params=params_of(site, self.calls[site])))
        if fold is None:
            return value
        tree, buffers = codec.encode(value)
        sink = fold.open_stream(skeleton(codec.unpack_tree(codec.pack_tree(tree))))
        assert sink is not None
        envelope = Message.create(site, "server", TASK_CHANNEL).envelope
        adapter = ArraySinkAdapter(envelope, codec.array_specs(tree), sink)
        raw = b"".join(bytes(memoryview(b).cast("B")) for b in buffers)
        for offset in range(0, len(raw), 400):
            if offset >= len(raw) // 2 and site in self.stalls:
                await asyncio.Event().wait()  # cut off by the deadline
            if offset >= len(raw) // 2 and site in self.breaks and self.calls[site] == 1:
                adapter.abort(StreamError("peer lost mid-stream"))
                return TaskResult(site, task.name, "crashed", error="site lost")
            try:
                adapter.write(offset, [raw[offset : offset + 400]])
            except StreamError as exc:  # the fold took no more: the cell cancels the stream
                return TaskResult(site, task.name, "failed", error=str(exc))
            await asyncio.sleep(0.02 if site in self.slow else 0.001)
        delivered = adapter.finish("digest").payload
        assert isinstance(delivered, TaskResult)
        return delivered


class _Handle(TaskHandle):
    def __init__(self, task: Task, targets: Sequence[str]) -> None:
        super().__init__(task, targets)
        self._work: list[asyncio.Task[TaskResult]] = []

    def start(self, site: str, work: Awaitable[TaskResult]) -> None:
        running = asyncio.ensure_future(work)
        running.add_done_callback(lambda t: None if t.cancelled() else self.deliver(t.result()))
        self._work.append(running)

    async def abandon(self, sites: tuple[str, ...]) -> None:
        for running in self._work:
            running.cancel()
        await asyncio.gather(*self._work, return_exceptions=True)


def run(
    dispatcher: Dispatcher, mean: WeightedMean, min_responses: int, timeout: float | None = None
) -> list[TaskResult]:
    async def main() -> list[TaskResult]:
        return await dispatcher.broadcast_and_wait(
            Task("train"), min_responses=min_responses, timeout=timeout, fold=mean
        )

    return asyncio.run(main())


def reference() -> dict[str, np.ndarray]:
    return {"w": np.zeros(SIZE, np.float32)}


def test_a_stream_broken_midway_restarts_the_task_without_that_site() -> None:
    # Prepare
    dispatcher = StreamingDispatcher(["site-1", "site-2", "site-3"], breaks=["site-2"])
    mean = WeightedMean(reference())

    # Execute
    results = run(dispatcher, mean, min_responses=2)

    # Assert: site-2 asked once and recorded as crashed; the others asked again and only their
    # second results are in the mean (no half of site-2, no first-attempt results)
    assert dispatcher.calls == {"site-1": 2, "site-2": 1, "site-3": 2}
    by_site = {r.site: r for r in results}
    assert by_site["site-2"].status == "crashed"
    assert "broke after part of it was folded" in str(by_site["site-2"].error)
    assert by_site["site-1"].ok and by_site["site-3"].ok and len(results) == 3
    assert all(r.data is None for r in results)
    assert mean.count == 2
    np.testing.assert_array_equal(mean.mean()["w"], np.full(SIZE, (12.0 + 32.0) / 2))


def test_a_failure_before_any_byte_was_folded_does_not_restart() -> None:
    # Prepare: site-2 is lost before its result starts streaming: nothing of it is folded
    dispatcher = StreamingDispatcher(["site-1", "site-2", "site-3"])
    mean = WeightedMean(reference())

    async def crash_site_2(site: str, task: Task, fold: StreamingFold | None) -> TaskResult:
        return TaskResult(site, task.name, "crashed", error="site lost")

    original = dispatcher._run

    async def patched(handle: _Handle, site: str, task: Task, fold: Any) -> TaskResult:
        if site == "site-2":
            return await crash_site_2(site, task, fold)
        return await original(handle, site, task, fold)

    dispatcher._run = patched  # type: ignore[method-assign]

    # Execute
    results = run(dispatcher, mean, min_responses=2)

    # Assert
    assert dispatcher.calls == {"site-1": 1, "site-2": 1, "site-3": 1}
    assert sorted(r.site for r in results if r.ok) == ["site-1", "site-3"]
    np.testing.assert_array_equal(mean.mean()["w"], np.full(SIZE, (11.0 + 31.0) / 2))


def test_a_restart_that_leaves_too_few_sites_fails_with_the_reason() -> None:
    dispatcher = StreamingDispatcher(["site-1", "site-2"], breaks=["site-2"])
    with pytest.raises(TooFewResultsError, match="broke after part of it was folded") as caught:
        run(dispatcher, WeightedMean(reference()), min_responses=2)
    # site-1 was still streaming when site-2 broke: cut off, and not asked again (1 < 2 sites)
    assert dispatcher.calls == {"site-1": 1, "site-2": 1}
    statuses = {r.site: r.status for r in caught.value.results}
    assert statuses == {"site-2": "crashed", "site-1": "cancelled"}


def test_results_folded_before_a_restart_that_cannot_happen_are_not_counted_ok() -> None:
    # site-1 is folded whole before the slower site-2 breaks; 1 site is too few to ask again
    dispatcher = StreamingDispatcher(["site-1", "site-2"], breaks=["site-2"], slow=["site-2"])
    with pytest.raises(TooFewResultsError, match="0 of 2 sites answered ok") as caught:
        run(dispatcher, WeightedMean(reference()), min_responses=2)
    by_site = {r.site: r for r in caught.value.results}
    assert by_site["site-1"].status == "cancelled"
    assert "discarded aggregate" in str(by_site["site-1"].error)
    assert dispatcher.calls == {"site-1": 1, "site-2": 1}


def test_a_stream_cut_off_by_the_deadline_midway_restarts_without_the_slow_site() -> None:
    # Prepare: site-3 stalls half-way through its stream until the round's deadline
    dispatcher = StreamingDispatcher(["site-1", "site-2", "site-3"], stalls=["site-3"])
    mean = WeightedMean(reference())

    # Execute
    results = run(dispatcher, mean, min_responses=2, timeout=0.5)

    # Assert
    assert dispatcher.calls == {"site-1": 2, "site-2": 2, "site-3": 1}
    assert {r.site: r.status for r in results} == {
        "site-3": "timeout",
        "site-1": "ok",
        "site-2": "ok",
    }
    np.testing.assert_array_equal(mean.mean()["w"], np.full(SIZE, (12.0 + 22.0) / 2))


# ------------------------------------------------------------------------------------------------
# over real cells

KiB = 1024
CELL_CONFIG = CellConfig(
    heartbeat_interval=0.1,
    peer_timeout=3.0,
    stream=StreamConfig(threshold=16 * KiB, chunk_size=16 * KiB, window=64 * KiB, codec="none"),
)
_urls = itertools.count()
BIG = 50_000  # float32 elements: 200 KB, 13 chunks per reply


def _site_handler(site: str, calls: dict[str, int]) -> Callable[[Message], Awaitable[TaskResult]]:
    async def on_task(message: Message) -> TaskResult:
        task = message.payload["task"]
        calls[site] += 1
        offset = 10.0 * int(site[-1]) + calls[site]
        params = {"w": task.data.params["w"] + offset, "b": np.full(3, offset)}
        meta = {"NUM_STEPS_CURRENT_ROUND": int(site[-1])}
        return TaskResult(site, task.name, "ok", FLModel(params=params, meta=meta))

    return on_task


def test_over_cells_replies_fold_while_streaming_and_a_corrupted_one_restarts_the_round() -> None:
    async def main() -> None:
        async with AsyncExitStack() as stack:
            # Prepare: a server and three sites; site-2's first reply gets a bit flipped in
            # its fourth chunk, after three chunks of it were folded
            url = f"inproc://fold-restart-{os.getpid()}-{next(_urls)}"
            server = await stack.enter_async_context(Cell("server", listen=url, config=CELL_CONFIG))
            calls = {"site-1": 0, "site-2": 0, "site-3": 0}
            sites = {}
            for name in calls:
                sites[name] = await stack.enter_async_context(
                    Cell(name, parent=url, config=CELL_CONFIG)
                )
                sites[name].register(TASK_CHANNEL, _site_handler(name, calls))
            # site-2's first reply: a bit flipped in its fourth chunk
            flip_a_bit_in_chunk(sites["site-2"], 3, when=lambda: calls["site-2"] == 1)
            dispatcher = CellDispatcher(server, "job-1", list(calls))
            global_model = {"w": np.zeros(BIG, np.float32), "b": np.zeros(3)}
            mean = WeightedMean(global_model)

            # Execute
            results = await dispatcher.broadcast_and_wait(
                Task("train", FLModel(params=global_model)), min_responses=2, fold=mean
            )

            # Assert: the mean of site-1's and site-3's second replies (weights 1 and 3)
            by_site = {r.site: r for r in results}
            assert by_site["site-2"].status == "failed"
            assert "fails its checksum" in str(by_site["site-2"].error)
            assert calls == {"site-1": 2, "site-2": 1, "site-3": 2}
            averaged = mean.mean()
            np.testing.assert_allclose(averaged["w"], np.full(BIG, (1 * 12.0 + 3 * 32.0) / 4))
            np.testing.assert_allclose(averaged["b"], np.full(3, (1 * 12.0 + 3 * 32.0) / 4))
            # Folded while streaming: each reply was charged a window (64 KiB) of the inbound
            # budget, not its 200 KB, and nothing is left open
            stats = server.statistics().streams
            assert stats.streams_received + stats.streams_failed == 5
            assert stats.peak_inbound_bytes_admitted <= 3 * 64 * KiB
            assert stats.open_inbound == 0 and stats.inbound_bytes_admitted == 0
            # Nothing the streams leave behind (outbox entries, finished sinks) keeps the fold,
            # and the model it references, alive once the caller drops it
            folded = weakref.ref(mean)
            del mean
            assert folded() is None

    asyncio.run(main())
