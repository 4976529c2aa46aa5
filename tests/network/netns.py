"""A throw-away network of Linux namespaces for the network tests and ``benchmarks/network.py``.

Why: loopback moves gigabytes per second with microsecond round trips, so it hides what a real
link does to a stream (a window against the bandwidth-delay product, compression that pays only
on a slow link, a connection cut halfway). A network namespace has its own interfaces, routes and
loopback; a veth pair is a virtual cable between two namespaces; a ``tbf`` qdisc on each end caps
the rate that end sends at, so both directions of the cable run at the link's rate. This kernel
has no ``netem``: latency and cuts come from the TCP proxy in ``delay_proxy.py``.

Contract
--------
- :class:`Lab` is a context manager. Everything it creates is removed on the way out, also when a
  test failed or the lab's own setup failed halfway: processes started with :meth:`Lab.spawn`
  are killed and reaped first, and any other process still inside one of its namespaces (a
  child's own children) is killed, then every namespace is deleted (deleting a namespace deletes
  the veth ends inside it, their peers, and the qdiscs on them). Nothing is created in the host's
  namespace, so nothing can be left there.
- Names are unique per lab (``fc<8 hex>-<label>`` namespaces, ``fc<6 hex><n><a|b>`` interfaces,
  within Linux's 15-character limit), so parallel runs on one machine do not collide; the
  addresses (``10.77.<subnet>.1`` and ``.2``) repeat across labs, which is harmless because
  every lab's addresses live in its own namespaces.
- A process runs inside a namespace as ``ip netns exec NAME argv`` (:meth:`Lab.spawn` returns a
  :class:`Child` spoken to in lines over its stdin and stdout, its stderr in a log file); the
  loopback of every namespace is up, so a process may also listen on ``127.0.0.1`` there.
- :func:`netns_unavailable` says why a lab cannot be built here (not root, no ``ip netns``);
  callers skip with that reason. Any other failure (``tc`` refusing a rate) is an error.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import select
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = ["Child", "Lab", "Namespace", "netns_unavailable"]

SUBNET_PREFIX = "10.77"


def netns_unavailable() -> str | None:
    """The reason namespaces cannot be used on this machine, or ``None`` when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root (CI runs as root)"
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "iproute2 (`ip`, `tc`) is not installed"
    probe = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        return f"`ip netns` is unavailable: {probe.stderr.strip()}"
    return None


@dataclass(frozen=True, slots=True)
class Namespace:
    """One namespace of a lab: ``name`` is the kernel's, ``label`` the test's."""

    name: str
    label: str


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"`ip {' '.join(args)}` failed: {result.stderr.strip()}")


class Child:
    """A process of a lab, spoken to in lines: commands on its stdin, answers on its stdout."""

    def __init__(self, popen: subprocess.Popen[bytes], log: Path) -> None:
        self.popen = popen
        self.log = log
        self._buffer = b""

    def send_line(self, line: str) -> None:
        assert self.popen.stdin is not None
        self.popen.stdin.write(line.encode() + b"\n")

    def read_line(self, timeout: float) -> str:
        """The next line the process printed.

        Raises
        ------
        TimeoutError
            If no whole line came within ``timeout`` seconds.
        EOFError
            If the process closed its stdout (it ended); the message holds its log's tail.
        """
        assert self.popen.stdout is not None
        fd = self.popen.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                raise TimeoutError(f"no line within {timeout:g} s; log: {self.log_tail()}")
            data = os.read(fd, 65536)
            if not data:
                raise EOFError(f"the process ended ({self.popen.poll()}); log: {self.log_tail()}")
            self._buffer += data
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode()

    def read_json(self, timeout: float) -> dict[str, Any]:
        """The next line, parsed as a JSON object."""
        result: dict[str, Any] = json.loads(self.read_line(timeout))
        return result

    def wait(self, timeout: float) -> int:
        """Close its stdin and wait for it to exit; return its exit status."""
        assert self.popen.stdin is not None
        if not self.popen.stdin.closed:
            self.popen.stdin.close()
        return self.popen.wait(timeout)

    def log_tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    def kill(self) -> None:
        """Kill it (if still running), reap it and close its pipes."""
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait()
        for pipe in (self.popen.stdin, self.popen.stdout):
            if pipe is not None:
                pipe.close()


