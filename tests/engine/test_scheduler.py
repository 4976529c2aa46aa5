"""The scheduler state machine, driven by feeding events (no asyncio, no network)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcell.engine.scheduler import (
    AbortRequested,
    CancelNode,
    JobDone,
    JobStarted,
    JobState,
    NodeFailed,
    NodeFinished,
    NodeSpec,
    NodeState,
    Scheduler,
    SiteJoined,
    SiteLost,
    StartNode,
    Tick,
)
from fedcell.errors import JobError
from fedcell.transports import codec

SITES = ("site-1", "site-2")


def diamond() -> Scheduler:
    """a → (b, c) → d, plus an independent e."""
    return Scheduler(
        [
            NodeSpec("a"),
            NodeSpec("b", ("a",)),
            NodeSpec("c", ("a",)),
            NodeSpec("d", ("b", "c")),
            NodeSpec("e"),
        ]
    )


def states(scheduler: Scheduler) -> dict[str, str]:
    return {name: record.state.value for name, record in scheduler.nodes.items()}


def test_roots_start_in_topological_order_on_job_start() -> None:
    scheduler = diamond()

    commands = scheduler.handle(JobStarted(SITES, now=0.0))

    assert commands == [StartNode("a", {}), StartNode("e", {})]
    assert scheduler.job_state is JobState.RUNNING
    assert scheduler.job_started_at == 0.0
    assert states(scheduler) == {
        "a": "running", "b": "pending", "c": "pending", "d": "pending", "e": "running",
    }  # fmt: skip


def test_outputs_flow_to_dependents_and_the_job_finishes_after_the_last_node() -> None:
    # Prepare
    scheduler = diamond()
    scheduler.handle(JobStarted(SITES, now=0.0))

    # Execute / Assert
    assert scheduler.handle(NodeFinished("a", "model-a", now=1.0)) == [
        StartNode("b", {"a": "model-a"}),
        StartNode("c", {"a": "model-a"}),
    ]
    assert scheduler.handle(NodeFinished("c", "model-c", now=2.0)) == []
    assert scheduler.handle(NodeFinished("b", "model-b", now=3.0)) == [
        StartNode("d", {"b": "model-b", "c": "model-c"})
    ]
    assert scheduler.handle(NodeFinished("e", 5, now=3.5)) == []
    assert scheduler.handle(NodeFinished("d", "final", now=4.0)) == [JobDone(JobState.FINISHED)]
    assert scheduler.job_state is JobState.FINISHED
    assert scheduler.job_reason is None
    assert scheduler.job_finished_at == 4.0
    assert dict(scheduler.outputs) == {
        "a": "model-a", "b": "model-b", "c": "model-c", "d": "final", "e": 5,
    }  # fmt: skip
    assert scheduler.nodes["d"].started_at == 3.0
    assert scheduler.nodes["d"].finished_at == 4.0


def test_a_failed_node_skips_its_dependents_while_independent_branches_finish() -> None:
    # Prepare
    scheduler = diamond()
    scheduler.handle(JobStarted(SITES, now=0.0))
    scheduler.handle(NodeFinished("a", "m", now=1.0))

    # Execute
    after_failure = scheduler.handle(NodeFailed("b", "failed", "ValueError: bad lr", now=2.0))
    after_c = scheduler.handle(NodeFinished("c", "mc", now=3.0))
    after_e = scheduler.handle(NodeFinished("e", "me", now=4.0))

    # Assert: d never starts; e still runs to completion; then the job fails
    assert after_failure == []
    assert after_c == []
    assert after_e == [JobDone(JobState.FAILED, "node 'b' failed: ValueError: bad lr")]
    assert states(scheduler) == {
        "a": "finished", "b": "failed", "c": "finished", "d": "skipped", "e": "finished",
    }  # fmt: skip
    assert scheduler.nodes["d"].error == "upstream node 'b' failed"
    assert scheduler.nodes["d"].started_at is None


def test_skipping_is_transitive() -> None:
    scheduler = Scheduler([NodeSpec("a"), NodeSpec("b", ("a",)), NodeSpec("c", ("b",))])
    scheduler.handle(JobStarted(SITES, now=0.0))

    commands = scheduler.handle(NodeFailed("a", "crashed", "SiteCrashedError: gone", now=1.0))

    assert commands == [JobDone(JobState.CRASHED, "node 'a' crashed: SiteCrashedError: gone")]
    assert states(scheduler) == {"a": "crashed", "b": "skipped", "c": "skipped"}
    assert scheduler.nodes["c"].error == "upstream node 'a' crashed"


@pytest.mark.parametrize(
    ("failures", "expected"),
    [
        ([("a", "failed"), ("b", "crashed")], JobState.FAILED),
        ([("a", "crashed"), ("b", "failed")], JobState.FAILED),
        ([("a", "crashed"), ("b", "aborted")], JobState.CRASHED),
        ([("a", "aborted")], JobState.ABORTED),
    ],
)
def test_final_state_precedence_is_failed_then_crashed_then_aborted(
    failures: list[tuple[str, str]], expected: JobState
) -> None:
    # Prepare
    scheduler = Scheduler([NodeSpec("a"), NodeSpec("b")])
    scheduler.handle(JobStarted(SITES, now=0.0))

    # Execute
    commands = []
    for index, (node, kind) in enumerate(failures):
        commands += scheduler.handle(NodeFailed(node, kind, "why", now=float(index)))  # type: ignore[arg-type]
    if len(failures) == 1:
        commands += scheduler.handle(NodeFinished("b", None, now=9.0))

    # Assert
    assert commands[-1].state is expected  # type: ignore[union-attr]
    assert scheduler.job_state is expected
    culprit = next(node for node, kind in failures if kind == expected.value)
    assert scheduler.job_reason == f"node '{culprit}' {expected.value}: why"


def test_abort_cancels_running_nodes_aborts_pending_ones_and_ends_the_job_at_once() -> None:
    # Prepare
    scheduler = diamond()
    scheduler.handle(JobStarted(SITES, now=0.0))

    # Execute
    commands = scheduler.handle(AbortRequested("admin said stop", now=1.0))

    # Assert
    assert commands == [
        CancelNode("a", "admin said stop"),
        CancelNode("e", "admin said stop"),
        JobDone(JobState.ABORTED, "admin said stop"),
    ]
    assert set(states(scheduler).values()) == {"aborted"}
    assert scheduler.nodes["b"].started_at is None
    assert scheduler.job_finished_at == 1.0


def test_events_after_the_job_is_done_are_ignored() -> None:
    scheduler = diamond()
    scheduler.handle(JobStarted(SITES, now=0.0))
    scheduler.handle(AbortRequested("stop", now=1.0))

    # a result racing the cancel, a second abort, a tick: all ignored
    assert scheduler.handle(NodeFinished("a", "late", now=2.0)) == []
    assert scheduler.handle(AbortRequested("again", now=3.0)) == []
    assert scheduler.handle(Tick(now=100.0)) == []
    assert scheduler.handle(SiteLost("site-1", now=4.0)) == []
    assert scheduler.job_state is JobState.ABORTED
    assert scheduler.job_reason == "stop"
    assert "a" not in scheduler.outputs


def test_events_for_nodes_that_are_not_running_are_ignored() -> None:
    # Prepare: a timed-out node is cancelled, then its real result arrives late
    scheduler = Scheduler([NodeSpec("slow", timeout=5.0), NodeSpec("other")])
    scheduler.handle(JobStarted(SITES, now=0.0))
    scheduler.handle(Tick(now=6.0))

    # Execute
    late_result = scheduler.handle(NodeFinished("slow", "late", now=7.0))
    late_failure = scheduler.handle(NodeFailed("slow", "failed", "x", now=7.0))
    pending_result = Scheduler([NodeSpec("a"), NodeSpec("b", ("a",))])
    pending_result.handle(JobStarted(SITES, now=0.0))

    # Assert
    assert late_result == [] and late_failure == []
    assert scheduler.nodes["slow"].state is NodeState.FAILED
    assert pending_result.handle(NodeFinished("b", "too early", now=1.0)) == []
    assert pending_result.nodes["b"].state is NodeState.PENDING


def test_time_limit_fails_the_node_cancels_it_and_skips_dependents() -> None:
    # Prepare
    scheduler = Scheduler(
        [NodeSpec("train", timeout=10.0), NodeSpec("eval", ("train",)), NodeSpec("side")]
    )
    scheduler.handle(JobStarted(SITES, now=100.0))

    # Execute / Assert
    assert scheduler.next_deadline() == 110.0
    assert scheduler.handle(Tick(now=109.9)) == []
    assert scheduler.nodes["train"].state is NodeState.RUNNING
    reason = "node 'train' exceeded its time limit of 10 s"
    assert scheduler.handle(Tick(now=110.0)) == [CancelNode("train", reason)]
    assert scheduler.nodes["eval"].state is NodeState.SKIPPED
    assert scheduler.next_deadline() is None
    assert scheduler.handle(NodeFinished("side", 1, now=111.0)) == [
        JobDone(JobState.FAILED, f"node 'train' failed: {reason}")
    ]


def test_next_deadline_is_the_earliest_running_limit() -> None:
    scheduler = Scheduler(
        [NodeSpec("a", timeout=30.0), NodeSpec("b", timeout=5.0), NodeSpec("c", ("b",), 1.0)]
    )
    assert scheduler.next_deadline() is None
    scheduler.handle(JobStarted(SITES, now=0.0))
    assert scheduler.next_deadline() == 5.0
    scheduler.handle(NodeFinished("b", None, now=2.0))
    assert scheduler.next_deadline() == 3.0  # c started at 2 with a 1 s limit
    scheduler.handle(NodeFinished("c", None, now=2.5))
    assert scheduler.next_deadline() == 30.0


def test_losing_sites_below_min_sites_crashes_the_job() -> None:
    # Prepare
    scheduler = Scheduler([NodeSpec("a"), NodeSpec("b", ("a",))], min_sites=2)
    scheduler.handle(JobStarted(("s1", "s2", "s3"), now=0.0))

    # Execute / Assert: down to 2 is fine, a rejoin counts, then below 2 crashes
    assert scheduler.handle(SiteLost("s1", now=1.0)) == []
    assert scheduler.handle(SiteJoined("s1", now=1.5)) == []
    assert scheduler.handle(SiteLost("s2", now=2.0)) == []
    assert scheduler.live_sites == {"s1", "s3"}
    commands = scheduler.handle(SiteLost("s3", now=3.0))
    reason = "site 's3' was lost and only 1 site(s) remain (the job needs 2)"
    assert commands == [CancelNode("a", reason), JobDone(JobState.CRASHED, reason)]
    assert states(scheduler) == {"a": "crashed", "b": "skipped"}


def test_losing_an_unknown_site_is_harmless() -> None:
    scheduler = Scheduler([NodeSpec("a")])
    scheduler.handle(JobStarted(("s1",), now=0.0))
    assert scheduler.handle(SiteLost("stranger", now=1.0)) == []
    assert scheduler.job_state is JobState.RUNNING


def test_starting_with_too_few_sites_crashes_without_starting_anything() -> None:
    scheduler = Scheduler([NodeSpec("a")], min_sites=2)

    commands = scheduler.handle(JobStarted(("s1",), now=0.0))

    reason = "the job needs at least 2 site(s) but started with 1"
    assert commands == [JobDone(JobState.CRASHED, reason)]
    assert states(scheduler) == {"a": "skipped"}


def test_a_job_without_nodes_finishes_at_once() -> None:
    scheduler = Scheduler([])
    assert scheduler.handle(JobStarted(SITES, now=0.0)) == [JobDone(JobState.FINISHED)]


@pytest.mark.parametrize(
    "event",
    [
        NodeFinished("a", None, now=0.0),
        AbortRequested("x", now=0.0),
        Tick(now=0.0),
        SiteLost("s", now=0.0),
    ],
)
def test_events_before_job_started_are_driver_bugs(event: object) -> None:
    scheduler = Scheduler([NodeSpec("a")])
    with pytest.raises(JobError, match="before JobStarted"):
        scheduler.handle(event)  # type: ignore[arg-type]


def test_unknown_nodes_a_second_start_and_bad_kinds_are_driver_bugs() -> None:
    scheduler = Scheduler([NodeSpec("a")])
    scheduler.handle(JobStarted(SITES, now=0.0))
    with pytest.raises(JobError, match="unknown node 'zz'"):
        scheduler.handle(NodeFinished("zz", None, now=1.0))
    with pytest.raises(JobError, match="unknown node 'zz'"):
        scheduler.handle(NodeFailed("zz", "failed", "x", now=1.0))
    with pytest.raises(JobError, match="unknown kind 'exploded'"):
        scheduler.handle(NodeFailed("a", "exploded", "x", now=1.0))  # type: ignore[arg-type]
    with pytest.raises(JobError, match="twice"):
        scheduler.handle(JobStarted(SITES, now=1.0))
    assert scheduler.nodes["a"].state is NodeState.RUNNING


def test_node_lists_must_be_unique_and_topologically_ordered() -> None:
    with pytest.raises(JobError, match="appears twice"):
        Scheduler([NodeSpec("a"), NodeSpec("a")])
    with pytest.raises(JobError, match="topological order"):
        Scheduler([NodeSpec("b", ("a",)), NodeSpec("a")])


def test_job_done_is_emitted_exactly_once_across_a_long_event_stream() -> None:
    # Prepare: a chain of 50 nodes with a side branch that fails halfway
    specs = [NodeSpec(f"n{i}", (f"n{i - 1}",) if i else ()) for i in range(50)]
    specs.append(NodeSpec("side"))
    scheduler = Scheduler(specs)
    emitted = scheduler.handle(JobStarted(SITES, now=0.0))

    # Execute
    for i in range(50):
        emitted += scheduler.handle(NodeFinished(f"n{i}", i, now=float(i + 1)))
        if i == 25:
            emitted += scheduler.handle(NodeFailed("side", "failed", "boom", now=26.5))
    emitted += scheduler.handle(Tick(now=1000.0))

    # Assert
    done = [c for c in emitted if isinstance(c, JobDone)]
    starts = [c.node for c in emitted if isinstance(c, StartNode)]
    assert done == [JobDone(JobState.FAILED, "node 'side' failed: boom")]
    assert starts == ["n0", "side", *(f"n{i}" for i in range(1, 50))]
    assert scheduler.outputs["n49"] == 49


def test_snapshot_is_plain_data_and_restores_the_same_state() -> None:
    # Prepare: a job mid-flight, with a failure and a timed node
    scheduler = Scheduler(
        [NodeSpec("a"), NodeSpec("b", ("a",), timeout=4.0), NodeSpec("c"), NodeSpec("d", ("c",))],
        min_sites=1,
    )
    scheduler.handle(JobStarted(SITES, now=0.0))
    scheduler.handle(NodeFinished("a", [1.0, 2.0], now=1.0))
    scheduler.handle(NodeFailed("c", "crashed", "lost", now=1.5))

    # Execute: through the wire codec, as a job store would persist it
    tree, buffers = codec.encode(scheduler.snapshot())
    restored = Scheduler.from_snapshot(
        codec.decode(codec.unpack_tree(codec.pack_tree(tree)), buffers)
    )

    # Assert: same state, and it keeps deciding the same way
    assert restored.snapshot() == scheduler.snapshot()
    assert restored.next_deadline() == 5.0
    assert restored.handle(NodeFinished("b", "mb", now=2.0)) == scheduler.handle(
        NodeFinished("b", "mb", now=2.0)
    )
    assert restored.job_state is scheduler.job_state is JobState.CRASHED


def test_a_malformed_snapshot_raises_job_error() -> None:
    snapshot = Scheduler([NodeSpec("a")]).snapshot()
    snapshot["nodes"][0]["state"] = "levitating"
    with pytest.raises(JobError, match="snapshot is malformed"):
        Scheduler.from_snapshot(snapshot)
    del snapshot["job"]
    with pytest.raises(JobError, match="snapshot is malformed"):
        Scheduler.from_snapshot(snapshot)


# ---------------------------------------------------------------------------- property test


@st.composite
def dags(draw: st.DrawFn) -> list[NodeSpec]:
    """Random DAGs of up to 8 nodes (edges only from lower to higher index), some timed."""
    count = draw(st.integers(min_value=0, max_value=8))
    specs = []
    for index in range(count):
        upstream = draw(st.sets(st.integers(min_value=0, max_value=max(index - 1, 0))))
        timeout = draw(st.sampled_from([None, None, 1.0, 3.0]))
        names = tuple(f"n{u}" for u in sorted(upstream) if u < index)
        specs.append(NodeSpec(f"n{index}", names, timeout))
    return specs


@settings(max_examples=300, deadline=None)
@given(specs=dags(), data=st.data())
def test_random_event_streams_keep_every_invariant(specs: list[NodeSpec], data: Any) -> None:
    """Drive random DAGs with random outcomes, aborts, ticks and lost sites, and check what any
    driver relies on after every event."""
    # Prepare
    scheduler = Scheduler(specs, min_sites=2)
    upstream = {spec.name: spec.upstream for spec in specs}
    running: set[str] = set()
    done: list[JobDone] = []
    now = 0.0
    action = "start"
    commands = scheduler.handle(JobStarted(("s1", "s2", "s3"), now=now))

    for _ in range(40):
        # Assert: the commands are consistent with everything seen so far
        for command in commands:
            assert not done, f"{command} after JobDone"
            if isinstance(command, StartNode):
                assert command.node not in running
                assert all(
                    scheduler.nodes[up].state is NodeState.FINISHED for up in upstream[command.node]
                )
                assert dict(command.inputs) == {up: f"out-{up}" for up in upstream[command.node]}
                running.add(command.node)
            elif isinstance(command, CancelNode):
                running.remove(command.node)
                assert scheduler.nodes[command.node].state in (
                    NodeState.FAILED,
                    NodeState.CRASHED,
                    NodeState.ABORTED,
                )
            else:
                done.append(command)
        assert running == {n for n, r in scheduler.nodes.items() if r.state is NodeState.RUNNING}
        if done:
            break
        assert running, "nothing runs but the job is not done"

        # Execute: one random event
        now += data.draw(st.sampled_from([0.0, 0.5, 2.0]))
        action = data.draw(st.sampled_from(["finish", "finish", "fail", "abort", "tick", "lost"]))
        node = data.draw(st.sampled_from(sorted(running)))
        if action == "finish":
            running.discard(node)
            commands = scheduler.handle(NodeFinished(node, f"out-{node}", now=now))
        elif action == "fail":
            running.discard(node)
            kind = data.draw(st.sampled_from(["failed", "crashed", "aborted"]))
            commands = scheduler.handle(NodeFailed(node, kind, "boom", now=now))
        elif action == "abort":
            commands = scheduler.handle(AbortRequested("stop", now=now))
        elif action == "tick":
            commands = scheduler.handle(Tick(now=now))
        else:
            commands = scheduler.handle(
                SiteLost(data.draw(st.sampled_from(["s1", "s2", "s3"])), now=now)
            )
    else:
        return  # the stream ran out before the job ended; the per-step checks above held

    # Assert: the end state, against an independent oracle of the precedence rules
    (final,) = done
    assert final.state is scheduler.job_state
    states = {name: record.state for name, record in scheduler.nodes.items()}
    assert NodeState.PENDING not in states.values() and NodeState.RUNNING not in states.values()
    for name, state in states.items():
        if state is NodeState.FINISHED:
            assert scheduler.outputs[name] == f"out-{name}"
        if state is NodeState.SKIPPED and action != "lost":
            assert any(states[up] is not NodeState.FINISHED for up in upstream[name])
    if action == "abort":
        expected = JobState.ABORTED
    elif action == "lost":
        expected = JobState.CRASHED
    else:
        expected = next(
            (
                job_state
                for node_state, job_state in (
                    (NodeState.FAILED, JobState.FAILED),
                    (NodeState.CRASHED, JobState.CRASHED),
                    (NodeState.ABORTED, JobState.ABORTED),
                )
                if node_state in states.values()
            ),
            JobState.FINISHED,
        )
    assert final.state is expected
