"""ZeroMQ transport: ``tcp://host:port`` and ``ipc:///path``.

Design
------
A listener binds one ``ROUTER`` socket. Every connecting peer is a ``DEALER`` with a random
``ROUTING_ID``; the ROUTER prefixes each incoming message with that identity, and the listener
keeps one :class:`Connection` per identity. ZeroMQ reconnects by itself, so a peer is an
*identity*, not a TCP session: when a listener restarts on the same address, the client's
``Connection`` object survives and the new listener sees the same identity again.

Wire format (version 1), after ZeroMQ's own framing::

    client -> listener   [tag, *frames]            (the ROUTER adds [identity] in front)
    listener -> client   [identity, tag, *frames]  (the ROUTER strips [identity])

``tag`` is one byte: ``0x01`` for application data, ``0x02`` for the transport-level *hello*.
The tag frame lets a message carry any frames, zero-length ones and zero frames included, and
keeps transport control apart from data. A client sends a hello right after ``connect`` (so it is
the first message in its pipe) and again after every successful ZMTP handshake (seen through the
socket monitor), so ``Listener.accept()`` yields the peer at once, even on a freshly restarted
listener, before the peer sends any data. A data message from an unknown identity is accepted
too (after a reconnect, messages queued in the client's pipe may overtake the new hello).
Hellos never reach ``recv()``. Anything else (no tag, unknown tag: garbage from a foreign
socket, another protocol version) is dropped, counted in :meth:`ZmqListener.statistics` and
logged; the listener keeps serving the other peers.

Receiving. One task per socket reads it: the listener's *demultiplexer* reads the ROUTER and
feeds each connection's bounded ``asyncio.Queue`` (``queue_size`` messages); a client's reader
task does the same for its DEALER. When a connection's queue is full, its reader stops reading,
ZeroMQ's receive high-water mark fills, and the sender's ``send`` waits: backpressure reaches the
sender. On a listener this is head-of-line blocking: a connection whose owner stops calling
``recv`` stalls the listener's other connections once its queue is full (logged every 10 s,
naming the connection). The cell layer keeps one reader per connection, so queues drain. Frames smaller than ``copy_threshold`` are returned
as ``bytes``; larger ones as a read-only ``memoryview`` of the ZeroMQ frame (no copy; read-only
like the in-process transport's frames, so a received frame can be relayed without a wait).

Sending. Small frames are copied into ZeroMQ messages; frames of at least ``copy_threshold`` bytes
are sent without copying. ZeroMQ reads a zero-copy buffer after ``send`` has handed it over (its
I/O thread writes it to the kernel later). A read-only buffer (``bytes``, a read-only
``memoryview``) is taken as the caller's promise that it stays unchanged until the peer has it, the
promise the in-process transport relies on for every frame: it travels without a wait. A writable
buffer is not: to keep the contract that a caller may reuse it once ``send`` returns, ``send``
tracks it and returns only when ZeroMQ has released it. pyzmq signals the release through a
``threading.Event``, so the wait runs in the loop's default executor: one thread per send whose
peer is slow to drain (a peer that stops reading holds a thread until it reads, disconnects or this
connection closes). The wait costs throughput on fast links (it empties ZeroMQ's pipe between
messages: about 0.6-0.8x of untracked sends over ipc on a busy 2-core machine), so bulk senders
that keep their buffers unchanged (the stream layer, which also checksums every chunk) pass
read-only views. ``send_nowait`` cannot wait, so it copies writable frames above the threshold.
``send`` first tries a non-blocking send; when the peer's pipe is full it waits for the socket to
become writable (``POLLOUT``, re-checked every 100 ms: a ROUTER pipe whose peer left never becomes
writable, only a retried send reports it) rather than spinning. On a ROUTER, ``POLLOUT`` means
*some* peer is writable, so when it is set but this peer's pipe is still full, ``send`` sleeps with
a short exponential backoff (0.5 ms doubling to 20 ms) before retrying. The fast paths call the
socket through a blocking-API view; ZeroMQ's fd is edge-triggered, so after each such call pyzmq's
asyncio wrapper is told to re-check the socket (:func:`_rearm`), or a waiting reader could sleep
through a message that already arrived.

Throughput. Large frames never get copied, and per message the transport costs a few microseconds
of Python over pyzmq: it moves 4 MiB messages at 0.9-1.0x the speed of raw pyzmq DEALER/ROUTER
sockets sending the same ``[tag, data]`` messages. Multipart itself has a price: with this libzmq
build (no DRAFT batch-size options) a small frame next to a 4 MiB frame (``[tag, data]``,
``[header, data]``, small frame first or last alike) moves at about 0.6x of single-frame PUSH/PULL
over ipc and 0.6-0.9x over tcp loopback on a busy 2-core machine (``benchmarks/transport.py``; the
1-byte tag adds little to a header frame). Reaching single-frame speed needs bulk frames sent as
messages of their own by the layer above, and a tag-free encoding of such messages here.

Socket options: ``LINGER 0`` (close never blocks), ``SNDHWM``/``RCVHWM`` = ``queue_size``,
``ROUTER_MANDATORY`` (a send to a vanished identity raises
:class:`~fedcell.errors.ConnectError` and a full peer raises ``EAGAIN``, instead of silent drops),
``ROUTER_HANDOVER`` (a reconnecting identity takes over its stale session), ``RECONNECT_IVL``
100 ms with backoff to ``RECONNECT_IVL_MAX`` 5 s, ``IPV6`` on (``tcp://[::1]:port`` works). All
sockets belong to one process-wide :class:`zmq.asyncio.Context`; a connection must be used on the
event loop that created it.

State. A client connection reports ``"connected"`` on each successful handshake and
``"disconnected"`` when the link drops (socket monitor). A ROUTER cannot tell which identity a
dropped TCP session belonged to, so accepted connections report no state: the cell layer's
heartbeats detect lost peers. Closing an accepted connection forgets its identity; if that peer
sends again, it is accepted as a new connection.

Security. With :attr:`TransportOptions.security <fedcell.transports.base.TransportOptions>` set,
every socket speaks CurveZMQ (see :mod:`fedcell.transports.zmq_security`): a client must know the
listener's public key, and a listener admits only the client keys its authorizer names. The name
arrives on every message as the ZAP ``User-Id``; the first message of an identity fixes its
connection's :attr:`~fedcell.transports.base.Connection.authenticated_identity`, and a later
message under that routing identity from another user (a peer taking the identity over with
``ROUTER_HANDOVER``) is dropped. A client whose handshake is refused (a key the listener does
not admit, plaintext against a secured listener) logs it and closes: libzmq terminates the
session after a failed handshake and never retries it, so ``send``/``recv`` raise
:class:`~fedcell.errors.TransportClosedError` instead of waiting forever. A client holding a
wrong server key cannot tell: the listener just drops its undecryptable hello, the client
reconnects and is never answered (the cell layer's handshake timeout reports it).

Addresses. ``tcp://127.0.0.1:0`` binds an ephemeral port and ``Listener.url`` reports the real one;
``ipc://`` paths longer than the OS limit (``zmq.IPC_PATH_MAX_LEN``) raise
:class:`~fedcell.errors.ConfigError` naming the path; an ipc path on which a process still listens
raises :class:`~fedcell.errors.ConnectError`, as a tcp port in use does (libzmq would silently take
the path over), while a stale socket file left by a crashed process is replaced. Every
``zmq.ZMQError`` is mapped to the fedcell error tree.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import errno
import itertools
import logging
import os
import socket
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from fedcell.errors import (
    ConfigError,
    ConnectError,
    FedcellError,
    TransportClosedError,
    TransportError,
    WouldBlockError,
)
from fedcell.transports.base import (
    Buffer,
    Connection,
    ConnectionState,
    Listener,
    Transport,
    TransportOptions,
)
from fedcell.transports.zmq_security import (
    apply_client_security,
    authenticated_user,
    register_listener,
)

__all__ = ["ListenerStats", "ZmqListener", "ZmqTransport"]

logger = logging.getLogger(__name__)

TAG_DATA: Final = b"\x01"
TAG_HELLO: Final = b"\x02"
RECONNECT_IVL_MS: Final = 100
RECONNECT_IVL_MAX_MS: Final = 5000
_BACKOFF_START_S: Final = 0.0005
_BACKOFF_MAX_S: Final = 0.02
_WRITABLE_RECHECK_MS: Final = 100
_RELEASE_POLL_S: Final = 0.5
_DROP_LOG_INTERVAL_S: Final = 1.0
_STALL_WARN_S: Final = 10.0
_HANDSHAKE_FAILED: Final = zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
_MONITOR_EVENTS: Final = zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED | _HANDSHAKE_FAILED

_monitor_ids = itertools.count(1)


def _context() -> zmq.asyncio.Context:
    # Context.instance() is process-wide and recreated after fork.
    return zmq.asyncio.Context.instance()


def _map_zmq_error(exc: zmq.ZMQError, action: str) -> FedcellError:
    """Translate a pyzmq error raised while doing ``action`` into the fedcell tree."""
    code = exc.errno
    detail = f"{action}: {exc.strerror} (errno {code})"
    if isinstance(exc, zmq.Again):
        return WouldBlockError(detail)
    if code in (zmq.EINVAL, zmq.EPROTONOSUPPORT, zmq.ENOCOMPATPROTO, errno.ENODEV):
        return ConfigError(detail)
    if code in (zmq.EADDRINUSE, zmq.EADDRNOTAVAIL, zmq.EHOSTUNREACH, zmq.ECONNREFUSED):
        return ConnectError(detail)
    if code in (zmq.ENOTSOCK, zmq.ETERM):
        return TransportClosedError(detail)
    return TransportError(detail)


def _check_address(url: str) -> None:
    scheme, sep, address = url.partition("://")
    if not sep or scheme not in ZmqTransport.schemes:
        raise ConfigError(f"{url!r} is not a ZeroMQ URL (expected tcp://host:port or ipc://path)")
    if not address:
        raise ConfigError(f"{url!r} has no address")
    if scheme == "ipc" and address != "*" and len(os.fsencode(address)) > zmq.IPC_PATH_MAX_LEN:
        raise ConfigError(
            f"ipc path {address!r} is {len(os.fsencode(address))} bytes, longer than the OS "
            f"limit of {zmq.IPC_PATH_MAX_LEN}; use a shorter path"
        )


def _refuse_live_ipc_path(url: str) -> None:
    """Raise ``ConnectError`` if a process still listens on ``url``'s ipc path.

    libzmq unlinks whatever file is at the path and binds anew, so a second listener would
    silently take the address from a live one (whose peers then reach the newcomer). A stale
    file left by a crashed process refuses connections and is fair game.
    """
    path = url[len("ipc://") :]
    if path == "*" or path.startswith("@") or not os.path.exists(path):  # @: abstract namespace
        return
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except OSError:
            return
    raise ConnectError(f"listen on {url}: another socket is listening on {path}")


def _reported_url(requested: str, last_endpoint: str) -> str:
    """The URL peers connect to: the requested host with the port the OS picked.

    ZeroMQ reports an IPv6 socket's IPv4 address as ``[::ffff:127.0.0.1]``; keep the caller's
    spelling of the host instead, unless it was a wildcard.
    """
    if not requested.startswith("tcp://"):
        return last_endpoint  # ipc: the path, with ``ipc://*`` resolved
    host = requested[len("tcp://") :].rpartition(":")[0]
    if host in ("*", ""):
        return last_endpoint
    return f"tcp://{host}:{last_endpoint.rpartition(':')[2]}"


def _new_socket(socket_type: int, options: TransportOptions) -> zmq.asyncio.Socket:
    sock = _context().socket(socket_type)
    sock.linger = 0
    sock.sndhwm = options.queue_size
    sock.rcvhwm = options.queue_size
    sock.ipv6 = True
    return sock


def _to_received(frames: list[zmq.Frame], copy_threshold: int) -> list[Buffer]:
    return [f.bytes if len(f) < copy_threshold else f.buffer.toreadonly() for f in frames]


def _sync_view(sock: zmq.asyncio.Socket) -> zmq.Socket[bytes]:
    """A blocking-API view of ``sock`` (not owning it) for non-blocking fast-path calls.

    Every call through it must be followed by :func:`_rearm` on ``sock``.
    """
    return zmq.Socket.shadow(sock.underlying)


def _rearm(sock: zmq.asyncio.Socket) -> None:
    """Let pyzmq's asyncio wrapper re-check ``sock`` after a call through its sync view.

    ZeroMQ's socket fd is edge-triggered: a send or poll made outside the wrapper can consume
    the edge that would have woken a pending ``recv``, which then sleeps forever while messages
    wait (seen as a peer going silent after its first exchange). pyzmq re-checks after its own
    operations; this does the same after ours.
    """
    sock._schedule_remaining_events()  # type: ignore[operator]  # private, see docstring


async def _next_message(sock: zmq.asyncio.Socket, sync: zmq.Socket[bytes]) -> list[zmq.Frame]:
    """The next message of ``sock``: a non-blocking read first (no future for a queued message,
    the common case in a burst), else an asyncio wait."""
    try:
        return sync.recv_multipart(zmq.NOBLOCK, copy=False)
    except zmq.Again:
        pass
    finally:
        _rearm(sock)
    return await sock.recv_multipart(copy=False)


class _Mailbox:
    """A bounded FIFO between one reader task and ``recv`` callers.

    Like ``asyncio.Queue`` plus a ``close`` that wakes every waiting ``get`` (which then raises)
    and every waiting ``put`` (which then discards its item): a reader blocked on a full mailbox
    must not hang once the application closes the connection (``Queue.shutdown`` is 3.13+).
    """

    def __init__(self, maxsize: int, name: str) -> None:
        self._items: deque[list[Buffer]] = deque()
        self._maxsize = max(1, maxsize)
        self._name = name
        self._getters: list[asyncio.Future[None]] = []
        self._putters: list[asyncio.Future[None]] = []
        self.closed = False

    def offer(self, item: list[Buffer]) -> bool:
        """Append ``item`` if there is room (or drop it if closed); False if full."""
        if len(self._items) >= self._maxsize and not self.closed:
            return False
        if not self.closed:
            self._items.append(item)
            _wake_all(self._getters)
        return True

    def __len__(self) -> int:
        return len(self._items)

    async def put(self, item: list[Buffer]) -> None:
        while len(self._items) >= self._maxsize and not self.closed:
            await self._wait(self._putters)
        if not self.closed:
            self._items.append(item)
            _wake_all(self._getters)

    async def get(self) -> list[Buffer]:
        while not self._items:
            if self.closed:
                raise TransportClosedError(f"connection to {self._name} is closed")
            await self._wait(self._getters)
        item = self._items.popleft()
        _wake_all(self._putters)
        return item

    def close(self) -> None:
        self.closed = True
        self._items.clear()
        _wake_all(self._getters)
        _wake_all(self._putters)

    @staticmethod
    async def _wait(waiters: list[asyncio.Future[None]]) -> None:
        waiter = asyncio.get_running_loop().create_future()
        waiters.append(waiter)
        try:
            await waiter
        finally:
            if waiter in waiters:
                waiters.remove(waiter)


def _wake_all(waiters: list[asyncio.Future[None]]) -> None:
    for waiter in waiters:
        if not waiter.done():
            waiter.set_result(None)
    waiters.clear()


def _wait_released(trackers: list[zmq.MessageTracker], connection: ZmqConnection) -> None:
    """Block (in an executor thread) until ZeroMQ released every tracked buffer.

    Gives up once the connection is closed: closing a socket with LINGER 0 drops and releases
    its queued messages, and a closed connection has no sender left to protect.
    """
    for tracker in trackers:
        while not connection.closed:
            try:
                tracker.wait(_RELEASE_POLL_S)
                break
            except zmq.NotDone:
                continue


class ZmqConnection(Connection):
    """What both ends share: the mailbox, the two send paths and close bookkeeping."""

    def __init__(self, peer: str, options: TransportOptions) -> None:
        super().__init__()
        self.peer = peer
        self._options = options
        self._inbox = _Mailbox(options.queue_size, peer)
        # Futures of sends waiting for POLLOUT; close fails them so the senders wake up.
        self._send_waiters: set[asyncio.Future[Any]] = set()

    @abc.abstractmethod
    def _sockets(self) -> tuple[zmq.asyncio.Socket, zmq.Socket[bytes]]:
        """The socket this end sends on, as (asyncio socket, blocking view of it)."""

    @abc.abstractmethod
    def _envelope(self) -> list[Buffer]:
        """Frames that go in front of the tag (the peer identity on a ROUTER)."""

    def _send_error(self, exc: zmq.ZMQError) -> FedcellError:
        return _map_zmq_error(exc, f"send to {self.peer}")

    @property
    def closed(self) -> bool:
        return self._inbox.closed

    def _check_open(self) -> None:
        if self._inbox.closed:
            raise TransportClosedError(f"connection to {self.peer} is closed")

    def _parts(
        self, frames: Sequence[Buffer], *, track: bool
    ) -> tuple[list[Buffer | zmq.Frame], list[zmq.MessageTracker]]:
        threshold = self._options.copy_threshold
        parts: list[Buffer | zmq.Frame] = [*self._envelope(), TAG_DATA]
        trackers: list[zmq.MessageTracker] = []
        for frame in frames:
            view = memoryview(frame)
            if view.nbytes < threshold:
                parts.append(frame)  # copied by send_multipart (below the socket's threshold)
            elif view.readonly:  # the caller promises it stays unchanged (module docstring)
                parts.append(zmq.Frame(frame, copy=False))
            elif track:
                zframe = zmq.Frame(frame, copy=False, track=True)
                trackers.append(zframe.tracker)
                parts.append(zframe)
            else:
                parts.append(zmq.Frame(view.tobytes(), copy=False))
        return parts, trackers

    async def send(self, frames: Sequence[Buffer]) -> None:
        """Send one message; wait while the peer's pipe is full.

        Returns once the caller may reuse the frames (ZeroMQ released every writable frame it
        sends without copying; read-only frames are promised unchanged and not waited for).

        Raises
        ------
        TransportClosedError
            This connection is closed, or closes while ``send`` waits.
        ConnectError
            (accepted connections) The peer's identity is not connected to the listener.
        """
        self._check_open()
        parts, trackers = self._parts(frames, track=True)
        sock, sync = self._sockets()
        backoff = _BACKOFF_START_S
        while True:
            try:
                sync.send_multipart(parts, flags=zmq.NOBLOCK)
                break
            except zmq.Again:
                pass
            except zmq.ZMQError as exc:
                raise self._send_error(exc) from exc
            finally:
                _rearm(sock)
            writable = sync.poll(0, zmq.POLLOUT)
            _rearm(sock)
            if writable:
                # Another pipe of this ROUTER is writable, not ours: retry after a backoff.
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _BACKOFF_MAX_S)
            else:
                await self._wait_writable(sock)
            self._check_open()  # and retry: raises if the peer left a ROUTER meanwhile
        # Our zmq.Frame objects hold a reference to their content too: ZeroMQ releases a
        # buffer only once they are gone as well.
        del parts
        self._count_sent(frames)
        if trackers and not all(t.done for t in trackers):
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, _wait_released, trackers, self)

    async def _wait_writable(self, sock: zmq.asyncio.Socket) -> None:
        """Wait until ``sock`` is writable, or at most ``_WRITABLE_RECHECK_MS``.

        Bounded because a ROUTER pipe that vanishes (the peer left) never becomes writable:
        only a retried send tells, with ``EHOSTUNREACH``.
        """
        # pyzmq's stub of the asyncio poll lacks the ``flags`` argument it accepts.
        poll = sock.poll(_WRITABLE_RECHECK_MS, zmq.POLLOUT)  # type: ignore[call-arg]
        waiter = asyncio.ensure_future(poll)
        self._send_waiters.add(waiter)
        try:
            await waiter
        finally:
            self._send_waiters.discard(waiter)

    def send_nowait(self, frames: Sequence[Buffer]) -> None:
        """Send one message now; writable frames above ``copy_threshold`` are copied.

        Raises
        ------
        WouldBlockError
            The peer's pipe is full (``queue_size`` messages).
        TransportClosedError
            This connection is closed.
        ConnectError
            (accepted connections) The peer's identity is not connected to the listener.
        """
        self._check_open()
        parts, _ = self._parts(frames, track=False)
        sock, sync = self._sockets()
        try:
            sync.send_multipart(parts, flags=zmq.NOBLOCK)
        except zmq.Again as exc:
            raise WouldBlockError(
                f"send queue to {self.peer} is full ({self._options.queue_size} messages)"
            ) from exc
        except zmq.ZMQError as exc:
            raise self._send_error(exc) from exc
        finally:
            _rearm(sock)
        self._count_sent(frames)

    async def _deliver(self, frames: list[Buffer], stalls: str) -> None:
        """Queue a received message; while the queue is full, wait and warn every 10 s.

        ``stalls`` names who else waits meanwhile (the reader stops reading its socket).
        """
        if self._inbox.offer(frames):
            return
        put = asyncio.ensure_future(self._inbox.put(frames))
        try:
            waited = 0.0
            while not (await asyncio.wait({put}, timeout=_STALL_WARN_S))[0]:
                waited += _STALL_WARN_S
                logger.warning(
                    "%s: %d received messages unread for %.0f s; %s wait",
                    self.peer, len(self._inbox), waited, stalls,
                )  # fmt: skip
        finally:
            put.cancel()

    async def recv(self) -> list[Buffer]:
        """Receive the next message's frames.

        Raises
        ------
        TransportClosedError
            This connection is closed, or closes while ``recv`` waits.
        """
        frames = await self._inbox.get()
        self._count_received(frames)
        return frames

    def _mark_closed(self) -> None:
        """Drop undelivered messages and wake every waiting ``recv`` and ``send``."""
        self._inbox.close()
        for waiter in self._send_waiters:
            if not waiter.done():
                waiter.set_exception(TransportClosedError(f"connection to {self.peer} is closed"))


class ZmqClientConnection(ZmqConnection):
    """The connecting end: a DEALER, its reader task and its socket monitor."""

    def __init__(self, url: str, options: TransportOptions) -> None:
        super().__init__(url, options)
        self.routing_id = b"fc-" + os.urandom(12).hex().encode()
        self._dealer = _new_socket(zmq.DEALER, options)
        self._sync = _sync_view(self._dealer)
        self._monitor: zmq.asyncio.Socket | None = None
        self._released = False
        try:
            self._dealer.routing_id = self.routing_id
            self._dealer.reconnect_ivl = RECONNECT_IVL_MS
            self._dealer.reconnect_ivl_max = RECONNECT_IVL_MAX_MS
            if options.security is not None:
                apply_client_security(self._dealer, options.security, url)
            self._monitor = self._dealer.get_monitor_socket(
                _MONITOR_EVENTS, f"inproc://fedcell-zmq-monitor-{os.getpid()}-{next(_monitor_ids)}"
            )
            self._dealer.connect(url)
            # The first message in the pipe, so it reaches the listener before any data. Its pipe
            # may already be gone (a secured listener refused this key within microseconds):
            # then the monitor's hello after the next successful handshake announces it.
            with contextlib.suppress(zmq.Again):
                self._sync.send(TAG_HELLO, flags=zmq.NOBLOCK)
            _rearm(self._dealer)
        except (zmq.ZMQError, ConfigError) as exc:
            self._close_sockets()
            if isinstance(exc, ConfigError):
                raise
            raise _map_zmq_error(exc, f"connect to {url}") from exc
        self._tasks = (
            asyncio.create_task(self._read_loop(), name=f"fedcell-zmq-reader {url}"),
            asyncio.create_task(self._monitor_loop(), name=f"fedcell-zmq-monitor {url}"),
        )

    def _sockets(self) -> tuple[zmq.asyncio.Socket, zmq.Socket[bytes]]:
        return self._dealer, self._sync

    def _envelope(self) -> list[Buffer]:
        return []

    async def _read_loop(self) -> None:
        threshold = self._options.copy_threshold
        try:
            while True:
                message = await _next_message(self._dealer, self._sync)
                if message[0].bytes != TAG_DATA:
                    logger.warning("dropped a message without a data tag from %s", self.peer)
                    continue
                await self._deliver(_to_received(message[1:], threshold), "later messages")
        except zmq.ZMQError as exc:
            logger.error("receiving from %s failed, closing the connection: %s", self.peer, exc)
            self._mark_closed()

    async def _monitor_loop(self) -> None:
        assert self._monitor is not None
        while True:
            try:
                event = parse_monitor_message(await self._monitor.recv_multipart())
            except zmq.ZMQError as exc:  # the context is terminating: no more state reports
                logger.error("monitoring %s failed, state reports stop: %s", self.peer, exc)
                return
            if event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                # Announce this identity to a (possibly restarted) listener at once.
                with contextlib.suppress(zmq.Again):
                    self._sync.send(TAG_HELLO, flags=zmq.NOBLOCK)
                _rearm(self._dealer)
                self._notify_state_safely("connected")
            elif event["event"] == zmq.EVENT_DISCONNECTED:
                self._notify_state_safely("disconnected")
            elif event["event"] & _HANDSHAKE_FAILED:
                logger.error(
                    "secure handshake with %s failed (%s, code %s): wrong server key, or the "
                    "server does not admit this key; closing the connection", self.peer,
                    "refused" if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH else "protocol",
                    event["value"],
                )  # fmt: skip
                self._mark_closed()  # libzmq never retries a failed handshake
                return

    def _notify_state_safely(self, state: ConnectionState) -> None:
        # One failing listener must neither stop the others nor kill the monitor task.
        for listener in list(self._state_listeners):
            try:
                listener(state)
            except Exception:
                logger.exception("a state listener of %s raised on %r", self.peer, state)

    def _close_sockets(self) -> None:
        if self._monitor is not None:
            with contextlib.suppress(zmq.ZMQError):
                self._dealer.disable_monitor()
            self._monitor.close(linger=0)
            self._monitor = None
        self._dealer.close(linger=0)

    async def close(self) -> None:
        """Close the DEALER, its monitor and tasks; waiting calls raise. Idempotent."""
        # Not `self.closed`: a refused handshake or a receive error marks the connection closed
        # before the application closes it, and its sockets must still be released here.
        if self._released:
            return
        self._released = True
        self._mark_closed()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._close_sockets()


class ZmqServerConnection(ZmqConnection):
    """The listener's end for one peer identity; sends through the listener's ROUTER."""

    def __init__(self, listener: ZmqListener, identity: bytes, options: TransportOptions):
        super().__init__(f"{listener.url} peer {identity!r}", options)
        self.identity = identity
        self._listener = listener

    def _sockets(self) -> tuple[zmq.asyncio.Socket, zmq.Socket[bytes]]:
        return self._listener._router, self._listener._router_sync

    def _envelope(self) -> list[Buffer]:
        return [self.identity]

    def _send_error(self, exc: zmq.ZMQError) -> FedcellError:
        if exc.errno == zmq.EHOSTUNREACH:
            return ConnectError(f"{self.peer} is not connected to the listener (it may reconnect)")
        return super()._send_error(exc)

    async def close(self) -> None:
        """Forget this peer identity; waiting calls raise. Idempotent."""
        self._mark_closed()
        self._listener._forget(self)


@dataclass(frozen=True, slots=True)
class ListenerStats:
    """Counters of one listener.

    Attributes
    ----------
    connections_accepted:
        Peer identities seen since the listener started (each became a connection).
    connections_open:
        Connections not closed yet.
    messages_dropped:
        Malformed messages dropped (no tag, unknown tag, malformed hello).
    """

    connections_accepted: int
    connections_open: int
    messages_dropped: int


class ZmqListener(Listener):
    """A bound ROUTER and the task that demultiplexes it into per-identity connections."""

    def __init__(
        self,
        router: zmq.asyncio.Socket,
        url: str,
        options: TransportOptions,
        release_security: Callable[[], None] | None = None,
    ) -> None:
        self.url = url
        self._release_security = release_security
        self._router = router
        self._router_sync = _sync_view(router)
        self._options = options
        self._connections: dict[bytes, ZmqServerConnection] = {}
        self._pending: asyncio.Queue[ZmqServerConnection | None] = asyncio.Queue()
        self._closed = False
        self._accepted = 0
        self._dropped = 0
        self._last_drop_log = -_DROP_LOG_INTERVAL_S
        self._demux_task = asyncio.create_task(self._demux_loop(), name=f"fedcell-zmq-demux {url}")

    def statistics(self) -> ListenerStats:
        """A snapshot of this listener's counters."""
        return ListenerStats(self._accepted, len(self._connections), self._dropped)

    async def accept(self) -> ZmqServerConnection:
        """Wait for the next peer identity.

        Raises
        ------
        TransportClosedError
            The listener is closed, or closes while ``accept`` waits.
        """
        if self._closed:
            raise TransportClosedError(f"listener {self.url} is closed")
        conn = await self._pending.get()
        if conn is None:
            self._pending.put_nowait(None)  # wake the next waiting accept too
            raise TransportClosedError(f"listener {self.url} is closed")
        return conn

    def _drop(self, identity: bytes, reason: str) -> None:
        self._dropped += 1
        now = time.monotonic()
        if now - self._last_drop_log >= _DROP_LOG_INTERVAL_S:  # a flood must not flood the log
            self._last_drop_log = now
            logger.warning(
                "listener %s dropped a message from %r: %s (%d dropped so far)",
                self.url, identity, reason, self._dropped,
            )  # fmt: skip

    def _forget(self, conn: ZmqServerConnection) -> None:
        if self._connections.get(conn.identity) is conn:
            del self._connections[conn.identity]

    async def _demux_loop(self) -> None:
        threshold = self._options.copy_threshold
        secured = self._release_security is not None  # only then do messages carry a User-Id
        while True:
            try:
                message = await _next_message(self._router, self._router_sync)
            except zmq.ZMQError as exc:
                logger.error("listener %s cannot receive, closing: %s", self.url, exc)
                self._close_connections()
                return
            identity = message[0].bytes
            tag = message[1].bytes if len(message) > 1 else b""
            user = authenticated_user(message[1]) if secured and len(message) > 1 else None
            if tag not in (TAG_DATA, TAG_HELLO) or (tag == TAG_HELLO and len(message) != 2):
                self._drop(identity, f"not a fedcell-zmq/1 message (tag {tag[:8]!r})")
                continue
            conn = self._connection(identity, user)
            if conn.authenticated_identity != user:
                self._drop(
                    identity,
                    f"sent by {user!r} under the routing identity of {conn.authenticated_identity!r}",
                )
            elif tag == TAG_DATA:
                # Head-of-line blocking: see the module docstring.
                await conn._deliver(
                    _to_received(message[2:], threshold), f"all peers of listener {self.url}"
                )

    def _connection(self, identity: bytes, user: str | None) -> ZmqServerConnection:
        conn = self._connections.get(identity)
        if conn is None:
            conn = ZmqServerConnection(self, identity, self._options)
            conn.authenticated_identity = user
            self._connections[identity] = conn
            self._accepted += 1
            self._pending.put_nowait(conn)
        return conn

    def _close_connections(self) -> None:
        for conn in self._connections.values():
            conn._mark_closed()
        self._connections.clear()
        while not self._pending.empty():  # connections never accepted
            pending = self._pending.get_nowait()
            if pending is not None:
                pending._mark_closed()
        self._pending.put_nowait(None)

    async def close(self) -> None:
        """Unbind and close every connection, accepted or not; waiting calls raise. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._demux_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._demux_task
        self._close_connections()
        self._router.close(linger=0)
        if self._release_security is not None:
            self._release_security()


class ZmqTransport(Transport):
    """ZeroMQ ROUTER/DEALER over ``tcp://`` and ``ipc://``."""

    schemes = ("tcp", "ipc")

    async def listen(self, url: str) -> ZmqListener:
        """Bind ``url`` (``tcp://host:0`` picks a free port; ``Listener.url`` reports it).

        Raises
        ------
        ConfigError
            The URL is malformed, the ipc path is longer than the OS allows, or the security
            options have no authorizer.
        ConnectError
            The address is in use (an ipc path too, while a process listens on it) or not
            available.
        """
        _check_address(url)
        if url.startswith("ipc://"):
            _refuse_live_ipc_path(url)
        router = _new_socket(zmq.ROUTER, self.options)
        release_security: Callable[[], None] | None = None
        try:
            router.router_mandatory = True
            router.router_handover = True
            if self.options.security is not None:
                release_security = register_listener(router, self.options.security)
            router.bind(url)
            bound_url = _reported_url(url, router.get_string(zmq.LAST_ENDPOINT))
        except (zmq.ZMQError, ConfigError) as exc:
            router.close(linger=0)
            if release_security is not None:
                release_security()
            if isinstance(exc, ConfigError):
                raise
            raise _map_zmq_error(exc, f"listen on {url}") from exc
        return ZmqListener(router, bound_url, self.options, release_security)

    async def connect(self, url: str) -> ZmqClientConnection:
        """Connect to ``url``; returns at once (frames queue until the listener is there).

        Raises
        ------
        ConfigError
            The URL is malformed, the ipc path is longer than the OS allows, or the security
            options have no server key.
        """
        _check_address(url)
        return ZmqClientConnection(url, self.options)