class Lab:
    """Namespaces, the veth links between them and the processes running inside.

    Use as a context manager; see the module docstring for what it guarantees.
    """

    def __init__(self) -> None:
        self._tag = secrets.token_hex(4)
        self._namespaces: list[Namespace] = []
        self._links = 0
        self._children: list[Child] = []

    def __enter__(self) -> Lab:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def namespace(self, label: str) -> Namespace:
        """Create a namespace with its loopback up."""
        namespace = Namespace(f"fc{self._tag}-{label}", label)
        _ip("netns", "add", namespace.name)
        self._namespaces.append(namespace)  # recorded at once: deleted whatever fails next
        _ip("-n", namespace.name, "link", "set", "lo", "up")
        return namespace

    def link(self, a: Namespace, b: Namespace, rate: str | None = None) -> tuple[str, str]:
        """Join ``a`` and ``b`` by a veth pair on a fresh ``/24``; return their addresses.

        ``rate`` (a ``tc`` rate such as ``"1gbit"`` or ``"100mbit"``) caps both directions with
        a token bucket on each end: a burst of 2 ms at that rate (at least 64 KiB, one GSO
        packet) and a queue of at most 20 ms before the bucket drops packets.
        """
        index = self._links
        self._links += 1
        subnet = f"{SUBNET_PREFIX}.{index}"
        ends = ((a, f"fc{self._tag[:6]}{index}a", f"{subnet}.1"),
                (b, f"fc{self._tag[:6]}{index}b", f"{subnet}.2"))  # fmt: skip
        (_, name_a, _), (_, name_b, _) = ends
        _ip("link", "add", name_a, "netns", a.name, "type", "veth",
            "peer", "name", name_b, "netns", b.name)  # fmt: skip
        for namespace, device, address in ends:
            _ip("-n", namespace.name, "addr", "add", f"{address}/24", "dev", device)
            _ip("-n", namespace.name, "link", "set", device, "up")
            if rate is not None:
                self._cap(namespace, device, rate)
        return ends[0][2], ends[1][2]

    def command(self, namespace: Namespace, argv: list[str]) -> list[str]:
        """``argv`` run inside ``namespace``."""
        return ["ip", "netns", "exec", namespace.name, *argv]

    def spawn(self, namespace: Namespace, argv: list[str], log: Path) -> Child:
        """Start ``argv`` inside ``namespace`` (stderr to ``log``); the lab kills it on close."""
        with log.open("ab") as stderr:
            popen = subprocess.Popen(
                self.command(namespace, argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=stderr, bufsize=0, env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )  # fmt: skip
        child = Child(popen, log)
        self._children.append(child)
        return child

    def close(self) -> None:
        """Kill the lab's processes and any process left in its namespaces (a child's own
        children), then delete the namespaces (idempotent)."""
        for child in self._children:
            child.kill()
        self._children.clear()
        errors = []
        for namespace in reversed(self._namespaces):
            listed = subprocess.run(["ip", "netns", "pids", namespace.name],
                                    capture_output=True, text=True, check=False)  # fmt: skip
            for pid in listed.stdout.split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
            result = subprocess.run(["ip", "netns", "del", namespace.name],
                                    capture_output=True, text=True, check=False)  # fmt: skip
            if result.returncode != 0:
                errors.append(f"{namespace.name}: {result.stderr.strip()}")
        self._namespaces.clear()
        if errors:
            raise RuntimeError(f"could not delete namespaces: {errors}")

    @staticmethod
    def _cap(namespace: Namespace, device: str, rate: str) -> None:
        bits_per_second = _parse_rate(rate)
        burst = max(64 * 1024, bits_per_second // 8 // 500)
        result = subprocess.run(
            ["ip", "netns", "exec", namespace.name, "tc", "qdisc", "add", "dev", device, "root",
             "tbf", "rate", rate, "burst", str(burst), "latency", "20ms"],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(f"tbf {rate} on {device} failed: {result.stderr.strip()}")


_UNITS = {"gbit": 10**9, "mbit": 10**6, "kbit": 10**3}


def _parse_rate(rate: str) -> int:
    for unit, scale in _UNITS.items():
        if rate.endswith(unit):
            return int(float(rate[: -len(unit)]) * scale)
    raise ValueError(f"rate {rate!r} is not in gbit, mbit or kbit")
