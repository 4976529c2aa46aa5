"""Conformance kit for transports: the contract of :mod:`fedcell.transports.base`, executable.

Every transport, built-in or third-party, must pass :func:`check_transport`::

    asyncio.run(check_transport(MyTransport(), "myscheme://somewhere"))

The kit needs no test framework: each check is a coroutine that raises ``AssertionError`` with a
message naming what broke, so it runs under pytest, unittest or a plain script. Test suites may
run the checks one by one (``TRANSPORT_CHECKS``) to see each result separately.

``url`` is the address to *listen* on; every check binds it, uses ``Listener.url`` to connect,
and closes everything before the next one starts, so the address must be bindable again after a
close (``tcp://127.0.0.1:0``, an ``ipc://`` path, an ``inproc://`` name). The backpressure check
builds a second instance, ``type(transport)(options)``, with a small ``queue_size``: transports
take their :class:`~fedcell.transports.base.TransportOptions` as the only constructor argument
(as the registry assumes too).

What is checked (one coroutine each):

- round trip of multi-frame messages both ways, small and zero-copy-sized frames;
- zero-length frames and zero-frame messages;
- order of many messages, sent both ways at once;
- a 64 MiB frame arrives intact, and a received frame can be sent on again as is;
- several clients on one listener are kept apart (each accepted connection carries one client);
- bounded queues: ``send_nowait`` raises ``WouldBlockError`` when the peer does not read, ``send``
  waits instead, and everything queued arrives once the peer reads (both directions);
- ``statistics()`` counts messages and bytes on both ends and returns a snapshot;
- close: ``send``/``send_nowait``/``recv`` raise ``TransportClosedError`` after close, a waiting
  ``recv`` or ``accept`` is woken by close, closing twice is harmless, closing a listener closes
  its connections;
- ``Listener.url`` is connectable (and reports a real port when asked for port 0).

The idea follows trio's ``check_two_way_stream``: a generic suite parameterised by how to make
the endpoints, run against every implementation.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import replace
from typing import TypeVar

from fedcell.errors import TransportClosedError, WouldBlockError
from fedcell.transports.base import Buffer, Connection, Listener, Transport

__all__ = [
    "TRANSPORT_CHECKS",
    "TransportCheck",
    "check_backpressure",
    "check_clients_kept_apart",
    "check_close",
    "check_large_frame",
    "check_listener_url",
    "check_message_order",
    "check_round_trip",
    "check_statistics",
    "check_transport",
    "check_zero_length_frames",
]

TransportCheck = Callable[[Transport, str], Awaitable[None]]
T = TypeVar("T")

STEP_TIMEOUT_S = 10.0
LARGE_FRAME_BYTES = 64 * 1024 * 1024
_BACKPRESSURE_FRAME = bytes(1024 * 1024)
_BACKPRESSURE_MAX_MESSAGES = 512
_SMALL_QUEUE = 2


async def _within(awaitable: Awaitable[T], what: str, timeout: float = STEP_TIMEOUT_S) -> T:
    try:
        return await asyncio.wait_for(awaitable, timeout)
    except asyncio.TimeoutError:
        raise AssertionError(f"{what} did not complete within {timeout} s") from None


def _as_bytes(frames: Sequence[Buffer]) -> list[bytes]:
    return [bytes(frame) for frame in frames]


async def _recv(conn: Connection, what: str) -> list[Buffer]:
    frames = await _within(conn.recv(), f"recv() of {what}")
    assert isinstance(frames, list), f"recv() returned {type(frames).__name__}, expected a list"
    for index, frame in enumerate(frames):
        try:
            memoryview(frame)
        except TypeError:
            raise AssertionError(
                f"frame {index} of {what} is a {type(frame).__name__}, not a buffer"
            ) from None
    return frames


async def _accept(listener: Listener) -> Connection:
    return await _within(listener.accept(), f"accept() on {listener.url} after a connect()")


@contextlib.asynccontextmanager
async def _pair(
    transport: Transport, url: str
) -> AsyncIterator[tuple[Listener, Connection, Connection]]:
    """Listen on ``url``, connect a client to ``Listener.url``, accept it; close all on exit."""
    listener = await _within(transport.listen(url), f"listen({url!r})")
    client: Connection | None = None
    try:
        client = await _within(transport.connect(listener.url), f"connect({listener.url!r})")
        server = await _accept(listener)
        try:
            yield listener, client, server
        finally:
            await server.close()
    finally:
        if client is not None:
            await client.close()
        await listener.close()


async def _expect_closed(operation: Awaitable[object], what: str) -> None:
    try:
        await _within(operation, what)
    except TransportClosedError:
        return
    raise AssertionError(f"{what} did not raise TransportClosedError")


async def check_round_trip(transport: Transport, url: str) -> None:
    """Multi-frame messages, small and zero-copy-sized frames, arrive unchanged both ways."""
    large = bytes(range(256)) * (4 * 1024)  # 1 MiB, above any sensible copy threshold
    message: list[Buffer] = [b"header", b"", large, bytearray(b"mutable tail"), memoryview(b"mv")]
    async with _pair(transport, url) as (_, client, server):
        await _within(client.send(message), "client send()")
        got = await _recv(server, "a client message")
        assert _as_bytes(got) == _as_bytes(message), "client -> server message changed in transit"
        reply = list(reversed(message))
        await _within(server.send(reply), "server send()")
        got = await _recv(client, "a server message")
        assert _as_bytes(got) == _as_bytes(reply), "server -> client message changed in transit"


async def check_zero_length_frames(transport: Transport, url: str) -> None:
    """Empty frames and messages of zero frames are delivered as such."""
    messages: list[list[Buffer]] = [[b""], [b"", b"", b""], [], [b"", b"x", b""]]
    async with _pair(transport, url) as (_, client, server):
        for sender, receiver, direction in ((client, server, "c->s"), (server, client, "s->c")):
            for message in messages:
                await _within(sender.send(message), f"{direction} send({message!r})")
            for message in messages:
                got = await _recv(receiver, f"{direction} {message!r}")
                assert _as_bytes(got) == _as_bytes(message), (
                    f"{direction}: sent {message!r}, received {_as_bytes(got)!r}"
                )


async def check_message_order(transport: Transport, url: str, count: int = 2000) -> None:
    """Many messages keep their order, while both sides send at the same time."""

    async def send_all(conn: Connection, origin: bytes) -> None:
        for index in range(count):
            await conn.send([origin, struct.pack("<I", index)])

    async def recv_all(conn: Connection, origin: bytes) -> None:
        for index in range(count):
            frames = _as_bytes(await conn.recv())
            expected = [origin, struct.pack("<I", index)]
            assert frames == expected, f"message {index} from {origin!r} arrived as {frames!r}"

    async with _pair(transport, url) as (_, client, server):
        await _within(
            asyncio.gather(
                send_all(client, b"client"),
                send_all(server, b"server"),
                recv_all(server, b"client"),
                recv_all(client, b"server"),
            ),
            f"exchanging {count} messages each way",
            timeout=6 * STEP_TIMEOUT_S,
        )


async def check_large_frame(transport: Transport, url: str) -> None:
    """A 64 MiB frame arrives intact; the receiver can send the received frame on as is."""
    payload = bytearray(os.urandom(LARGE_FRAME_BYTES))
    digest = hashlib.blake2b(payload).digest()
    async with _pair(transport, url) as (_, client, server):
        await _within(client.send([b"big", payload]), "send() of 64 MiB", 6 * STEP_TIMEOUT_S)
        got = await _within(server.recv(), "recv() of 64 MiB", 6 * STEP_TIMEOUT_S)
        assert len(got) == 2, f"a 2-frame message arrived as {len(got)} frames"
        assert memoryview(got[1]).nbytes == LARGE_FRAME_BYTES, (
            f"64 MiB frame arrived as {memoryview(got[1]).nbytes} bytes"
        )
        assert hashlib.blake2b(got[1]).digest() == digest, "64 MiB frame arrived corrupted"
        await _within(server.send(got), "send() of a received 64 MiB frame", 6 * STEP_TIMEOUT_S)
        echoed = await _within(client.recv(), "recv() of 64 MiB echo", 6 * STEP_TIMEOUT_S)
        assert hashlib.blake2b(echoed[1]).digest() == digest, "echoed 64 MiB frame corrupted"


async def check_clients_kept_apart(transport: Transport, url: str, clients: int = 3) -> None:
    """Each accepted connection carries exactly one client's messages, and replies reach it."""
    per_client = 20
    listener = await _within(transport.listen(url), f"listen({url!r})")
    conns: list[Connection] = []
    try:
        for _ in range(clients):
            conns.append(await _within(transport.connect(listener.url), "connect()"))
        servers: list[Connection] = []
        for _ in range(clients):
            servers.append(await _accept(listener))
        conns.extend(servers)
        for number, client in enumerate(conns[:clients]):
            for index in range(per_client):
                await _within(client.send([b"client-%d" % number, b"%d" % index]), "send()")
        seen: set[bytes] = set()
        for server in servers:
            origin: bytes | None = None
            for index in range(per_client):
                name, got_index = _as_bytes(await _recv(server, "a client message"))
                origin = origin or name
                assert name == origin, (
                    f"one accepted connection delivered messages of {origin!r} and {name!r}"
                )
                assert got_index == b"%d" % index, f"{name!r} message {index} came as {got_index!r}"
            assert origin is not None and origin not in seen, f"{origin!r} was accepted twice"
            seen.add(origin)
            await _within(server.send([b"reply-to", origin]), "server send()")
        for number, client in enumerate(conns[:clients]):
            reply = _as_bytes(await _recv(client, "a reply"))
            assert reply == [b"reply-to", b"client-%d" % number], (
                f"client-{number} received a reply meant for {reply[1]!r}"
            )
    finally:
        for conn in conns:
            await conn.close()
        await listener.close()


