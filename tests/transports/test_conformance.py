"""The transport conformance kit run against every built-in transport, and against broken ones."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from fedcell.transports.base import Buffer, Connection, Transport
from fedcell.transports.inproc import InprocConnection, InprocTransport
from fedcell.transports.testing import (
    TRANSPORT_CHECKS,
    TransportCheck,
    check_backpressure,
    check_round_trip,
    check_transport,
)
from fedcell.transports.zmq_transport import ZmqTransport

CHECKS = pytest.mark.parametrize("check", TRANSPORT_CHECKS, ids=lambda check: check.__name__)


@CHECKS
def test_inproc_transport_conforms(check: TransportCheck) -> None:
    asyncio.run(check(InprocTransport(), "inproc://conformance"))


@pytest.mark.integration
@CHECKS
def test_tcp_transport_conforms(check: TransportCheck) -> None:
    asyncio.run(check(ZmqTransport(), "tcp://127.0.0.1:0"))


@pytest.mark.integration
@CHECKS
def test_ipc_transport_conforms(check: TransportCheck, tmp_path: Path) -> None:
    asyncio.run(check(ZmqTransport(), f"ipc://{tmp_path}/conformance.sock"))


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.integration
@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback on this machine")
def test_check_transport_runs_every_check_on_ipv6_loopback() -> None:
    asyncio.run(check_transport(ZmqTransport(), "tcp://[::1]:0"))


class _ReorderingConnection(InprocConnection):
    """Delivers the frames of each message in reverse order."""

    async def recv(self) -> list[Buffer]:
        return list(reversed(await super().recv()))


class _UnboundedConnection(InprocConnection):
    """Never reports a full queue: grows it instead."""

    def send_nowait(self, frames: Sequence[Buffer]) -> None:
        self._outbox._maxsize = 0  # type: ignore[attr-defined]
        super().send_nowait(frames)


def _with_class(connection_cls: type[InprocConnection]) -> Transport:
    """An in-process transport whose client connections misbehave as ``connection_cls`` says."""

    class BrokenTransport(InprocTransport):
        async def connect(self, url: str) -> Connection:
            conn = await super().connect(url)
            conn.__class__ = connection_cls
            return conn

    return BrokenTransport()


def test_kit_detects_a_transport_that_reorders_frames() -> None:
    transport = _with_class(_ReorderingConnection)
    with pytest.raises(AssertionError, match="server -> client message changed in transit"):
        asyncio.run(check_round_trip(transport, "inproc://broken-order"))


def test_kit_detects_an_unbounded_queue() -> None:
    transport = _with_class(_UnboundedConnection)
    with pytest.raises(AssertionError, match="the queue is not bounded"):
        asyncio.run(check_backpressure(transport, "inproc://broken-bound"))


def test_check_transport_names_the_failing_check() -> None:
    transport = _with_class(_ReorderingConnection)
    with pytest.raises(AssertionError, match=r"^check_round_trip: "):
        asyncio.run(check_transport(transport, "inproc://broken-named"))


def test_kit_runs_without_a_test_framework() -> None:
    script = (
        "import asyncio, sys\n"
        "from fedcell.transports.inproc import InprocTransport\n"
        "from fedcell.transports.testing import check_round_trip\n"
        "asyncio.run(check_round_trip(InprocTransport(), 'inproc://plain'))\n"
        "assert 'pytest' not in sys.modules, 'the kit imported pytest'\n"
        "print('ok')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
