"""CurveZMQ on the ZeroMQ transport: who the ZAP handler admits, and under which name."""

from __future__ import annotations

import asyncio
import threading

import pytest
import zmq
import zmq.asyncio

from fedcell.errors import ConfigError, TransportClosedError
from fedcell.transports.base import TransportOptions
from fedcell.transports.zmq_security import CurveSecurity, curve_keypair, register_listener
from fedcell.transports.zmq_transport import TAG_DATA, ZmqListener, ZmqTransport


def keys() -> tuple[bytes, bytes]:
    return curve_keypair()


def secured(security: CurveSecurity) -> ZmqTransport:
    return ZmqTransport(TransportOptions(security=security))


async def nothing_accepted(listener: ZmqListener, within: float = 0.5) -> bool:
    try:
        await asyncio.wait_for(listener.accept(), within)
    except TimeoutError:
        return True
    return False


def zap_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "fedcell-zap"]


def test_curve_security_checks_its_keys() -> None:
    public, secret = keys()
    other_public, _ = keys()
    with pytest.raises(ConfigError, match="does not belong to the public key"):
        CurveSecurity(other_public, secret)
    with pytest.raises(ConfigError, match="server_key must be a 40-byte Z85"):
        CurveSecurity(public, secret, server_key=b"short")
    assert secret.decode() not in repr(CurveSecurity(public, secret))


@pytest.mark.integration
def test_an_admitted_key_connects_under_its_name_and_others_are_refused() -> None:
    async def main() -> None:
        # Prepare
        server_public, server_secret = keys()
        site_public, site_secret = keys()
        stranger_public, stranger_secret = keys()
        names = {site_public: "site-1"}
        listener = await secured(
            CurveSecurity(server_public, server_secret, authorizer=names.get)
        ).listen("tcp://127.0.0.1:0")
        assert len(zap_threads()) == 1
        site = await secured(
            CurveSecurity(site_public, site_secret, server_key=server_public)
        ).connect(listener.url)
        stranger = await secured(
            CurveSecurity(stranger_public, stranger_secret, server_key=server_public)
        ).connect(listener.url)
        plaintext = await ZmqTransport().connect(listener.url)
        wrong_server = await secured(
            CurveSecurity(site_public, site_secret, server_key=stranger_public)
        ).connect(listener.url)
        try:
            # Execute
            await site.send([b"hello from site-1"])
            accepted = await asyncio.wait_for(listener.accept(), 5)
            first = await accepted.recv()
            for _ in range(250):
                if stranger.closed and plaintext.closed:
                    break
                await asyncio.sleep(0.02)

            # Assert: only the admitted key got through, named by the authorizer
            assert accepted.authenticated_identity == "site-1"
            assert first == [b"hello from site-1"]
            assert await nothing_accepted(listener)
            await accepted.send([b"welcome"])
            assert await asyncio.wait_for(site.recv(), 5) == [b"welcome"]
            # refused ends are closed (libzmq never retries a failed handshake); a client with
            # a wrong server key is only dropped by the server: it keeps trying, unanswered
            assert (stranger.closed, plaintext.closed, wrong_server.closed) == (True, True, False)
            with pytest.raises(TransportClosedError):
                await stranger.send([b"anyone?"])
            assert not site.closed
        finally:
            for conn in (site, stranger, plaintext, wrong_server):
                await conn.close()
            await listener.close()
        assert not zap_threads()  # the last secured listener stopped the ZAP handler

    asyncio.run(main())


