"""Cells over the in-process transport: handshake, routing, relay, request/reply, liveness."""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import numpy as np
import pytest

from fedcell.errors import (
    AuthenticationError,
    CellError,
    ConfigError,
    ConnectError,
    NoHandlerError,
    RemoteError,
    RequestTimeoutError,
    RouteLoopError,
    UnreachableError,
)
from fedcell.transports import connect
from fedcell.transports.base import Buffer, Connection
from fedcell.transports.cell import CONTROL_CHANNEL, Cell, CellConfig, Hello
from fedcell.transports.message import Envelope, Message, pack_envelope, to_wire, unpack_envelope

# Short enough for liveness tests, long enough for a shared, loaded machine.
FAST = CellConfig(heartbeat_interval=0.1, peer_timeout=1.0, connect_timeout=5.0)
_urls = itertools.count()


def inproc_url() -> str:
    return f"inproc://cells-{os.getpid()}-{next(_urls)}"


async def echo(message: Message) -> Any:
    return {"payload": message.payload, "route": list(message.envelope.route)}


@asynccontextmanager
async def star(*sites: str, config: CellConfig = FAST) -> AsyncIterator[dict[str, Cell]]:
    """A server and sites connected to it, each answering ``echo``; all stopped at exit."""
    async with AsyncExitStack() as stack:
        server = await stack.enter_async_context(Cell("server", listen=inproc_url(), config=config))
        cells = {"server": server}
        for name in sites:
            cells[name] = await stack.enter_async_context(
                Cell(name, parent=server.url, config=config)
            )
        for cell in cells.values():
            cell.register("echo", echo)
        yield cells


