"""Turn-taking between script threads and the simulator's loop (fedcell.engine.gil_turns)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from fedcell.controllers import FedAvg
from fedcell.engine.gil_turns import SCRIPT_TURN, Turn
from fedcell.engine.job import Job
from fedcell.executors.script_runner import ScriptRunner


def test_one_holder_at_a_time_and_the_next_waiter_gets_the_turn() -> None:
    # Prepare
    turn = Turn(slice_s=5.0)
    order: list[str] = []
    assert turn.take()

    def waiter() -> None:
        took = turn.take()
        order.append(f"waiter took={took}")
        turn.give_back()

    thread = threading.Thread(target=waiter)
    # Execute
    thread.start()
    time.sleep(0.1)
    order.append("holder gives back")
    turn.give_back()
    thread.join(5)
    # Assert: the waiter waited for the holder, then held the turn
    assert order == ["holder gives back", "waiter took=True"]
    assert turn.holder is None


def test_a_holder_past_its_slice_has_the_others_run_alongside() -> None:
    # Prepare
    turn = Turn(slice_s=0.05)
    assert turn.take()
    taken_at = time.monotonic()
    result: list[tuple[bool, float]] = []

    def waiter() -> None:
        took = turn.take()
        result.append((took, time.monotonic()))

    # Execute
    thread = threading.Thread(target=waiter)
    thread.start()
    thread.join(5)
    # Assert: it stopped waiting once the holder's slice ran out, without the turn
    (took, returned_at) = result[0]
    assert not took
    assert returned_at - taken_at >= 0.045  # the slice counts from the take, just before
    assert turn.holder == threading.get_ident()
    turn.give_back()


def test_giving_back_a_turn_one_does_not_hold_changes_nothing() -> None:
    turn = Turn()
    other = threading.Thread(target=turn.take)
    other.start()
    other.join(5)
    turn.give_back()  # this thread is not the holder
    assert turn.holder == other.ident


RENDEZVOUS = """
import threading
both = threading.Barrier(2)
"""

MEETING_SCRIPT = """
import rendezvous
import fedcell.client as flare

flare.init()
while flare.is_running():
    model = flare.receive()
    rendezvous.both.wait(timeout=10)  # the other site's step must run at the same time
    flare.send(flare.FLModel(params={"w": model.params["w"] + 1}, meta={"NUM_STEPS_CURRENT_ROUND": 1}))
"""


def test_scripts_that_wait_for_each_other_within_a_step_do_not_deadlock(tmp_path: Path) -> None:
    # Prepare: each site's step waits at a barrier for the other's, so both steps must run at
    # once: a script holding the turn while it waits lets the other in after one slice.
    (tmp_path / "rendezvous.py").write_text(RENDEZVOUS)
    (tmp_path / "meet.py").write_text(MEETING_SCRIPT)
    job = Job("meet")
    job.add(FedAvg(rounds=3, initial_params={"w": [0.0]}), name="train")
    job.add_executor(ScriptRunner(script="meet.py"), tasks=("train",))
    job.add_file(tmp_path / "meet.py")
    job.add_file(tmp_path / "rendezvous.py")
    # Execute
    result = job.simulate(2, workspace=tmp_path / "run")
    # Assert: a step stuck behind the other's turn would break the barrier (10 s) and fail
    assert result.ok, result.job.reason
    assert result.job.output("train").params["w"].tolist() == [3.0]
    assert SCRIPT_TURN.holder is None  # every script thread gave the turn back
