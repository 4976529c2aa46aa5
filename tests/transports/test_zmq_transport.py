"""ZeroMQ transport behaviour beyond the conformance kit: reconnects, hostile peers, zero-copy
buffer ownership, address handling and error mapping. All use real sockets on loopback."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import zmq
import zmq.asyncio

from fedcell.errors import ConfigError, ConnectError, TransportClosedError
from fedcell.transports import zmq_transport
from fedcell.transports.base import Connection, ConnectionState, TransportOptions
from fedcell.transports.zmq_transport import ZmqConnection, ZmqListener, ZmqTransport

pytestmark = pytest.mark.integration

TIMEOUT_S = 10.0


async def _eventually(condition: Callable[[], bool], what: str, timeout: float = TIMEOUT_S) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


async def _listen_retrying(transport: ZmqTransport, url: str) -> ZmqListener:
    """Bind ``url`` again; the previous socket on it is closed asynchronously by ZeroMQ."""
    for _ in range(100):
        try:
            return await transport.listen(url)
        except ConnectError:
            await asyncio.sleep(0.05)
    return await transport.listen(url)


async def _send_until_one_waits(sender: Connection) -> asyncio.Future[None]:
    """Send 1 MiB messages to a peer that does not read until a ``send`` waits; return it."""
    frame = bytes(1024 * 1024)
    for _ in range(1000):
        blocked = asyncio.ensure_future(sender.send([frame]))
        await asyncio.wait({blocked}, timeout=0.05)
        if not blocked.done():
            return blocked
        blocked.result()
    raise AssertionError("send() never waited although the peer does not read")


def test_client_survives_listener_restart_on_the_same_port() -> None:
    async def main() -> None:
        # Prepare
        transport = ZmqTransport()
        first = await transport.listen("tcp://127.0.0.1:0")
        client = await transport.connect(first.url)
        states: list[ConnectionState] = []
        client.add_state_listener(states.append)
        server = await asyncio.wait_for(first.accept(), TIMEOUT_S)
        await client.send([b"before"])
        assert await asyncio.wait_for(server.recv(), TIMEOUT_S) == [b"before"]
        await _eventually(lambda: states == ["connected"], "the first connected event")
        try:
            # Execute
            await first.close()
            await _eventually(lambda: states[-1:] == ["disconnected"], "disconnected")
            second = await _listen_retrying(transport, first.url)
            try:
                await _eventually(lambda: states[-1:] == ["connected"], "reconnected")
                # The hello announces the client at once: no data needed before accept().
                server = await asyncio.wait_for(second.accept(), TIMEOUT_S)
                await server.send([b"welcome", b"back"])
                await client.send([b"after"])
                # Assert
                assert states == ["connected", "disconnected", "connected"]
                assert not client.closed
                assert await asyncio.wait_for(client.recv(), TIMEOUT_S) == [b"welcome", b"back"]
                assert await asyncio.wait_for(server.recv(), TIMEOUT_S) == [b"after"]
            finally:
                await second.close()
        finally:
            await client.close()
            await first.close()

    asyncio.run(main())


def test_garbage_from_a_raw_dealer_is_dropped_and_others_keep_being_served() -> None:
    async def main() -> None:
        # Prepare
        transport = ZmqTransport()
        listener = await transport.listen("tcp://127.0.0.1:0")
        raw = zmq.asyncio.Context.instance().socket(zmq.DEALER)
        raw.linger = 0
        client = await transport.connect(listener.url)
        garbage = [
            [b"GET / HTTP/1.1\r\n\r\n"],
            [b""],
            [b"\x02", b"a hello with a body"],
            [b"\xff" * 64, b"x"],
            [b"\x03"],
        ]
        try:
            raw.connect(listener.url)
            server = await asyncio.wait_for(listener.accept(), TIMEOUT_S)
            # Execute
            for message in garbage:
                await raw.send_multipart(message)
                await client.send([b"still", b"here"])
            # Assert
            for _ in garbage:
                assert await asyncio.wait_for(server.recv(), TIMEOUT_S) == [b"still", b"here"]
            await _eventually(
                lambda: listener.statistics().messages_dropped == len(garbage), "drop count"
            )
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(listener.accept(), 0.3)
            assert listener.statistics().connections_accepted == 1
            await server.send([b"reply"])
            assert await asyncio.wait_for(client.recv(), TIMEOUT_S) == [b"reply"]
        finally:
            raw.close(linger=0)
            await client.close()
            await listener.close()

    asyncio.run(main())


def test_send_returns_only_when_mutable_frames_may_be_reused() -> None:
    async def main() -> None:
        # Prepare: a small queue and a peer that does not read yet, so messages sit in pipes.
        transport = ZmqTransport(TransportOptions(queue_size=1))
        listener = await transport.listen("tcp://127.0.0.1:0")
        client = await transport.connect(listener.url)
        size = 8 * 1024 * 1024
        try:
            server = await asyncio.wait_for(listener.accept(), TIMEOUT_S)

            async def send_and_scribble() -> None:
                buffer = bytearray(size)
                for index in range(4):
                    buffer[:] = bytes([index]) * size
                    await client.send([buffer])
                    buffer[:] = b"\xff" * size  # the caller reuses its buffer at once

            # Execute
            sender = asyncio.ensure_future(send_and_scribble())
            await asyncio.sleep(0.3)
            received = [await asyncio.wait_for(server.recv(), TIMEOUT_S) for _ in range(4)]
            await asyncio.wait_for(sender, TIMEOUT_S)
            # Assert
            for index, frames in enumerate(received):
                assert bytes(frames[0]) == bytes([index]) * size, f"message {index} was scribbled"
        finally:
            await client.close()
            await listener.close()

    asyncio.run(main())


def test_send_nowait_copies_mutable_frames_above_the_threshold() -> None:
    async def main() -> None:
        transport = ZmqTransport()
        listener = await transport.listen("tcp://127.0.0.1:0")
        client = await transport.connect(listener.url)
        try:
            server = await asyncio.wait_for(listener.accept(), TIMEOUT_S)
            buffer = bytearray(b"\x01" * (1024 * 1024))
            client.send_nowait([buffer])
            buffer[:] = b"\xff" * len(buffer)
            frames = await asyncio.wait_for(server.recv(), TIMEOUT_S)
            assert bytes(frames[0]) == b"\x01" * len(buffer)
        finally:
            await client.close()
            await listener.close()

    asyncio.run(main())


def test_recv_returns_bytes_below_the_copy_threshold_and_views_above() -> None:
    async def main() -> None:
        transport = ZmqTransport(TransportOptions(copy_threshold=1024))
        listener = await transport.listen("tcp://127.0.0.1:0")
        client = await transport.connect(listener.url)
        try:
            server = await asyncio.wait_for(listener.accept(), TIMEOUT_S)
            await client.send([b"s" * 1023, b"L" * 1024])
            small, large = await asyncio.wait_for(server.recv(), TIMEOUT_S)
            assert type(small) is bytes and small == b"s" * 1023
            assert type(large) is memoryview and large == b"L" * 1024
        finally:
            await client.close()
            await listener.close()

    asyncio.run(main())


def test_messages_sent_before_the_listener_exists_are_delivered() -> None:
    async def main() -> None:
        # Prepare: learn a free port, then free it.
        transport = ZmqTransport()
        probe = await transport.listen("tcp://127.0.0.1:0")
        url = probe.url
        await probe.close()
        client = await transport.connect(url)
        try:
            # Execute
            await client.send([b"early", b"bird"])
            listener = await _listen_retrying(transport, url)
            try:
                server = await asyncio.wait_for(listener.accept(), TIMEOUT_S)
                # Assert
                assert await asyncio.wait_for(server.recv(), TIMEOUT_S) == [b"early", b"bird"]
            finally:
                await listener.close()
        finally:
            await client.close()

    asyncio.run(main())


def test_send_to_a_peer_that_left_raises_connect_error() -> None:
    async def main() -> None:
        transport = ZmqTransport()
        listener = await transport.listen("tcp://127.0.0.1:0")
        client = await transport.connect(listener.url)
        try:
            server = await asyncio.wait_for(listener.accept(), TIMEOUT_S)
            await client.close()

            def send_fails() -> bool:
                try:
                    server.send_nowait([b"anyone?"])
                except ConnectError as exc:
                    assert "is not connected" in str(exc)
                    return True
                return False

            await _eventually(send_fails, "the listener to notice the peer left")
            with pytest.raises(ConnectError):
                await server.send([b"anyone?"])
            assert not server.closed  # the identity may come back
        finally:
            await client.close()
            await listener.close()

    asyncio.run(main())


def test_a_peer_is_accepted_again_after_its_connection_was_closed() -> None:
    async def main() -> None:
        transport = ZmqTransport()
        listener = await transport.listen("tcp://127.0.0.1:0")
        client = await transport.connect(listener.url)
        try:
            first = await asyncio.wait_for(listener.accept(), TIMEOUT_S)
            await first.close()
            await client.send([b"again"])
            second = await asyncio.wait_for(listener.accept(), TIMEOUT_S)
            assert second is not first
            assert await asyncio.wait_for(second.recv(), TIMEOUT_S) == [b"again"]
            assert listener.statistics().connections_accepted == 2
        finally:
            await client.close()
            await listener.close()

    asyncio.run(main())


def test_state_listener_that_raises_does_not_stop_state_reports() -> None:
    async def main() -> None:
        transport = ZmqTransport()
        listener = await transport.listen("tcp://127.0.0.1:0")
        client = await transport.connect(listener.url)
        states: list[ConnectionState] = []

        def broken(state: ConnectionState) -> None:
            raise RuntimeError(f"listener bug on {state}")

        client.add_state_listener(broken)
        client.add_state_listener(states.append)
        try:
            await _eventually(lambda: states == ["connected"], "connected")
            await listener.close()
            await _eventually(lambda: states == ["connected", "disconnected"], "disconnected")
        finally:
            await client.close()
            await listener.close()

    asyncio.run(main())


@pytest.mark.parametrize("operation", ["listen", "connect"])
def test_ipc_path_above_the_os_limit_is_a_config_error(operation: str, tmp_path: Path) -> None:
    path = str(tmp_path / ("x" * (zmq.IPC_PATH_MAX_LEN + 1)))
    transport = ZmqTransport()
    call: Callable[[str], Awaitable[object]] = getattr(transport, operation)
    with pytest.raises(ConfigError, match="longer than the OS limit") as info:
        asyncio.run(call(f"ipc://{path}"))  # type: ignore[arg-type]
    assert path in str(info.value)


@pytest.mark.parametrize(
    "url", ["tcp://", "tcp://127.0.0.1", "udp://127.0.0.1:1", "tcp://no-such-host.invalid:1"]
)
def test_malformed_listen_urls_are_config_errors(url: str) -> None:
    with pytest.raises(ConfigError):
        asyncio.run(ZmqTransport().listen(url))


def test_binding_an_address_in_use_is_a_connect_error() -> None:
    async def main() -> None:
        transport = ZmqTransport()
        listener = await transport.listen("tcp://127.0.0.1:0")
        try:
            with pytest.raises(ConnectError, match=r"listen on tcp://127\.0\.0\.1:"):
                await transport.listen(listener.url)
        finally:
            await listener.close()

    asyncio.run(main())


def test_ipc_wildcard_reports_the_path_it_bound(tmp_path: Path) -> None:
    async def main() -> None:
        transport = ZmqTransport()
        listener = await transport.listen(f"ipc://{tmp_path}/named.sock")
        try:
            assert listener.url == f"ipc://{tmp_path}/named.sock"
            assert os.path.exists(f"{tmp_path}/named.sock")
        finally:
            await listener.close()

    asyncio.run(main())


def test_a_waiting_reader_wakes_although_a_send_consumed_the_socket_signal() -> None:
    """ZeroMQ's fd is edge-triggered: a send through the sync view can swallow the signal that
    a message arrived; the transport must re-arm pyzmq's asyncio wake-up after such calls."""

    async def main() -> None:
        transport = ZmqTransport()
        listener = await transport.listen("tcp://127.0.0.1:0")
        client = await transport.connect(listener.url)
        try:
            server = await asyncio.wait_for(listener.accept(), TIMEOUT_S)
            for _ in range(5):
                await server.send([b"to-client"])
                time.sleep(0.02)  # blocking on purpose: the message reaches the client socket
                client.send_nowait([b"to-server"])  # processes the socket's pending signal
                assert await asyncio.wait_for(client.recv(), 2) == [b"to-client"]
                assert await asyncio.wait_for(server.recv(), 2) == [b"to-server"]
        finally:
            await client.close()
            await listener.close()

    asyncio.run(main())


