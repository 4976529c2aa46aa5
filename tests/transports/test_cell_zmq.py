"""Cells over ZeroMQ (tcp and ipc), including a server process killed and restarted."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedcell.errors import UnreachableError
from fedcell.transports import TransportOptions, connect
from fedcell.transports.cell import Cell, CellConfig
from fedcell.transports.message import Message

pytestmark = pytest.mark.integration

# peer_timeout is generous: the machine is shared and a loaded peer may pause for a second.
CONFIG = CellConfig(heartbeat_interval=0.1, peer_timeout=3.0, connect_timeout=5.0)
CELL_SCRIPT = Path(__file__).with_name("cell_proc.py")


async def echo(message: Message) -> Any:
    return {"payload": message.payload, "route": list(message.envelope.route)}


async def until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


@pytest.fixture(params=["tcp", "ipc"])
def listen_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "tcp":
        return "tcp://127.0.0.1:0"
    return f"ipc://{tmp_path}/server.sock"


def test_request_relay_and_broadcast(listen_url: str) -> None:
    async def main() -> None:
        async with AsyncExitStack() as stack:
            # Prepare
            server = await stack.enter_async_context(
                Cell("server", listen=listen_url, config=CONFIG)
            )
            sites = [
                await stack.enter_async_context(Cell(f"site-{i}", parent=server.url, config=CONFIG))
                for i in (1, 2, 3)
            ]
            for cell in (server, *sites):
                cell.register("echo", echo)

            # Execute
            direct = await sites[0].request("server", "echo", "hi")
            relayed = await sites[0].request("site-2", "echo", np.ones((3, 3), np.float32))
            results = await server.broadcast(["site-1", "site-2", "site-3", "site-9"], "echo", 7)

            # Assert
            assert direct == {"payload": "hi", "route": []}
            assert relayed["route"] == ["server"]
            np.testing.assert_array_equal(relayed["payload"], np.ones((3, 3), np.float32))
            assert [results[f"site-{i}"]["payload"] for i in (1, 2, 3)] == [7, 7, 7]
            assert isinstance(results["site-9"], UnreachableError)

    asyncio.run(main())


def test_garbage_from_a_raw_connection_does_not_stop_the_server() -> None:
    async def main() -> None:
        async with Cell("server", listen="tcp://127.0.0.1:0", config=CONFIG) as server:
            server.register("echo", echo)
            # copy_threshold above the largest frame: no zero-copy send, so pyzmq starts no
            # garbage-collector thread (which the leak check would flag)
            raw = await connect(server.url, TransportOptions(copy_threshold=1 << 20))
            for frames in ([b"\xc1\xc1"], [b"\x80"], [b""] * 3, [b"x" * 100_000]):
                await raw.send(frames)
            await until(lambda: server.statistics().malformed_frames == 4)
            async with Cell("site-1", parent=server.url, config=CONFIG) as site:
                assert await site.request("server", "echo", 1) == {"payload": 1, "route": []}
            await raw.close()

    asyncio.run(main())


def test_site_reconnects_when_the_server_cell_restarts_on_the_same_port() -> None:
    async def main() -> None:
        server = Cell("server", listen="tcp://127.0.0.1:0", config=CONFIG)
        await server.start()
        url = server.url
        server.register("echo", echo)
        async with Cell("site-1", parent=url, config=CONFIG) as site:
            assert (await site.request("server", "echo", 1))["payload"] == 1
            await server.stop()
            await until(lambda: site.parent is None)
            async with Cell("server", listen=url, config=CONFIG) as again:
                again.register("echo", echo)
                await until(lambda: site.parent == "server")
                assert (await site.request("server", "echo", 2))["payload"] == 2

    asyncio.run(main())


def _start_server(url: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, str(CELL_SCRIPT), "server", "--listen", url, "--heartbeat", "0.1"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if not line.startswith("tcp://"):
        proc.kill()
        proc.wait()
        raise AssertionError(f"server process did not start (said {line!r})")
    return proc, line


def test_site_keeps_working_after_the_server_process_is_killed_and_restarted() -> None:
    async def main() -> None:
        # Prepare: a server process on a fresh port, a site in this process
        first, url = _start_server("tcp://127.0.0.1:0")
        second: subprocess.Popen[str] | None = None
        events: list[tuple[str, str]] = []
        try:
            async with Cell("site-1", parent=url, config=CONFIG) as site:
                site.add_peer_listener(lambda name, event: events.append((name, event)))
                before = await site.request("server", "echo", "before")

                # Execute: kill -9 the server (no goodbye), start a new one on the same port
                first.kill()
                first.wait()
                await until(lambda: site.parent is None, timeout=5)
                with pytest.raises(UnreachableError):
                    await site.request("server", "echo", "while down")
                second, same_url = _start_server(url)
                assert same_url == url
                await until(lambda: site.parent == "server", timeout=15)
                after = await site.request("server", "echo", "after")

            # Assert: the site re-helloed to the new process and is served again
            assert before["payload"] == "before" and after["payload"] == "after"
            assert before["pid"] == first.pid and after["pid"] == second.pid
            assert events == [("server", "left"), ("server", "joined")]
        finally:
            for proc in (first, second):
                if proc is not None and proc.poll() is None:
                    proc.terminate()
                    proc.wait(10)
                if proc is not None and proc.stdout is not None:
                    proc.stdout.close()

    asyncio.run(main())


@pytest.mark.allow_leaks  # zero-copy sends start pyzmq's process-wide garbage-collector thread
def test_a_large_model_streams_site_to_site_over_tcp() -> None:
    async def main() -> None:
        async with AsyncExitStack() as stack:
            server = await stack.enter_async_context(
                Cell("server", listen="tcp://127.0.0.1:0", config=CONFIG)
            )
            sites = [
                await stack.enter_async_context(Cell(f"site-{i}", parent=server.url, config=CONFIG))
                for i in (1, 2)
            ]
            sites[1].register("echo", echo)
            weights = np.arange(4 * 1024 * 1024, dtype=np.float32)  # 16 MiB: streamed

            reply = await sites[0].request("site-2", "echo", {"w": weights}, timeout=30)

            np.testing.assert_array_equal(reply["payload"]["w"], weights)
            assert sites[1].statistics().streams.streams_received == 1
            assert sites[0].statistics().streams.streams_received == 1

    asyncio.run(main())


def test_a_killed_site_process_fails_its_pending_request_at_the_peer_timeout() -> None:
    async def main() -> None:
        async with Cell("server", listen="tcp://127.0.0.1:0", config=CONFIG) as server:
            # Prepare: a site process busy with a long request
            events: list[tuple[str, str]] = []
            server.add_peer_listener(lambda name, event: events.append((name, event)))
            site = subprocess.Popen(
                [sys.executable, str(CELL_SCRIPT), "site-1", "--parent", server.url,
                 "--heartbeat", "0.1"],
                stdout=subprocess.DEVNULL,
            )  # fmt: skip
            try:
                await until(lambda: "site-1" in server.peers)
                busy = asyncio.create_task(server.request("site-1", "sleep", 60, timeout=120))
                await asyncio.sleep(0.2)

                # Execute: the site crashes (no goodbye)
                site.kill()
                site.wait()
                killed_at = time.monotonic()

                # Assert: the server learns from the missing heartbeats, not at the timeout
                with pytest.raises(UnreachableError, match="'site-1' is gone"):
                    await busy
                assert time.monotonic() - killed_at < CONFIG.peer_timeout + 2
                assert events == [("site-1", "joined"), ("site-1", "left")]
            finally:
                if site.poll() is None:
                    site.kill()
                    site.wait()

    asyncio.run(main())