async def until(predicate: Callable[[], bool], timeout: float = 5.0) -> float:
    """Wait until ``predicate()``; return the seconds it took."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)
    return time.monotonic() - start


def hello_frames(name: str) -> list[Buffer]:
    message = Message.create(name, "", CONTROL_CHANNEL, {"name": name, "claims": {}}, topic="hello")
    return to_wire(message)


async def recv_envelope(conn: Connection, skip_pings: bool = True) -> tuple[Envelope, list[Buffer]]:
    while True:
        frames = await asyncio.wait_for(conn.recv(), 2.0)
        envelope = unpack_envelope(frames[0])
        if not (skip_pings and envelope.topic == "ping"):
            return envelope, frames


async def raw_peer(url: str, name: str) -> Connection:
    """A bare transport connection that completed the cell handshake as ``name``."""
    conn = await connect(url)
    await conn.send(hello_frames(name))
    envelope, _ = await recv_envelope(conn)
    assert (envelope.channel, envelope.topic) == (CONTROL_CHANNEL, "welcome")
    return conn


def run(main: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(main())  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------
# routing


def test_request_to_the_parent_and_to_itself() -> None:
    async def main() -> None:
        async with star("site-1") as cells:
            site = cells["site-1"]
            assert await site.request("server", "echo", 1) == {"payload": 1, "route": []}
            assert await site.request("site-1", "echo", 2) == {"payload": 2, "route": []}
            assert site.peers == ("server",) and site.parent == "server"
            assert cells["server"].peers == ("site-1",)

    run(main)


def test_site_to_site_relays_through_the_server_and_records_the_route() -> None:
    async def main() -> None:
        async with star("site-1", "site-2") as cells:
            # Execute
            reply = await cells["site-1"].request("site-2", "echo", np.arange(4.0))

            # Assert
            assert reply["route"] == ["server"]
            np.testing.assert_array_equal(reply["payload"], np.arange(4.0))
            assert cells["server"].statistics().messages_relayed == 2  # request and reply

    run(main)


def test_descendants_are_reached_through_their_ancestor() -> None:
    async def tree() -> None:
        # Prepare: server <- site-1 (listens too) <- site-1.job-7 <- site-1.job-7.trainer
        async with AsyncExitStack() as stack:
            server = await stack.enter_async_context(
                Cell("server", listen=inproc_url(), config=FAST)
            )
            site1 = await stack.enter_async_context(
                Cell("site-1", listen=inproc_url(), parent=server.url, config=FAST)
            )
            site2 = await stack.enter_async_context(Cell("site-2", parent=server.url, config=FAST))
            job = await stack.enter_async_context(
                Cell("site-1.job-7", listen=inproc_url(), parent=site1.url, config=FAST)
            )
            trainer = await stack.enter_async_context(
                Cell("site-1.job-7.trainer", parent=job.url, config=FAST)
            )
            for cell in (trainer, job, site2):
                cell.register("echo", echo)

            # Execute / Assert
            from_server = await server.request("site-1.job-7.trainer", "echo", "a")
            assert from_server["route"] == ["site-1", "site-1.job-7"]
            from_site2 = await site2.request("site-1.job-7", "echo", "b")
            assert from_site2["route"] == ["server", "site-1"]
            upward = await trainer.request("site-2", "echo", "c")
            assert upward["route"] == ["site-1.job-7", "site-1", "server"]
            assert server.peers == ("site-1", "site-2")  # grandchildren are not server peers
            with pytest.raises(UnreachableError, match=r"'site-1\.job-9' is not connected"):
                await site2.request("site-1.job-9", "echo", "d", timeout=10)

    run(tree)


def test_unknown_cell_fails_promptly_at_the_root_and_from_a_site() -> None:
    async def main() -> None:
        async with star("site-1") as cells:
            with pytest.raises(UnreachableError, match="unknown cell 'nobody'"):
                await cells["server"].request("nobody", "echo", timeout=30)
            start = time.monotonic()
            with pytest.raises(UnreachableError, match="unknown cell 'nobody'"):
                await cells["site-1"].request("nobody", "echo", timeout=30)
            assert time.monotonic() - start < 1.0
            with pytest.raises(UnreachableError):
                await cells["server"].send("nobody", "echo", 1)
            before = cells["server"].statistics().messages_dropped
            await cells["site-1"].send("nobody", "echo", 1)  # dropped (and logged) by the server
            await until(lambda: cells["server"].statistics().messages_dropped == before + 1)

    run(main)


def test_a_relay_pointing_back_is_refused_as_a_loop() -> None:
    async def main() -> None:
        async with star("site-1") as cells:
            # Prepare: "bouncer" is a raw peer that sends every message it gets back up,
            # as a misconfigured relay would.
            bouncer = await raw_peer(cells["server"].url, "bouncer")

            async def bounce() -> None:
                envelope, frames = await recv_envelope(bouncer)
                looped = Envelope(
                    sender=envelope.sender,
                    receiver=envelope.receiver,
                    channel=envelope.channel,
                    kind=envelope.kind,
                    msg_id=envelope.msg_id,
                    route=(*envelope.route, "bouncer"),
                    headers=envelope.headers,
                )
                await bouncer.send([pack_envelope(looped), *frames[1:]])

            bouncing = asyncio.create_task(bounce())

            # Execute / Assert
            with pytest.raises(RouteLoopError, match="site-1 → server → bouncer → server"):
                await cells["site-1"].request("bouncer.child", "echo", timeout=5)
            await bouncing
            await bouncer.close()

    run(main)


# ----------------------------------------------------------------------------------------------
# request / reply


def test_handler_errors_timeouts_and_missing_handlers() -> None:
    async def main() -> None:
        async with star("site-1") as cells:
            server = cells["server"]

            async def fail(message: Message) -> None:
                raise ValueError(f"bad value {message.payload}")

            async def slow(message: Message) -> None:
                await asyncio.sleep(10)

            server.register("fail", fail)
            server.register("slow", slow)
            site = cells["site-1"]

            with pytest.raises(RemoteError, match="raised ValueError: bad value 3") as info:
                await site.request("server", "fail", 3)
            assert info.value.remote_type == "ValueError"
            with pytest.raises(RequestTimeoutError, match="no reply from 'server'"):
                await site.request("server", "slow", timeout=0.1)
            with pytest.raises(NoHandlerError, match="no handler for channel 'nope'"):
                await site.request("server", "nope")
            assert site.statistics().requests_timed_out == 1
            assert site.statistics().pending_requests == 0
            assert await site.request("server", "echo", "still fine") == {
                "payload": "still fine",
                "route": [],
            }

    run(main)


def test_topics_select_handlers_with_a_wildcard_fallback() -> None:
    async def main() -> None:
        async with star("site-1") as cells:
            server = cells["server"]

            async def train(message: Message) -> str:
                return "train"

            async def anything(message: Message) -> str:
                return f"any:{message.topic}"

            server.register("task", train, topic="train")
            server.register("task", anything)
            site = cells["site-1"]
            assert await site.request("server", "task", topic="train") == "train"
            assert await site.request("server", "task", topic="eval") == "any:eval"
            with pytest.raises(ConfigError, match="already has a handler"):
                server.register("task", train, topic="train")
            with pytest.raises(ConfigError, match="reserved"):
                server.register("_fc.cell", train)

    run(main)


def test_one_way_messages_reach_the_handler() -> None:
    async def main() -> None:
        async with star("site-1", "site-2") as cells:
            got: asyncio.Queue[Message] = asyncio.Queue()

            async def collect(message: Message) -> None:
                await got.put(message)

            cells["site-2"].register("note", collect)
            await cells["site-1"].send("site-2", "note", {"x": 1}, topic="t")
            message = await asyncio.wait_for(got.get(), 2)
            assert (message.payload, message.topic, message.sender) == ({"x": 1}, "t", "site-1")
            assert message.envelope.route == ("server",)

    run(main)


def test_broadcast_collects_replies_and_per_target_failures() -> None:
    async def main() -> None:
        async with star("site-1", "site-2", "site-3") as cells:
            # Prepare: site-3 goes away, site-2 is too slow
            await cells["site-3"].stop()
            await until(lambda: "site-3" not in cells["server"].peers)

            async def slow(message: Message) -> None:
                await asyncio.sleep(10)

            cells["site-2"].unregister("echo")
            cells["site-2"].register("echo", slow)

            # Execute
            results = await cells["server"].broadcast(
                ["site-1", "site-2", "site-3", "site-1"], "echo", [1, 2], timeout=0.3
            )

            # Assert
            assert list(results) == ["site-1", "site-2", "site-3"]
            assert results["site-1"] == {"payload": [1, 2], "route": []}
            assert isinstance(results["site-2"], RequestTimeoutError)
            assert isinstance(results["site-3"], UnreachableError)
            assert cells["server"].statistics().pending_requests == 0

    run(main)


# ----------------------------------------------------------------------------------------------
# handshake


def test_a_second_cell_with_a_taken_name_is_refused() -> None:
    async def main() -> None:
        async with star("site-1") as cells:
            impostor = Cell("site-1", parent=cells["server"].url, config=FAST)
            with pytest.raises(CellError, match="name 'site-1' is taken by a live cell"):
                await impostor.start()
            assert await cells["site-1"].request("server", "echo", 1) == {
                "payload": 1,
                "route": [],
            }

    run(main)


def test_authenticate_hook_decides_the_name() -> None:
    async def main() -> None:
        def authenticate(hello: Hello) -> str:
            if hello.claims.get("token") != "secret":
                raise AuthenticationError(f"{hello.name} presented no valid token")
            return f"site-{hello.claims['site']}"

        async with Cell(
            "server", listen=inproc_url(), config=FAST, authenticate=authenticate
        ) as server:
            server.register("echo", echo)
            claims = {"token": "secret", "site": 4}
            async with Cell("anything", parent=server.url, config=FAST, claims=claims) as site:
                assert server.peers == ("site-4",)
                assert site.parent == "server"
            rogue = Cell("site-5", parent=server.url, config=FAST, claims={"token": "guess"})
            with pytest.raises(CellError, match="site-5 presented no valid token"):
                await rogue.start()

    run(main)


def test_start_fails_cleanly_when_the_parent_is_absent_or_silent() -> None:
    async def main() -> None:
        with pytest.raises(ConnectError, match="nothing listens"):
            await Cell("site-1", parent=inproc_url(), config=FAST).start()

        from fedcell.transports import listen

        silent = await listen(inproc_url())  # accepts, never answers the hello
        cell = Cell("site-1", parent=silent.url, config=CellConfig(connect_timeout=0.2))
        with pytest.raises(ConnectError, match="did not answer the handshake"):
            await cell.start()
        await silent.close()
        with pytest.raises(CellError, match="stopped, not running"):
            await cell.send("x", "y")

    run(main)


# ----------------------------------------------------------------------------------------------
# liveness


def test_a_silent_peer_is_declared_gone_and_its_requests_fail_at_once() -> None:
    async def main() -> None:
        async with star("site-1") as cells:
            # Prepare: a raw peer that says hello, then never answers or pings
            server = cells["server"]
            events: list[tuple[str, str]] = []
            server.add_peer_listener(lambda name, event: events.append((name, event)))
            mute = await raw_peer(server.url, "mute")
            assert "mute" in server.peers

            # Execute: one direct and one relayed request to it, both with long timeouts
            start = time.monotonic()
            direct = asyncio.create_task(server.request("mute", "echo", timeout=30))
            relayed = asyncio.create_task(cells["site-1"].request("mute", "echo", timeout=30))

            # Assert: both fail with UnreachableError about the peer timeout, not at 30 s
            for task in (direct, relayed):
                with pytest.raises(UnreachableError, match="'mute'"):
                    await task
            assert time.monotonic() - start < FAST.peer_timeout + 1.0
            assert "mute" not in server.peers
            assert events == [("mute", "joined"), ("mute", "left")]
            assert server.statistics().peers_lost == 1
            await mute.close()

    run(main)


def test_site_reconnects_after_the_server_restarts() -> None:
    async def main() -> None:
        url = inproc_url()
        events: list[tuple[str, str]] = []
        async with Cell("server", listen=url, config=FAST) as server:
            server.register("echo", echo)
            site = Cell("site-1", parent=url, config=FAST)
            site.add_peer_listener(lambda name, event: events.append((name, event)))
            await site.start()
            assert await site.request("server", "echo", 1) == {"payload": 1, "route": []}
        # the server is gone
        await until(lambda: site.parent is None)
        with pytest.raises(UnreachableError, match="parent of 'site-1' is not connected"):
            await site.request("server", "echo", 2)
        async with Cell("server", listen=url, config=FAST) as server:
            server.register("echo", echo)
            await until(lambda: site.parent == "server")
            assert await site.request("server", "echo", 3) == {"payload": 3, "route": []}
            await site.stop()
        assert events == [("server", "joined"), ("server", "left"), ("server", "joined")]

    run(main)


def test_a_message_from_an_unknown_connection_is_answered_with_who() -> None:
    async def main() -> None:
        async with star() as cells:
            conn = await connect(cells["server"].url)
            await conn.send(to_wire(Message.create("ghost", "server", "echo", 1, kind="request")))
            envelope, _ = await recv_envelope(conn)
            assert (envelope.channel, envelope.topic) == (CONTROL_CHANNEL, "who")
            assert cells["server"].peers == ()
            await conn.close()

    run(main)


def test_stop_fails_pending_requests_and_tells_peers() -> None:
    async def main() -> None:
        async with star("site-1") as cells:
            never: asyncio.Event = asyncio.Event()

            async def wait_forever(message: Message) -> None:
                await never.wait()

            cells["server"].register("hang", wait_forever)
            site = cells["site-1"]
            pending = asyncio.create_task(site.request("server", "hang", timeout=30))
            await until(lambda: site.statistics().pending_requests == 1)
            await site.stop()
            with pytest.raises(CellError, match="stopped"):
                await pending
            await until(lambda: cells["server"].peers == ())

    run(main)


# ----------------------------------------------------------------------------------------------
# bad input


def test_malformed_frames_are_counted_and_the_cell_keeps_serving() -> None:
    async def main() -> None:
        async with star("site-1") as cells:
            server = cells["server"]
            raw = await raw_peer(server.url, "raw")
            good_envelope = pack_envelope(
                Envelope(sender="raw", receiver="server", channel="echo", kind="request")
            )
            garbage: list[list[Buffer]] = [
                [],  # no frames at all
                [b"\xc1garbage"],  # not msgpack
                [b"\x93\x01\x02\x03"],  # msgpack, not an envelope map
                [b"x" * (70 * 1024), b""],  # oversized envelope
                [good_envelope, b"\xc1"],  # payload tree that does not decode
                [good_envelope],  # payload frame missing
            ]

            # Execute
            for frames in garbage:
                await raw.send(frames)

            # Assert: counted, the raw peer gets error replies for its broken requests,
            # and every peer (the offender included) is still served
            await until(lambda: server.statistics().malformed_frames == len(garbage))
            for _ in range(2):
                envelope, frames = await recv_envelope(raw)
                assert envelope.kind == "error"
            assert await cells["site-1"].request("server", "echo", 1) == {
                "payload": 1,
                "route": [],
            }
            await raw.send(to_wire(Message.create("raw", "server", "echo", 5, kind="request")))
            envelope, frames = await recv_envelope(raw)
            assert envelope.kind == "reply"
            assert "raw" in server.peers
            await raw.close()

    run(main)


def test_spoofed_sender_is_dropped() -> None:
    async def main() -> None:
        async with star("site-1") as cells:
            got: list[Message] = []

            async def collect(message: Message) -> None:
                got.append(message)

            cells["site-1"].register("note", collect)
            raw = await raw_peer(cells["server"].url, "raw")
            await raw.send(to_wire(Message.create("site-2", "site-1", "note", "forged")))
            await raw.send(to_wire(Message.create("raw", "site-1", "note", "honest")))
            await until(lambda: len(got) == 1)
            assert got[0].payload == "honest"
            assert cells["server"].statistics().messages_dropped == 1
            await raw.close()

    run(main)


def test_a_handler_may_stop_its_own_cell() -> None:
    async def main() -> None:
        async with star("site-1") as cells:
            site = cells["site-1"]
            stopped = asyncio.Event()

            async def shutdown(message: Message) -> None:
                await site.stop()
                stopped.set()

            site.register("shutdown", shutdown)
            await cells["server"].send("site-1", "shutdown")
            await asyncio.wait_for(stopped.wait(), 2)
            await until(lambda: cells["server"].peers == ())

    run(main)


def test_a_parent_that_does_not_know_the_child_gets_a_new_hello() -> None:
    async def main() -> None:
        # Prepare: a raw listener plays a parent that restarted and lost its state
        from fedcell.transports import listen

        parent = await listen(inproc_url())
        site = Cell("site-1", parent=parent.url, config=FAST)
        events: list[tuple[str, str]] = []
        site.add_peer_listener(lambda name, event: events.append((name, event)))
        starting = asyncio.create_task(site.start())
        conn = await parent.accept()

        def control(topic: str, payload: Any = None) -> list[Buffer]:
            return to_wire(
                Message.create("server", "site-1", CONTROL_CHANNEL, payload, topic=topic)
            )

        envelope, _ = await recv_envelope(conn)
        assert envelope.topic == "hello"
        await conn.send(control("welcome", {"name": "server"}))
        await starting

        # Execute
        await conn.send(control("who"))
        envelope, _ = await recv_envelope(conn)

        # Assert: the child dropped the parent, said hello again, and is back once welcomed
        assert envelope.topic == "hello" and site.parent is None
        await conn.send(control("welcome", {"name": "server"}))
        await until(lambda: site.parent == "server")
        assert events == [("server", "joined"), ("server", "left"), ("server", "joined")]
        await site.stop()
        await parent.close()

    run(main)


def test_broadcast_replies_arrive_in_completion_order_and_release_the_cell() -> None:
    async def main() -> None:
        async with star("site-1", "site-2", "site-3") as cells:
            # Prepare: site-1 answers after site-2 and site-3
            async def late(message: Message) -> str:
                await asyncio.sleep(0.2)
                return "late"

            cells["site-1"].unregister("echo")
            cells["site-1"].register("echo", late)
            server = cells["server"]

            # Execute
            order = [
                name
                async for name, _ in server.broadcast_replies(
                    ["site-1", "site-2", "nobody", "site-3"], "echo", 1, timeout=5
                )
            ]

            # Assert
            assert order[0] == "nobody" and order[-1] == "site-1"
            assert set(order[1:3]) == {"site-2", "site-3"}
            replies = server.broadcast_replies(["site-1", "site-2"], "echo", 2, timeout=5)
            first = await anext(replies)
            assert first[0] == "site-2"
            await replies.aclose()  # stop early: nothing stays pending
            assert server.statistics().pending_requests == 0

    run(main)


def test_a_direct_link_bypasses_the_server_and_falls_back_to_it_when_lost() -> None:
    async def main() -> None:
        async with AsyncExitStack() as stack:
            # Prepare: site-1 also listens; site-2 opens a direct link to it
            server = await stack.enter_async_context(
                Cell("server", listen=inproc_url(), config=FAST)
            )
            site1 = await stack.enter_async_context(
                Cell("site-1", listen=inproc_url(), parent=server.url, config=FAST)
            )
            site2 = await stack.enter_async_context(Cell("site-2", parent=server.url, config=FAST))
            for cell in (site1, site2):
                cell.register("echo", echo)

            # Execute / Assert: direct both ways
            assert await site2.connect(site1.url) == "site-1"
            assert site2.peers == ("server", "site-1") and "site-2" in site1.peers
            assert (await site2.request("site-1", "echo", 1))["route"] == []
            assert (await site1.request("site-2", "echo", 2))["route"] == []
            with pytest.raises(CellError, match="taken by a live cell"):
                await site2.connect(site1.url)

            # the direct link goes away: traffic relays through the server again
            await site1.stop()
            site1 = await stack.enter_async_context(Cell("site-1", parent=server.url, config=FAST))
            site1.register("echo", echo)
            assert (await site2.request("site-1", "echo", 3))["route"] == ["server"]

    run(main)


def test_many_concurrent_requests_each_get_their_own_reply() -> None:
    async def main() -> None:
        async with star("site-1", "site-2", "site-3") as cells:
            # Prepare: handlers that finish out of order
            async def jittered(message: Message) -> Any:
                await asyncio.sleep((message.payload * 7919 % 13) / 1000)
                return message.payload

            for name in ("site-2", "site-3"):
                cells[name].register("jitter", jittered)
            site = cells["site-1"]

            # Execute
            requests = [
                site.request(f"site-{2 + i % 2}", "jitter", i, timeout=10) for i in range(600)
            ]
            replies = await asyncio.gather(*requests)

            # Assert
            assert replies == list(range(600))
            assert site.statistics().pending_requests == 0
            await until(lambda: cells["server"].statistics().relayed_requests == 0)

    run(main)
