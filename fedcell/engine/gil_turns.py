"""Turn-taking between the threads of one process that would otherwise fight over the GIL.

The simulator runs every site's Client-API script on its own thread and every cell on one
event loop. Only one of them runs Python at a time anyway; left alone they interleave at every
point where a thread lets go of the GIL: every ATen call (torch releases the GIL around each
op), every system call. Each interleaving is a futex wake-up and a context switch, and the
threads spend their time handing the GIL around. Measured on the project's 2-core VM, an 8-site
FedAvg round of a 10,504-parameter MLP (``benchmarks/rounds.py``): 12.3 ms per round, the
scripts using 11 ms of CPU for 4.7 ms of solo work; with turns, 8.6 ms.

A :class:`Turn` is held by at most one participating thread at a time, for a bounded slice:

- a thread that wants the turn waits until the holder gives it back, or until the holder has
  held it for ``slice_s`` seconds; then it runs alongside the holder (as without turns). So a
  script that trains for minutes, or that waits for something another thread must produce,
  delays the others by one slice at most, and can never deadlock them;
- threads that do not take part are not slowed at all.

Participants (one process-wide turn, :data:`SCRIPT_TURN`):

- script threads (:meth:`fedcell.executors.script_protocol.ThreadExchange.take`): give the turn
  back while they wait for a task and take it when one arrives, so a script's step (receive,
  train, send) runs without the other scripts cutting in;
- the simulator's event loop (:func:`turn_taking_loop`, threads mode): gives the turn back when
  it is about to block in ``select`` (nothing ready) and takes it when it wakes up. A loop with
  callbacks ready polls without blocking and keeps the turn.

In a deployed site only its script's thread takes the turn (its loop does not), uncontended: a
lock and a clock read per task.

Why a 10 ms slice: a step (``receive`` to ``send``) that short is dominated by Python and by
GIL hand-overs, and runs fastest alone; a longer one (a real local epoch: many batches, seconds)
runs alongside the others after one slice, as it did without turns, so torch kernels that release
the GIL still use every core. Only steps that spend well under 10 ms in GIL-free kernels on a
machine with many cores would have run faster together; they wait at most one slice each.
"""

from __future__ import annotations

import asyncio
import selectors
import threading
import time

__all__ = ["SCRIPT_TURN", "Turn", "turn_taking_loop"]

#: Longest a holder keeps the others waiting (seconds): long enough for a small model's training
#: step (0.4 ms for the rounds benchmark's MLP), short against anything a user would notice.
TURN_SLICE_S = 0.01


class Turn:
    """A time-sliced turn among threads (see the module docstring)."""

    def __init__(self, slice_s: float = TURN_SLICE_S) -> None:
        self.slice_s = slice_s
        self._changed = threading.Condition(threading.Lock())
        self._holder: int | None = None
        self._since = 0.0

    def take(self) -> bool:
        """Wait for the turn and hold it; return ``False`` (not holding) when the holder's slice
        ran out first: the caller then runs alongside it."""
        me = threading.get_ident()
        with self._changed:
            while self._holder is not None and self._holder != me:
                left = self._since + self.slice_s - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(left)
            self._holder = me
            self._since = time.monotonic()
            return True

    def give_back(self) -> None:
        """Let the next waiter have the turn (nothing when the caller does not hold it)."""
        with self._changed:
            if self._holder == threading.get_ident():
                self._holder = None
                self._changed.notify()

    @property
    def holder(self) -> int | None:
        """The thread id holding the turn, if any."""
        return self._holder


#: The turn that script threads and the simulator's event loop share.
SCRIPT_TURN = Turn()


class _TurnTakingSelector(selectors.DefaultSelector):
    """The event loop's selector: gives :data:`SCRIPT_TURN` back while ``select`` may block."""

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is not None and timeout <= 0:
            return super().select(timeout)
        SCRIPT_TURN.give_back()
        try:
            return super().select(timeout)
        finally:
            SCRIPT_TURN.take()

    def close(self) -> None:
        SCRIPT_TURN.give_back()  # the loop is done: its thread goes on without the turn
        super().close()


def turn_taking_loop() -> asyncio.AbstractEventLoop:
    """A new event loop that takes turns with script threads (a ``loop_factory`` for
    :class:`asyncio.Runner`)."""
    return asyncio.SelectorEventLoop(_TurnTakingSelector())
