"""The dispatcher contract (arrival order, deadlines, k-of-n, cancel, fold, relay) on
LocalDispatcher, which every controller test relies on."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

from fedcell.engine.dispatcher import Task, TaskResult
from fedcell.engine.local_dispatcher import LocalDispatcher
from fedcell.errors import ConfigError, ProtocolError, SiteCrashedError, TooFewResultsError


def echo(site: str, task: Task) -> Any:
    return task.data


def after(seconds: float, value: Any = None) -> Any:
    async def handler(site: str, task: Task) -> Any:
        await asyncio.sleep(seconds)
        return site if value is None else value

    return handler


async def hang(site: str, task: Task) -> Any:
    await asyncio.Event().wait()


def fail(site: str, task: Task) -> Any:
    raise ValueError(f"bad data at {site}")


def crash(site: str, task: Task) -> Any:
    raise SiteCrashedError("connection lost")


def test_broadcast_yields_results_in_arrival_order_one_per_target() -> None:
    async def main() -> list[TaskResult]:
        dispatcher = LocalDispatcher({"s1": after(0.06), "s2": after(0.0), "s3": after(0.03)})
        return [result async for result in dispatcher.broadcast(Task("train"))]

    results = asyncio.run(main())

    assert [r.site for r in results] == ["s2", "s3", "s1"]
    assert [r.data for r in results] == ["s2", "s3", "s1"]
    assert all(r.ok and r.task == "train" for r in results)


def test_statuses_keep_failed_crashed_and_timeout_apart() -> None:
    async def main() -> dict[str, TaskResult]:
        dispatcher = LocalDispatcher({"ok": echo, "f": fail, "c": crash, "h": hang})
        results = await dispatcher.broadcast_and_wait(
            Task("train", 7), min_responses=1, timeout=0.1
        )
        return {r.site: r for r in results}

    results = asyncio.run(main())

    assert results["ok"].status == "ok" and results["ok"].data == 7
    assert results["f"].status == "failed"
    assert results["f"].error == "ValueError: bad data at f"
    assert results["c"].status == "crashed" and results["c"].error == "connection lost"
    assert results["h"].status == "timeout" and "0.1 s" in (results["h"].error or "")


def test_timeout_returns_at_the_deadline_and_stops_the_hung_site() -> None:
    stopped: list[str] = []

    async def hang_and_record(site: str, task: Task) -> Any:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            stopped.append(site)
            raise

    async def main() -> tuple[list[TaskResult], float]:
        dispatcher = LocalDispatcher({"s1": echo, "s2": hang_and_record})
        loop = asyncio.get_running_loop()
        started = loop.time()
        results = await dispatcher.broadcast_and_wait(
            Task("train", 1), min_responses=1, timeout=0.2
        )
        return results, loop.time() - started

    results, elapsed = asyncio.run(main())

    assert [(r.site, r.status) for r in results] == [("s1", "ok"), ("s2", "timeout")]
    assert 0.2 <= elapsed < 1.0
    assert stopped == ["s2"]


def test_too_few_ok_results_raises_naming_who_dropped_and_why() -> None:
    async def main() -> None:
        dispatcher = LocalDispatcher({"s1": echo, "s2": fail, "s3": crash})
        await dispatcher.broadcast_and_wait(Task("train", 1), min_responses=2)

    with pytest.raises(TooFewResultsError) as caught:
        asyncio.run(main())

    message = str(caught.value)
    assert "1 of 3 sites answered ok, 2 needed" in message
    assert "s2: failed (ValueError: bad data at s2)" in message
    assert "s3: crashed (connection lost)" in message
    assert sorted(r.site for r in caught.value.results) == ["s1", "s2", "s3"]
    assert all(r.data is None for r in caught.value.results)


def test_unreachable_quorum_fails_fast_and_cancels_the_rest() -> None:
    async def main() -> float:
        dispatcher = LocalDispatcher({"s1": fail, "s2": fail, "s3": hang})
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(TooFewResultsError) as caught:
            await dispatcher.broadcast_and_wait(Task("train"), min_responses=2, timeout=30)
        statuses = {r.site: r.status for r in caught.value.results}
        assert statuses == {"s1": "failed", "s2": "failed", "s3": "cancelled"}
        return loop.time() - started

    assert asyncio.run(main()) < 1.0


def test_default_min_responses_needs_every_target() -> None:
    async def main() -> None:
        dispatcher = LocalDispatcher({"s1": echo, "s2": fail})
        await dispatcher.broadcast_and_wait(Task("train"))

    with pytest.raises(TooFewResultsError, match="1 of 2 sites answered ok, 2 needed"):
        asyncio.run(main())


def test_timeout_with_too_few_ok_raises() -> None:
    async def main() -> None:
        dispatcher = LocalDispatcher({"s1": echo, "s2": hang, "s3": hang})
        await dispatcher.broadcast_and_wait(Task("train"), min_responses=2, timeout=0.05)

    with pytest.raises(TooFewResultsError, match=r"s2: timeout \(no result within 0.05 s\)"):
        asyncio.run(main())


def test_cancel_yields_cancelled_for_pending_and_stops_them() -> None:
    stopped: list[str] = []

    async def slow(site: str, task: Task) -> Any:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            stopped.append(site)
            raise

    async def main() -> list[TaskResult]:
        dispatcher = LocalDispatcher({"fast": echo, "slow1": slow, "slow2": slow})
        handle = dispatcher.broadcast(Task("train", 3))
        first = await handle.__anext__()
        await handle.cancel("enough")
        return [first] + [r async for r in handle]

    results = asyncio.run(main())

    assert [(r.site, r.status) for r in results] == [
        ("fast", "ok"), ("slow1", "cancelled"), ("slow2", "cancelled"),
    ]  # fmt: skip
    assert results[1].error == "enough"
    assert sorted(stopped) == ["slow1", "slow2"]


def test_late_duplicate_and_unknown_results_are_dropped() -> None:
    async def main() -> None:
        dispatcher = LocalDispatcher({"s1": hang, "s2": hang})
        handle = dispatcher.broadcast(Task("train", timeout=0.05))
        results = [r async for r in handle]
        assert {r.status for r in results} == {"timeout"}
        assert not handle.deliver(TaskResult("s1", "train", data=1))  # late
        assert not handle.deliver(TaskResult("mallory", "train", data=1))  # not a target
        assert handle.pending == ()
        assert [r async for r in handle] == []

    asyncio.run(main())


def test_fold_sees_each_ok_result_and_the_record_drops_its_data() -> None:
    folded: list[tuple[str, Any]] = []

    def fold(result: TaskResult) -> None:
        if result.data == "reject me":
            raise ProtocolError("params have the wrong shape")
        folded.append((result.site, result.data))

    async def main() -> list[TaskResult]:
        dispatcher = LocalDispatcher(
            {"s1": after(0.0, 10), "s2": after(0.02, "reject me"), "s3": after(0.04, 30)}
        )
        return await dispatcher.broadcast_and_wait(Task("train"), min_responses=2, fold=fold)

    results = asyncio.run(main())

    assert folded == [("s1", 10), ("s3", 30)]
    assert [(r.site, r.status, r.data) for r in results] == [
        ("s1", "ok", None), ("s2", "failed", None), ("s3", "ok", None),
    ]  # fmt: skip
    assert results[1].error == "result rejected: params have the wrong shape"


def test_bad_arguments_raise_config_error() -> None:
    async def main() -> None:
        dispatcher = LocalDispatcher({"s1": echo, "s2": echo})
        with pytest.raises(ConfigError, match="not sites of this job"):
            dispatcher.broadcast(Task("train"), ["s1", "nobody"])
        with pytest.raises(ConfigError, match="names a target twice"):
            dispatcher.broadcast(Task("train"), ["s1", "s1"])
        with pytest.raises(ConfigError, match="no target sites"):
            dispatcher.broadcast(Task("train"), [])
        with pytest.raises(ConfigError, match="min_responses must be between 0 and 2"):
            await dispatcher.broadcast_and_wait(Task("train"), min_responses=3)
        with pytest.raises(ConfigError, match="timeout must be > 0"):
            await dispatcher.broadcast_and_wait(Task("train"), timeout=-1)
        with pytest.raises(ConfigError, match="at least one site"):
            LocalDispatcher({})

    asyncio.run(main())


def test_wire_mode_gives_each_site_its_own_copy() -> None:
    global_params = np.arange(4.0)

    def mutate(site: str, task: Task) -> Any:
        task.data[:] = -1.0  # a buggy site writing into what it received
        return task.data

    async def main() -> list[TaskResult]:
        dispatcher = LocalDispatcher({"s1": mutate, "s2": mutate})
        return await dispatcher.broadcast_and_wait(Task("train", global_params))

    results = asyncio.run(main())

    np.testing.assert_array_equal(global_params, np.arange(4.0))
    assert all(np.array_equal(r.data, [-1.0] * 4) for r in results)


def test_wire_mode_fails_a_site_whose_result_the_codec_refuses() -> None:
    async def main() -> TaskResult:
        dispatcher = LocalDispatcher({"s1": lambda site, task: object()})
        return await dispatcher.send_and_wait(Task("train"), "s1")

    result = asyncio.run(main())

    assert result.status == "failed"
    assert (result.error or "").startswith("EncodeError")


def test_send_and_wait_returns_the_result_whatever_its_status() -> None:
    async def main() -> tuple[TaskResult, TaskResult]:
        dispatcher = LocalDispatcher({"s1": echo, "s2": fail})
        return (
            await dispatcher.send_and_wait(Task("train", 5), "s1"),
            await dispatcher.send_and_wait(Task("train", 5), "s2"),
        )

    good, bad = asyncio.run(main())

    assert (good.status, good.data) == ("ok", 5)
    assert bad.status == "failed"


def test_relay_chains_results_and_skips_failed_sites() -> None:
    def add_one(site: str, task: Task) -> Any:
        return task.data + 1

    async def main() -> list[TaskResult]:
        dispatcher = LocalDispatcher({"s1": add_one, "s2": fail, "s3": add_one, "s4": hang})
        return await dispatcher.relay_and_wait(
            Task("train", 0), ["s1", "s2", "s3", "s4"], timeout=0.05
        )

    results = asyncio.run(main())

    assert [(r.site, r.status) for r in results] == [
        ("s1", "ok"), ("s2", "failed"), ("s3", "ok"), ("s4", "timeout"),
    ]  # fmt: skip
    assert results[0].data is None  # the server keeps only the latest model
    assert results[2].data == 2  # s3 got s1's 1, not s2's failure


def test_relay_refuses_unknown_or_repeated_sites() -> None:
    async def main() -> None:
        dispatcher = LocalDispatcher({"s1": echo, "s2": echo})
        with pytest.raises(ConfigError, match="not sites of the job"):
            dispatcher.relay(Task("train"), ["s1", "s9"])
        with pytest.raises(ConfigError, match="names a target twice"):
            dispatcher.relay(Task("train"), ["s1", "s2", "s1"])

    asyncio.run(main())


def test_cancelling_a_relay_stops_the_current_hop() -> None:
    stopped: list[str] = []

    async def slow(site: str, task: Task) -> Any:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            stopped.append(site)
            raise

    async def main() -> list[TaskResult]:
        dispatcher = LocalDispatcher({"s1": echo, "s2": slow, "s3": echo})
        handle = dispatcher.relay(Task("train", 1), ["s1", "s2", "s3"])
        first = await handle.__anext__()
        await asyncio.sleep(0.01)  # s2 is now working
        await handle.cancel()
        return [first] + [r async for r in handle]

    results = asyncio.run(main())

    assert [(r.site, r.status) for r in results] == [
        ("s1", "ok"), ("s2", "cancelled"), ("s3", "cancelled"),
    ]  # fmt: skip
    assert stopped == ["s2"]


def test_a_fold_bug_propagates_and_releases_the_remaining_sites() -> None:
    stopped: list[str] = []

    async def slow(site: str, task: Task) -> Any:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            stopped.append(site)
            raise

    def buggy_fold(result: TaskResult) -> None:
        raise KeyError("not a ProtocolError: a bug in the controller")

    async def main() -> None:
        dispatcher = LocalDispatcher({"fast": echo, "slow": slow})
        with pytest.raises(KeyError):
            await dispatcher.broadcast_and_wait(Task("train", 1), fold=buggy_fold)

    asyncio.run(main())

    assert stopped == ["slow"]


def test_cancelling_the_waiting_controller_stops_every_pending_site() -> None:
    stopped: list[str] = []

    async def slow(site: str, task: Task) -> Any:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            stopped.append(site)
            raise

    async def main() -> None:
        dispatcher = LocalDispatcher({"s1": slow, "s2": slow, "s3": echo})
        waiting = asyncio.ensure_future(dispatcher.broadcast_and_wait(Task("train", 1)))
        await asyncio.sleep(0.02)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting

    asyncio.run(main())

    assert sorted(stopped) == ["s1", "s2"]