def test_garbage_from_a_raw_router_is_dropped_by_the_client() -> None:
    async def main() -> None:
        # Prepare: a foreign ROUTER where the client expects a fedcell listener.
        raw = zmq.asyncio.Context.instance().socket(zmq.ROUTER)
        raw.linger = 0
        port = raw.bind_to_random_port("tcp://127.0.0.1")
        client = await ZmqTransport().connect(f"tcp://127.0.0.1:{port}")
        try:
            identity, hello = await asyncio.wait_for(raw.recv_multipart(), TIMEOUT_S)
            assert hello == b"\x02"
            # Execute
            await raw.send_multipart([identity, b"\x7f", b"garbage"])
            await raw.send_multipart([identity, b""])
            await raw.send_multipart([identity, b"\x01", b"real", b""])
            # Assert
            assert await asyncio.wait_for(client.recv(), TIMEOUT_S) == [b"real", b""]
            assert client.statistics().messages_received == 1
        finally:
            await client.close()
            raw.close(linger=0)

    asyncio.run(main())


def test_a_send_waiting_on_a_full_peer_fails_when_the_peer_leaves() -> None:
    async def main() -> None:
        # Prepare: the client does not read, so the listener's pipe to it fills up.
        transport = ZmqTransport(TransportOptions(queue_size=1))
        listener = await transport.listen("tcp://127.0.0.1:0")
        client = await transport.connect(listener.url)
        try:
            server = await asyncio.wait_for(listener.accept(), TIMEOUT_S)
            blocked = await _send_until_one_waits(server)
            # Execute
            await client.close()
            # Assert
            with pytest.raises(ConnectError, match="is not connected"):
                await asyncio.wait_for(blocked, TIMEOUT_S)
        finally:
            await client.close()
            await listener.close()

    asyncio.run(main())


