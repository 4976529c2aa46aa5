"""Hermetic-test fixtures: every test must leave no threads, no open sockets/files behind."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator

import pytest


def _open_fds() -> set[int]:
    try:
        return {int(fd) for fd in os.listdir("/proc/self/fd")}
    except FileNotFoundError:  # pragma: no cover - non-Linux
        return set()


def _describe(fd: int) -> str:
    try:
        return f"{fd} -> {os.readlink(f'/proc/self/fd/{fd}')}"
    except OSError:
        return str(fd)


@pytest.fixture(autouse=True)
def no_leaks(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test that leaves threads running or sockets open (pipes/eventfds are ignored:
    the global ZeroMQ context and the interpreter keep a few of those on purpose)."""
    threads_before = set(threading.enumerate())
    fds_before = _open_fds()
    yield
    if request.node.get_closest_marker("allow_leaks"):
        return
    deadline = time.monotonic() + 2.0
    while True:
        new_threads = [
            t for t in threading.enumerate() if t not in threads_before and t.is_alive()
            and not t.name.startswith(("asyncio_", "ThreadPoolExecutor"))
            # pyzmq's process-wide thread that releases zero-copy send buffers (started once)
            and type(t).__name__ != "GarbageCollectorThread"
        ]
        new_fds = [
            fd for fd in _open_fds() - fds_before
            if "socket:" in _describe(fd) and "anon_inode" not in _describe(fd)
        ]
        if (not new_threads and not new_fds) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert not new_threads, f"test leaked threads: {new_threads}"
    assert not new_fds, f"test leaked sockets: {[_describe(fd) for fd in new_fds]}"
