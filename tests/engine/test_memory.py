"""The allocator settings of fedcell's processes: received chunks reuse heap memory.

Each case runs in a fresh interpreter, since the settings are process-wide. The child receives
a 1 GiB stream's worth of 4 MiB ZeroMQ messages over tcp loopback (ZeroMQ's I/O thread mallocs
each one), copies each into a destination and drops it, as the stream layer does, and reports
the page faults of the second 1 GiB (the first warms the heap up).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")

CHUNKS = 256
PAGES = CHUNKS * (4 * 1024 * 1024) // 4096

CHILD = textwrap.dedent(
    """
    import ctypes, json, resource, sys, threading
    import numpy as np
    import zmq
    from fedcell.engine.memory import tune_allocator_for_streams

    if sys.argv[1] == "tune":
        tuned = tune_allocator_for_streams()
    else:  # the control: every chunk mmap-ed, i.e. fresh pages (fedcell's setting until now)
        tuned = False
        assert ctypes.CDLL(None).mallopt(-3, 128 * 1024) == 1
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    push = ctx.socket(zmq.PUSH)
    push.connect(f"tcp://127.0.0.1:{port}")
    chunk = np.ones(4 << 20, np.uint8)
    dest = np.empty(4 << 20, np.uint8)

    def send():
        for _ in range(2 * %(chunks)d):
            push.send_multipart([b"h" * 40, chunk], copy=False)

    sender = threading.Thread(target=send)
    sender.start()
    for _ in range(2):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(%(chunks)d):
            frames = pull.recv_multipart(copy=False)
            dest[:] = frames[1].buffer
            del frames
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    sender.join()
    ctx.destroy(linger=0)
    print(json.dumps({"tuned": tuned, "faults": faults}))
    """
) % {"chunks": CHUNKS}


def run_child(mode: str, env: dict[str, str] | None = None) -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, mode],
        capture_output=True, text=True, check=True, timeout=60,
        env={**os.environ, **(env or {})},
    )  # fmt: skip
    result: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def test_received_chunks_reuse_heap_memory_once_tuned() -> None:
    control = run_child("mmap-every-chunk")
    tuned = run_child("tune")
    assert tuned["tuned"] is True
    assert isinstance(control["faults"], int) and control["faults"] > PAGES // 2  # the measure sees fresh pages
    assert isinstance(tuned["faults"], int) and tuned["faults"] < PAGES // 50


def test_an_owner_set_malloc_tunable_is_left_alone() -> None:
    result = run_child("tune", {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1048576"})
    assert result["tuned"] is False