@pytest.mark.parametrize("side", ["client", "server"])
def test_close_wakes_a_send_waiting_for_a_full_pipe(side: str) -> None:
    async def main() -> None:
        # Prepare: nobody reads, so sends from ``side`` end up waiting.
        transport = ZmqTransport(TransportOptions(queue_size=1))
        listener = await transport.listen("tcp://127.0.0.1:0")
        client = await transport.connect(listener.url)
        try:
            server = await asyncio.wait_for(listener.accept(), TIMEOUT_S)
            sender = client if side == "client" else server
            blocked = await _send_until_one_waits(sender)
            # Execute
            await sender.close()
            # Assert
            with pytest.raises(TransportClosedError):
                await asyncio.wait_for(blocked, TIMEOUT_S)
        finally:
            await client.close()
            await listener.close()

    asyncio.run(main())


def test_read_only_frames_are_sent_without_waiting_for_their_release(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    waits: list[int] = []
    real_wait = zmq_transport._wait_released

    def counting_wait(trackers: list[zmq.MessageTracker], conn: ZmqConnection) -> None:
        waits.append(len(trackers))
        real_wait(trackers, conn)

    monkeypatch.setattr(zmq_transport, "_wait_released", counting_wait)

    async def main() -> None:
        # Prepare: the peer does not read, so nothing large is released soon.
        transport = ZmqTransport(TransportOptions(queue_size=1))
        listener = await transport.listen("tcp://127.0.0.1:0")
        client = await transport.connect(listener.url)
        try:
            server = await asyncio.wait_for(listener.accept(), TIMEOUT_S)
            promised = memoryview(bytearray(b"p" * (8 * 1024 * 1024))).toreadonly()
            # Execute
            await asyncio.wait_for(client.send([b"head", promised, bytes(1 << 20)]), TIMEOUT_S)
            # Assert
            assert waits == []
            received = await asyncio.wait_for(server.recv(), TIMEOUT_S)
            assert bytes(received[1]) == bytes(promised)
            assert memoryview(received[1]).readonly
        finally:
            await client.close()
            await listener.close()

    asyncio.run(main())


def test_an_ipc_path_in_use_is_refused_and_a_stale_one_is_taken_over(tmp_path: Path) -> None:
    async def main() -> None:
        # Prepare: a stale socket file, as a crashed process leaves behind.
        path = tmp_path / "server.sock"
        with socket.socket(socket.AF_UNIX) as crashed:
            crashed.bind(str(path))
        transport = ZmqTransport()
        # Execute / Assert
        listener = await transport.listen(f"ipc://{path}")
        try:
            with pytest.raises(ConnectError, match="another socket is listening"):
                await transport.listen(f"ipc://{path}")
            client = await transport.connect(listener.url)
            try:
                await client.send([b"still mine"])
                server = await asyncio.wait_for(listener.accept(), TIMEOUT_S)
                assert await asyncio.wait_for(server.recv(), TIMEOUT_S) == [b"still mine"]
            finally:
                await client.close()
        finally:
            await listener.close()

    asyncio.run(main())


def test_a_connection_nobody_reads_is_named_in_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(zmq_transport, "_STALL_WARN_S", 0.1)

    async def main() -> None:
        # Prepare
        transport = ZmqTransport(TransportOptions(queue_size=2))
        listener = await transport.listen("tcp://127.0.0.1:0")
        client = await transport.connect(listener.url)
        try:
            server = await asyncio.wait_for(listener.accept(), TIMEOUT_S)
            # Execute: more messages than the listener's queue holds, and nobody reads.
            for index in range(5):
                await client.send([b"%d" % index])
            await _eventually(lambda: "unread for" in caplog.text, "the stall warning")
            # Assert: the warning names the connection; reading resumes the flow in order.
            assert server.peer in caplog.text
            assert f"all peers of listener {listener.url} wait" in caplog.text
            for index in range(5):
                assert await asyncio.wait_for(server.recv(), TIMEOUT_S) == [b"%d" % index]
        finally:
            await client.close()
            await listener.close()

    with caplog.at_level("WARNING", logger="fedcell.transports.zmq_transport"):
        asyncio.run(main())