async def _fill_until_blocked(sender: Connection, direction: str) -> int:
    """send_nowait until the queue stays full for a while; return how many were sent."""
    sent = 0
    refusals = 0
    while refusals < 3:
        try:
            sender.send_nowait([_BACKPRESSURE_FRAME])
        except WouldBlockError:
            refusals += 1
            await asyncio.sleep(0.05)  # let the transport move what it can; still full?
            continue
        refusals = 0
        sent += 1
        assert sent <= _BACKPRESSURE_MAX_MESSAGES, (
            f"{direction}: send_nowait() accepted {sent} messages of 1 MiB that the peer did not "
            f"read, with queue_size={_SMALL_QUEUE}: the queue is not bounded"
        )
    return sent


async def _check_backpressure_one_way(
    sender: Connection, receiver: Connection, direction: str
) -> None:
    sent = await _fill_until_blocked(sender, direction)
    # Kernel socket buffers may still take a few messages (TCP autotuning grows them), so a
    # send() may return now and then; what is required is that one eventually waits.
    while True:
        blocked_send = asyncio.ensure_future(sender.send([_BACKPRESSURE_FRAME]))
        await asyncio.wait({blocked_send}, timeout=0.2)
        if not blocked_send.done():
            break
        blocked_send.result()
        sent += 1
        assert sent <= _BACKPRESSURE_MAX_MESSAGES, (
            f"{direction}: send() returned {sent} times although the peer did not read: "
            "it does not wait for a full queue"
        )
    try:
        for index in range(sent + 1):
            frames = await _recv(receiver, f"{direction} queued message {index}")
            assert memoryview(frames[0]).nbytes == len(_BACKPRESSURE_FRAME), (
                f"{direction}: queued message {index} arrived truncated"
            )
        await _within(blocked_send, f"{direction}: send() once the peer read its queue")
    finally:
        blocked_send.cancel()
        with contextlib.suppress(asyncio.CancelledError, TransportClosedError):
            await blocked_send