@pytest.mark.integration
def test_listeners_keep_their_own_authorizers_and_a_raising_one_refuses() -> None:
    async def main() -> None:
        # Prepare: two listeners in one process (one ZAP handler), each admitting its own key
        a_public, a_secret = keys()
        b_public, b_secret = keys()
        client_public, client_secret = keys()

        def broken(key: bytes) -> str | None:
            raise RuntimeError("authorizer bug")

        listener_a = await secured(
            CurveSecurity(a_public, a_secret, authorizer={client_public: "site-a"}.get)
        ).listen("tcp://127.0.0.1:0")
        listener_b = await secured(CurveSecurity(b_public, b_secret, authorizer=broken)).listen(
            "tcp://127.0.0.1:0"
        )
        to_a = await secured(
            CurveSecurity(client_public, client_secret, server_key=a_public)
        ).connect(listener_a.url)
        to_b = await secured(
            CurveSecurity(client_public, client_secret, server_key=b_public)
        ).connect(listener_b.url)
        try:
            # Execute
            await to_a.send([b"x"])
            await to_b.send([b"x"])
            at_a = await asyncio.wait_for(listener_a.accept(), 5)

            # Assert
            assert at_a.authenticated_identity == "site-a"
            assert await nothing_accepted(listener_b)
        finally:
            await to_a.close()
            await to_b.close()
            await listener_b.close()
            assert len(zap_threads()) == 1  # listener_a still needs it
            await listener_a.close()

    asyncio.run(main())


@pytest.mark.integration
def test_a_routing_identity_taken_over_by_another_user_is_dropped() -> None:
    async def main() -> None:
        # Prepare: site-1 connects; site-2 (admitted too) reuses site-1's routing id
        server_public, server_secret = keys()
        one_public, one_secret = keys()
        two_public, two_secret = keys()
        names = {one_public: "site-1", two_public: "site-2"}
        listener = await secured(
            CurveSecurity(server_public, server_secret, authorizer=names.get)
        ).listen("tcp://127.0.0.1:0")
        one = await secured(
            CurveSecurity(one_public, one_secret, server_key=server_public)
        ).connect(listener.url)
        await one.send([b"from site-1"])
        accepted = await asyncio.wait_for(listener.accept(), 5)
        assert await accepted.recv() == [b"from site-1"]
        ctx = zmq.asyncio.Context.instance()
        impostor = ctx.socket(zmq.DEALER)
        impostor.linger = 0
        impostor.routing_id = one.routing_id
        impostor.curve_secretkey, impostor.curve_publickey = two_secret, two_public
        impostor.curve_serverkey = server_public
        try:
            # Execute
            impostor.connect(listener.url)
            await impostor.send_multipart([TAG_DATA, b"spoofed"])
            for _ in range(100):
                if listener.statistics().messages_dropped:
                    break
                await asyncio.sleep(0.02)

            # Assert
            assert listener.statistics().messages_dropped == 1
            assert accepted.authenticated_identity == "site-1"
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(accepted.recv(), 0.2)
        finally:
            impostor.close(linger=0)
            await one.close()
            await listener.close()

    asyncio.run(main())


@pytest.mark.integration
def test_incomplete_security_is_refused_before_any_socket_stays_open() -> None:
    async def main() -> None:
        public, secret = keys()
        with pytest.raises(ConfigError, match="no authorizer"):
            await secured(CurveSecurity(public, secret)).listen("tcp://127.0.0.1:0")
        with pytest.raises(ConfigError, match="no server_key"):
            await secured(CurveSecurity(public, secret)).connect("tcp://127.0.0.1:9")
        assert not zap_threads()

    asyncio.run(main())


def test_a_secured_listener_socket_fails_closed_without_a_zap_handler() -> None:
    # Prepare
    public, secret = keys()
    sock = zmq.asyncio.Context.instance().socket(zmq.ROUTER)
    try:
        # Execute
        release = register_listener(sock, CurveSecurity(public, secret, authorizer={}.get))
        release()

        # Assert: no handler would mean "refuse", never "admit everyone"
        assert sock.getsockopt(zmq.ZAP_ENFORCE_DOMAIN) == 1
        assert sock.curve_server and sock.zap_domain.startswith(b"fedcell-")
        assert not zap_threads()
    finally:
        sock.close(linger=0)