async def check_backpressure(transport: Transport, url: str) -> None:
    """Queues are bounded: send_nowait raises WouldBlockError, send waits, nothing is lost."""
    small = type(transport)(replace(transport.options, queue_size=_SMALL_QUEUE))
    async with _pair(small, url) as (_, client, server):
        await _check_backpressure_one_way(client, server, "client -> server")
        await _check_backpressure_one_way(server, client, "server -> client")


async def check_statistics(transport: Transport, url: str) -> None:
    """Both ends count messages and payload bytes; statistics() returns a snapshot."""
    to_server: list[list[Buffer]] = [[b"abc"], [b"", b"12345"], [bytes(100_000)]]
    to_client: list[list[Buffer]] = [[b"x" * 10], [b"y" * 20, b"z"]]

    async with _pair(transport, url) as (_, client, server):
        for message in to_server:
            await _within(client.send(message), "client send()")
        for message in to_client:
            await _within(server.send(message), "server send()")
        for _ in to_server:
            await _recv(server, "a client message")
        for _ in to_client:
            await _recv(client, "a server message")
        _assert_counts("client", client, sent=to_server, received=to_client)
        _assert_counts("server", server, sent=to_client, received=to_server)


def _assert_counts(
    name: str, conn: Connection, sent: list[list[Buffer]], received: list[list[Buffer]]
) -> None:
    def nbytes(messages: list[list[Buffer]]) -> int:
        return sum(memoryview(frame).nbytes for message in messages for frame in message)

    stats = conn.statistics()
    expected = (len(sent), len(received), nbytes(sent), nbytes(received))
    actual = (stats.messages_sent, stats.messages_received, stats.bytes_sent, stats.bytes_received)
    assert actual == expected, (
        f"{name} counted (messages sent, received, bytes sent, received) = {actual}, "
        f"expected {expected}"
    )
    stats.messages_sent += 1000
    assert conn.statistics().messages_sent == len(sent), "statistics() is not a snapshot"


async def check_close(transport: Transport, url: str) -> None:
    """Closed ends refuse work; close wakes waiting recv/accept; closing a listener closes all."""
    async with _pair(transport, url) as (listener, client, server):
        waiting_recv = asyncio.ensure_future(client.recv())
        await asyncio.sleep(0.05)
        await _within(client.close(), "close() of a client")
        await _expect_closed(waiting_recv, "a recv() waiting when its connection closed")
        assert client.closed, "closed is False after close()"
        await _expect_closed(client.send([b"x"]), "send() after close()")
        await _expect_closed(client.recv(), "recv() after close()")
        try:
            client.send_nowait([b"x"])
        except TransportClosedError:
            pass
        else:
            raise AssertionError("send_nowait() after close() did not raise TransportClosedError")
        await _within(client.close(), "a second close()")

        waiting_accept = asyncio.ensure_future(listener.accept())
        waiting_server_recv = asyncio.ensure_future(server.recv())
        await asyncio.sleep(0.05)
        await _within(listener.close(), "close() of a listener")
        await _expect_closed(waiting_accept, "an accept() waiting when its listener closed")
        await _expect_closed(listener.accept(), "accept() after the listener closed")
        await _expect_closed(
            waiting_server_recv, "recv() on an accepted connection when its listener closed"
        )
        assert server.closed, "an accepted connection is not closed after its listener closed"
        await _expect_closed(server.send([b"x"]), "send() on a connection of a closed listener")
        await _within(listener.close(), "a second close() of a listener")


async def check_listener_url(transport: Transport, url: str) -> None:
    """``Listener.url`` keeps the scheme, reports a real port for port 0, and is connectable."""
    async with _pair(transport, url) as (listener, client, server):
        scheme = url.partition("://")[0]
        assert listener.url.startswith(f"{scheme}://"), (
            f"listening on {url!r} reported {listener.url!r}, another scheme"
        )
        if url.endswith(":0"):
            assert not listener.url.endswith(":0"), f"{listener.url!r} does not name the real port"
        await _within(client.send([b"ping"]), "send() to Listener.url")
        assert _as_bytes(await _recv(server, "ping")) == [b"ping"], "ping changed in transit"


TRANSPORT_CHECKS: tuple[TransportCheck, ...] = (
    check_round_trip,
    check_zero_length_frames,
    check_message_order,
    check_large_frame,
    check_clients_kept_apart,
    check_backpressure,
    check_statistics,
    check_close,
    check_listener_url,
)


async def check_transport(transport: Transport, url: str) -> None:
    """Run every check of :data:`TRANSPORT_CHECKS` against ``transport`` listening on ``url``.

    Raises
    ------
    AssertionError
        A check failed; the message names the check and what broke.
    """
    for check in TRANSPORT_CHECKS:
        try:
            await check(transport, url)
        except AssertionError as exc:
            raise AssertionError(f"{check.__name__}: {exc}") from exc
