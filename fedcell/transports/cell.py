"""Cells: named endpoints that route messages between each other over any transport.

A cell is a named endpoint (``server``, ``site-1``, ``site-1.job-7``). It may *listen* on a URL
(children and direct peers connect to it), connect to one *parent*, and open direct links to other
cells (:meth:`Cell.connect`). Application code registers async handlers per channel (and topic) and
talks to other cells by name: :meth:`~Cell.send` (fire-and-forget), :meth:`~Cell.request` (one
reply), :meth:`~Cell.broadcast` / :meth:`~Cell.broadcast_replies` (one request, encoded once, to
many targets; replies collected, or yielded as they arrive), :meth:`~Cell.send_file`.

Links and the handshake
-----------------------
A *link* is one transport :class:`~fedcell.transports.base.Connection` to a neighbour cell. The
side that opened it says hello; the listening side decides::

    opener                                              listener
    _fc.cell/hello    {name, claims}  ──────────────▶   name = authenticate(Hello) (default: claimed)
                      ◀──────────────  _fc.cell/welcome {name}     (the listener's own name)
                      ◀──────────────  _fc.cell/refused {reason}   (taken, invalid, not authentic)

A name held by a live link (heard from within two heartbeat intervals) is refused to a second
connection: ``start()``/``connect()`` of the impostor raise :class:`~fedcell.errors.CellError`. A
name whose holder went silent is handed to the newcomer (a restarted site need not wait for the
peer timeout; "live" uses the listener's heartbeat interval, so a deployment uses one setting). ``authenticate`` is the hook where the security layer binds the name to the
certificate presented in ``claims``; it returns the name to register or raises (refused).

Control messages (channel ``_fc.cell``) are hop-by-hop: never routed, never relayed. Besides
hello/welcome/refused there are ``ping`` (heartbeat), ``bye`` (a stopping cell leaves at once) and
``who`` (the listener does not know the connection a message came from: the opener re-hellos).

Routing and relay
-----------------
Every other message is routed by name (:func:`~fedcell.transports.cell_routing.next_hop`): local;
a neighbour; a descendant of a neighbour (``site-1.job-7`` via ``site-1``); otherwise up to the
parent; at the root (or with the parent down) an unknown name fails at once with
:class:`~fedcell.errors.UnreachableError`: raised to a local caller, an error reply to a remote
requester, a logged drop for a relayed fire-and-forget message. Site-to-site traffic without a
direct link goes up to the server and down again.

A relaying cell parses only frame 0 (the envelope), appends its own name to the route and forwards
the payload frames untouched, undecoded. A message that reaches a cell already on its route (or its
own sender) is refused with a :class:`~fedcell.errors.RouteLoopError` reply. A message whose last
hop (the last relay, else its sender) is not the neighbour it came from is dropped as spoofed:
a neighbour can only speak for itself and for the traffic it relays.

Request/reply
-------------
A request carries a fresh id and its timeout (header ``_fc.timeout``); replies carry the id as
correlation id and come from the target, so pending requests are keyed by ``(id, target)`` and a
broadcast can share one id (the payload is encoded once, only frame 0 differs per target).
An error reply (kind ``error``) carries ``{kind, type, message}`` and the header ``_fc.for``
naming the target it answers for, because relays produce them too. ``kind`` selects the
exception raised at the requester: ``unreachable`` → UnreachableError, ``loop`` → RouteLoopError,
``no-handler`` → NoHandlerError, anything else (the handler raised, the payload did not decode)
→ RemoteError with the remote exception's type name. The timeout runs from the moment the request
was handed to its first link (for a streamed request: once the receiver verified the stream), by
one timer handle per request.

A relay remembers the requests it forwarded until their reply passes back or their timeout
expires, so when the next hop is declared gone it answers UnreachableError for each at once:
a requester learns that a relayed target died within the peer timeout, not at its own timeout.

Liveness and reconnect
----------------------
Every linked cell sends ``ping`` every ``heartbeat_interval`` (default 1 s); any frame counts as a
sign of life. A neighbour silent for ``peer_timeout`` (default 5 s), whose connection closes, or
whose transport reports ``disconnected``, is declared gone: its name leaves the routing table,
pending requests routed through it fail at once with UnreachableError, relayed requests are
answered so, and peer listeners get ``(name, "left")``.

The opener of a link owns reconnecting. The ZeroMQ transport reconnects its socket by itself: the
opener re-sends hello on the transport's ``connected`` event and on every heartbeat tick while it is
not welcomed. A restarted listener does not know the connection, answers the first message with
``who``, and the opener re-hellos. A link that is still not welcomed one ``peer_timeout`` after it
was lost (or whose connection closed, as in-process ones do) gets a brand-new connection.
A hello on a link the listener still holds (the opener lost it, the listener never noticed)
cancels the streams the opener was sending: the opener failed them when it lost the link, and
their ``CANCEL`` could not get through.

Bad input and backpressure
--------------------------
A cell and all its tasks live on one asyncio event loop (no locks; not thread-safe).
Frames that do not parse (FrameError, OversizedError), spoofed or unknown-peer messages are counted
in :meth:`~Cell.statistics` and logged with the reason; the link keeps serving. Payloads are
decoded only at their destination; one that does not decode gets an error reply if it was a
request. Each handler runs in its own task, so a slow handler never stalls the receive loop (and
heartbeats). Forwarding awaits the outgoing link's queue: a slow next hop slows its senders down
instead of growing memory.

Large payloads
--------------
Messages whose raw buffers exceed the stream threshold travel through the stream layer
(:class:`~fedcell.transports.stream.StreamEndpoint`) end to end: its frames are wrapped in
envelopes on channel ``_fc.stream`` and routed (and relayed, untouched) like any message; at the
destination their frames after the envelope go to ``StreamEndpoint.handle`` without codec
decoding, and the reassembled message is dispatched as if it had arrived whole (its own route is
empty: the relays are recorded on the stream frames). Replies stream too, so a site's large model
update travels back the same way. Streams are end to end, so relays hold no stream state; when a
neighbour is declared gone, the streams to cells now unreachable are cancelled at once, and a
request whose stream was cancelled that way raises UnreachableError. Files (:meth:`Cell.send_file`)
land where the receiving cell's ``file_sink`` says (none: files are refused). A requester that only
reduces the replies (a server summing model updates) passes ``reply_sink`` to :meth:`Cell.request`
or :meth:`Cell.broadcast_replies`: a streamed reply is then consumed piece by piece by an
:class:`~fedcell.transports.array_sink.ArraySink` and never assembled, costing a stream window
instead of its size.

Measured (``tests/transports/cell_bench.py``, 2 shared cores): a request/reply round trip costs
about 60 µs over inproc (about 12 µs of it the transport), about 300 µs over tcp with both cells
on one event loop (about 200 µs of it the ZeroMQ transport), about 400 µs to a server process;
one broadcast of a tiny model to 8 sites with their replies about 1 ms (inproc) and 2.5 ms (8 site
processes over tcp).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import (
    AsyncGenerator,
    Awaitable,
    Callable,
    Coroutine,
    Iterable,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

from fedcell.errors import (
    CellError,
    ConfigError,
    ConnectError,
    EncodeError,
    FedcellError,
    FrameError,
    NoHandlerError,
    ProtocolError,
    RemoteError,
    RequestTimeoutError,
    RouteLoopError,
    StreamCancelledError,
    StreamError,
    TransportClosedError,
    TransportError,
    UnreachableError,
)
from fedcell.transports import codec
from fedcell.transports.array_sink import ArraySink
from fedcell.transports.base import Buffer, Connection, ConnectionState, Listener, TransportOptions
from fedcell.transports.cell_routing import next_hop, validate_cell_name
from fedcell.transports.message import (
    Envelope,
    HeaderValue,
    Message,
    pack_envelope,
    to_wire,
    unpack_envelope,
)
from fedcell.transports.registry import get_transport
from fedcell.transports.stream import (
    FileSinkPolicy,
    StreamConfig,
    StreamEndpoint,
    StreamStats,
)

__all__ = [
    "CONTROL_CHANNEL",
    "STREAM_CHANNEL",
    "Authenticator",
    "Cell",
    "CellConfig",
    "CellStatistics",
    "Handler",
    "Hello",
    "PeerEvent",
    "PeerListener",
    "ReplySink",
]

log = logging.getLogger(__name__)

CONTROL_CHANNEL = "_fc.cell"
STREAM_CHANNEL = "_fc.stream"
RESERVED_PREFIX = "_fc."
TIMEOUT_HEADER = "_fc.timeout"
FOR_HEADER = "_fc.for"
_GOODBYE = "it said goodbye"

Handler = Callable[[Message], Awaitable[Any]]
PeerEvent = Literal["joined", "left"]
PeerListener = Callable[[str, PeerEvent], None]
ErrorKind = Literal["unreachable", "loop", "no-handler", "raised", "malformed"]
#: ``reply_sink(target, skeleton)``: when ``target``'s reply arrives as a stream, an
#: :class:`~fedcell.transports.array_sink.ArraySink` to take its arrays as they come (``None``:
#: assemble it); raising a FedcellError refuses the reply and fails the request with that error.
ReplySink = Callable[[str, Any], ArraySink | None]


@dataclass(frozen=True, slots=True)
class Hello:
    """What a connecting cell presented: the name it claims and its credentials.

    Attributes
    ----------
    name:
        The claimed cell name (already validated as a name).
    claims:
        Whatever the connecting cell put in its hello (``Cell(..., claims=...)``), e.g. a
        certificate; empty by default.
    connection:
        The transport's description of the remote end, for messages.
    identity:
        The name the transport authenticated the remote end as (the CurveZMQ ZAP user id:
        :attr:`~fedcell.transports.base.Connection.authenticated_identity`); ``None`` where the
        transport does not authenticate peers. An authenticator binds the claimed name to it.
    """

    name: str
    claims: Mapping[str, Any]
    connection: str
    identity: str | None = None


#: ``authenticate(hello) -> name``: returns the name to register, or raises to refuse.
Authenticator = Callable[[Hello], str]


@dataclass(frozen=True, slots=True)
class CellConfig:
    """Tunables of a cell.

    Attributes
    ----------
    heartbeat_interval:
        Seconds between pings on every link (also the re-hello and reconnect cadence).
    peer_timeout:
        Seconds of silence after which a neighbour is declared gone.
    connect_timeout:
        Seconds ``start()``/``connect()`` wait for the handshake answer.
    max_payload_header_bytes:
        Largest payload tree frame accepted from the network.
    transport:
        Options handed to the transport (queue sizes, zero-copy threshold).
    stream:
        The stream layer's tunables; ``stream.threshold`` decides which messages are streamed.
    """

    heartbeat_interval: float = 1.0
    peer_timeout: float = 5.0
    connect_timeout: float = 10.0
    max_payload_header_bytes: int = codec.DEFAULT_MAX_TREE_BYTES
    transport: TransportOptions = field(default_factory=TransportOptions)
    stream: StreamConfig = field(default_factory=StreamConfig)

    def __post_init__(self) -> None:
        if not self.heartbeat_interval > 0:
            raise ConfigError(f"heartbeat_interval must be > 0, got {self.heartbeat_interval}")
        if not self.peer_timeout > self.heartbeat_interval:
            raise ConfigError(
                f"peer_timeout ({self.peer_timeout}) must exceed heartbeat_interval "
                f"({self.heartbeat_interval})"
            )
        if not self.connect_timeout > 0:
            raise ConfigError(f"connect_timeout must be > 0, got {self.connect_timeout}")


@dataclass(frozen=True, slots=True)
class CellStatistics:
    """A snapshot of a cell's counters.

    Attributes
    ----------
    name:
        The cell's name.
    peers:
        Names of the neighbours with a live link.
    messages_sent, messages_received:
        Messages written to / read from links (control messages and relayed traffic included).
    messages_relayed:
        Messages forwarded on behalf of other cells.
    messages_dropped:
        Messages discarded: no route, no handler for a one-way message, late replies, spoofed or
        unknown-peer traffic (each drop is logged with its reason).
    malformed_frames:
        Messages that did not parse (FrameError / OversizedError).
    pending_requests:
        Requests of this cell waiting for their reply.
    relayed_requests:
        Requests this cell relayed whose reply has not passed back yet (kept until their timeout).
    requests_timed_out:
        Requests that got no reply within their timeout.
    peers_lost:
        Times a neighbour was declared gone.
    streams:
        The stream layer's counters (streams, bytes, codecs, peak window use).
    """

    name: str
    peers: tuple[str, ...]
    messages_sent: int
    messages_received: int
    messages_relayed: int
    messages_dropped: int
    malformed_frames: int
    pending_requests: int
    relayed_requests: int
    requests_timed_out: int
    peers_lost: int
    streams: StreamStats


@dataclass(slots=True)
class _Counters:
    sent: int = 0
    received: int = 0
    relayed: int = 0
    dropped: int = 0
    malformed: int = 0
    timed_out: int = 0
    peers_lost: int = 0


class _Link:
    """One connection to a neighbour cell; ``url`` is set when this cell opened it."""

    __slots__ = (
        "attached",
        "conn",
        "detached_since",
        "failed_reconnects",
        "last_seen",
        "name",
        "reader",
        "url",
        "welcome",
    )

    def __init__(self, conn: Connection, url: str | None) -> None:
        self.conn = conn
        self.url = url
        self.name: str | None = None
        self.attached = False
        now = time.monotonic()
        self.last_seen = now
        self.detached_since = now
        self.reader: asyncio.Task[None] | None = None
        self.welcome: asyncio.Future[str] | None = None
        self.failed_reconnects = 0

    def describe(self) -> str:
        return repr(self.name) if self.name else self.conn.peer


@dataclass(slots=True)
class _Pending:
    future: asyncio.Future[Any]
    via: str | None
    reply_sink: ReplySink | None = None


@dataclass(slots=True)
class _Relayed:
    request: Envelope
    requester: str
    via: str
    deadline: float


def _buffer_bytes(frames: Sequence[Buffer]) -> int:
    return sum(memoryview(f).nbytes for f in frames[2:])


class Cell:
    """A named endpoint that routes messages to other cells by name.

    Parameters
    ----------
    name:
        This cell's name (dot-separated labels: ``site-1.job-7``).
    listen:
        URL to accept children and direct peers on (``tcp://127.0.0.1:0`` picks a port; see
        :attr:`url`).
    parent:
        URL of the parent cell; messages this cell cannot route otherwise go there.
    config:
        Heartbeat, timeout and transport tunables.
    authenticate:
        Called with each incoming :class:`Hello`; returns the name to register or raises to
        refuse the connection. Default: accept the claimed name.
    claims:
        Credentials sent in this cell's own hellos (what the other side's ``authenticate`` sees).
    file_sink:
        Where files sent to this cell (:meth:`send_file`) land; ``None`` refuses every file.

    Every messaging method (``send``, ``request``, ``broadcast``, ...) raises
    :class:`~fedcell.errors.CellError` when the cell is not running (before ``start()``, after
    ``stop()``). Register handlers before ``start()``: peers may call as soon as they see the cell
    join.

    Raises
    ------
    ConfigError
        If ``name`` is not a valid cell name.
    """

    def __init__(
        self,
        name: str,
        *,
        listen: str | None = None,
        parent: str | None = None,
        config: CellConfig | None = None,
        authenticate: Authenticator | None = None,
        claims: Mapping[str, Any] | None = None,
        file_sink: FileSinkPolicy | None = None,
    ) -> None:
        self._name = validate_cell_name(name)
        self._listen_url = listen
        self._parent_url = parent
        self._config = config or CellConfig()
        self._authenticate = authenticate
        self._claims = dict(claims or {})
        self._handlers: dict[tuple[str, str], Handler] = {}
        self._peer_listeners: list[PeerListener] = []
        self._neighbours: dict[str, _Link] = {}
        self._links: set[_Link] = set()
        self._parent_link: _Link | None = None
        self._pending: dict[tuple[str, str], _Pending] = {}
        self._relayed: dict[tuple[str, str], _Relayed] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._listener: Listener | None = None
        self._stream: StreamEndpoint | None = None
        self._file_sink = file_sink
        self._counters = _Counters()
        self._state: Literal["new", "running", "stopped"] = "new"

    # ------------------------------------------------------------------------------------------
    # lifecycle

    async def start(self) -> None:
        """Listen (if asked), start heartbeats and connect to the parent (if any).

        Returns once the parent welcomed this cell.

        Raises
        ------
        ConfigError
            If a URL is malformed or names a scheme no transport serves.
        ConnectError
            If the listen URL cannot be bound, or the parent does not answer within
            ``connect_timeout``.
        CellError
            If the parent refuses this cell (name taken, not authentic), or the cell was started
            before.
        """
        if self._state != "new":
            raise CellError(f"cell {self._name!r} was already started")
        self._state = "running"
        try:
            self._stream = StreamEndpoint(
                self._send_stream_frames,
                self._deliver_streamed,
                self._config.stream,
                name=self._name,
                file_sink=self._file_sink,
                array_sink=self._reply_array_sink,
            )
            if self._listen_url is not None:
                transport = get_transport(self._listen_url, self._config.transport)
                self._listener = await transport.listen(self._listen_url)
                self._spawn(self._accept_loop(self._listener))
            self._spawn(self._watchdog())
            if self._parent_url is not None:
                await self._open_link(self._parent_url, is_parent=True)
        except BaseException:
            await self.stop()
            raise

    async def connect(self, url: str) -> str:
        """Open a direct link to the cell listening at ``url``; return its name.

        Raises
        ------
        ConnectError
            If nothing answers the handshake within ``connect_timeout``.
        CellError
            If the other cell refuses this one, or its name is already a neighbour's.
        """
        self._check_running()
        return await self._open_link(url, is_parent=False)

    async def stop(self) -> None:
        """Say goodbye to every neighbour, close all links and fail pending requests. Idempotent."""
        if self._state == "stopped":
            return
        self._state = "stopped"
        for link in list(self._links):
            if link.attached:
                self._send_control_nowait(link, "bye")
        # A handler may stop its own cell: never cancel (or wait for) the task calling stop().
        current = asyncio.current_task()
        tasks = [
            task
            for task in (*self._tasks, *(link.reader for link in self._links))
            if task is not None and task is not current
        ]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._stream is not None:
            await self._stream.close()
        for link in list(self._links):
            await link.conn.close()
        self._links.clear()
        self._neighbours.clear()
        if self._listener is not None:
            await self._listener.close()
        for pending in self._pending.values():
            if not pending.future.done():
                pending.future.set_exception(CellError(f"cell {self._name!r} stopped"))
        self._pending.clear()
        self._relayed.clear()

    async def __aenter__(self) -> Cell:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # ------------------------------------------------------------------------------------------
    # public properties and registration

    @property
    def name(self) -> str:
        """This cell's name."""
        return self._name

    @property
    def url(self) -> str:
        """The URL this cell listens on (with the real port for ``:0``).

        Raises
        ------
        CellError
            If the cell does not listen or is not started.
        """
        if self._listener is None:
            raise CellError(f"cell {self._name!r} is not listening (no listen URL, or not started)")
        return self._listener.url

    @property
    def peers(self) -> tuple[str, ...]:
        """Names of the neighbours with a live, handshaken link (sorted)."""
        return tuple(sorted(self._neighbours))

    @property
    def parent(self) -> str | None:
        """The parent's name while its link is up, else ``None``."""
        link = self._parent_link
        return link.name if link is not None and link.attached else None

    def register(self, channel: str, handler: Handler, topic: str = "*") -> None:
        """Call ``await handler(message)`` for messages on ``channel`` (and ``topic``).

        The handler's return value is the reply payload of a request (ignored for one-way
        messages); if it raises, the requester gets a :class:`~fedcell.errors.RemoteError`.
        ``topic="*"`` catches every topic without a handler of its own.

        Raises
        ------
        ConfigError
            If the channel is reserved (``_fc.*``) or already has a handler for ``topic``.
        """
        if channel.startswith(RESERVED_PREFIX):
            raise ConfigError(f"channel {channel!r} is reserved for fedcell's own protocols")
        if (channel, topic) in self._handlers:
            raise ConfigError(f"channel {channel!r} topic {topic!r} already has a handler")
        self._handlers[(channel, topic)] = handler

    def unregister(self, channel: str, topic: str = "*") -> None:
        """Remove the handler of ``channel``/``topic`` (no error if there is none)."""
        self._handlers.pop((channel, topic), None)

    def add_peer_listener(self, listener: PeerListener) -> None:
        """Call ``listener(name, "joined" | "left")`` whenever a neighbour comes or goes."""
        self._peer_listeners.append(listener)

    def remove_peer_listener(self, listener: PeerListener) -> None:
        """Stop calling ``listener`` (no error if it was not added)."""
        with contextlib.suppress(ValueError):
            self._peer_listeners.remove(listener)

    def statistics(self) -> CellStatistics:
        """A snapshot of this cell's counters."""
        c = self._counters
        return CellStatistics(
            name=self._name,
            peers=self.peers,
            messages_sent=c.sent,
            messages_received=c.received,
            messages_relayed=c.relayed,
            messages_dropped=c.dropped,
            malformed_frames=c.malformed,
            pending_requests=len(self._pending),
            relayed_requests=len(self._relayed),
            requests_timed_out=c.timed_out,
            peers_lost=c.peers_lost,
            streams=self._stream.statistics() if self._stream is not None else StreamStats(),
        )

    def __repr__(self) -> str:
        return f"<Cell {self._name!r} {self._state} peers={list(self.peers)}>"

    # ------------------------------------------------------------------------------------------
    # messaging API

    async def send(
        self,
        target: str,
        channel: str,
        payload: Any = None,
        *,
        topic: str = "",
        headers: Mapping[str, HeaderValue] | None = None,
    ) -> None:
        """Send a one-way message to the cell named ``target``.

        Returns once the message is handed to the first link (or, when streamed, delivered).

        Raises
        ------
        UnreachableError
            If this cell has no route to ``target``.
        EncodeError
            If the payload holds a type the wire does not carry.
        """
        self._check_running()
        message = Message.create(self._name, target, channel, payload, topic=topic, headers=headers)
        await self._transmit(message, self._route(target))

    async def request(
        self,
        target: str,
        channel: str,
        payload: Any = None,
        *,
        topic: str = "",
        timeout: float = 5.0,
        headers: Mapping[str, HeaderValue] | None = None,
        reply_sink: ReplySink | None = None,
    ) -> Any:
        """Send a request to ``target`` and return its handler's reply payload.

        With ``reply_sink``, a reply that arrives as a stream may be consumed piece by piece
        instead of assembled (see :data:`ReplySink`); the request then returns what the sink's
        ``finish`` returned, and fails with the stream's error if the reply stream fails.

        Raises
        ------
        UnreachableError
            At once if there is no route to ``target``, or as soon as a cell on the way declares
            the next hop gone.
        RequestTimeoutError
            If no reply arrives within ``timeout`` seconds.
        NoHandlerError
            If ``target`` has no handler for ``channel``/``topic``.
        RemoteError
            If the target's handler raised (``remote_type`` names the exception class).
        RouteLoopError
            If the request was routed in a circle.
        EncodeError
            If the payload holds a type the wire does not carry.
        """
        self._check_running()
        message = Message.create(
            self._name,
            target,
            channel,
            payload,
            topic=topic,
            kind="request",
            headers={**(headers or {}), TIMEOUT_HEADER: float(timeout)},
        )
        via = self._route(target)
        key = (message.envelope.msg_id, target)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._pending[key] = _Pending(future, via, reply_sink)
        try:
            try:
                await self._transmit(message, via)
            except StreamError:
                failure = future.exception() if future.done() else None
                if failure is not None:
                    raise failure from None  # the target was declared gone mid-stream
                raise
            if future.done():
                return future.result()
            # A timer handle instead of asyncio.wait_for: no extra task or waiter per request.
            expiry = RequestTimeoutError(
                f"no reply from {target!r} on channel {channel!r} within {timeout} s"
            )
            timer = loop.call_later(timeout, _fail_unless_done, future, expiry)
            try:
                return await future
            finally:
                timer.cancel()
        except RequestTimeoutError:
            self._counters.timed_out += 1
            raise
        finally:
            self._pending.pop(key, None)

    async def broadcast(
        self,
        targets: Iterable[str],
        channel: str,
        payload: Any = None,
        *,
        topic: str = "",
        timeout: float = 5.0,
        headers: Mapping[str, HeaderValue] | None = None,
    ) -> dict[str, Any]:
        """Send one request to several cells; return ``{target: reply payload or exception}``.

        The payload is encoded once. A target that cannot be reached, fails, or does not answer
        within ``timeout`` maps to its exception (UnreachableError, RemoteError,
        RequestTimeoutError, ...) instead of failing the whole call. To handle replies as they
        arrive (and drop each after use), iterate :meth:`broadcast_replies` instead.

        Raises
        ------
        EncodeError
            If the payload holds a type the wire does not carry.
        """
        names = list(dict.fromkeys(targets))
        results: dict[str, Any] = {}
        replies = self.broadcast_replies(
            names, channel, payload, topic=topic, timeout=timeout, headers=headers
        )
        async with contextlib.aclosing(replies):
            async for name, outcome in replies:
                results[name] = outcome
        return {name: results[name] for name in names}

    async def broadcast_replies(
        self,
        targets: Iterable[str],
        channel: str,
        payload: Any = None,
        *,
        topic: str = "",
        timeout: float = 5.0,
        headers: Mapping[str, HeaderValue] | None = None,
        reply_sink: ReplySink | None = None,
        on_handed_over: Callable[[], None] | None = None,
    ) -> AsyncGenerator[tuple[str, Any], None]:
        """Send one request to several cells; yield ``(target, reply or exception)`` as each
        reply arrives (unreachable targets first, timed-out ones last).

        The payload is encoded once. Once yielded, a reply is no longer referenced by the cell,
        so a consumer that folds each reply into an aggregate holds one reply at a time.
        ``reply_sink`` goes further: streamed replies are consumed piece by piece as they arrive
        (see :meth:`request`); once this generator is closed, no sink gets another byte.
        ``on_handed_over`` is called once the payload went to every target's link or to the
        background stream that sends it: from then on the cell holds the payload's arrays only
        until each is sent (a streamed array: until every target acked its chunks), so the
        caller may drop its own references while the replies are awaited.

        Raises
        ------
        EncodeError
            If the payload holds a type the wire does not carry.
        """
        self._check_running()
        base = Envelope(
            sender=self._name,
            receiver="",
            channel=channel,
            topic=topic,
            kind="request",
            headers={**(headers or {}), TIMEOUT_HEADER: float(timeout)},
        )
        tree, buffers = codec.encode(payload)
        tree_frame = codec.pack_tree(tree)
        streamed = (
            self._stream is not None and codec.payload_nbytes(buffers) > self._stream.threshold
        )
        loop = asyncio.get_running_loop()
        unreachable: list[tuple[str, UnreachableError]] = []
        waiting: dict[asyncio.Future[Any], str] = {}
        for name in dict.fromkeys(targets):
            try:
                via = self._route(name)
            except UnreachableError as exc:
                unreachable.append((name, exc))
                continue
            future: asyncio.Future[Any] = loop.create_future()
            waiting[future] = name
            self._pending[(base.msg_id, name)] = _Pending(future, via, reply_sink)
        streaming: asyncio.Future[dict[str, BaseException | None]] | None = None
        by_name: dict[str, asyncio.Future[Any]] = {}
        try:
            stream_targets: list[str] = []
            for future, name in waiting.items():
                envelope = replace(base, receiver=name)
                via = self._pending[(base.msg_id, name)].via
                if streamed and via is not None:
                    stream_targets.append(name)
                    continue
                try:
                    await self._transmit_frames(
                        envelope, [pack_envelope(envelope), tree_frame, *buffers], via
                    )
                except FedcellError as exc:
                    _fail_unless_done(future, exc)
            if stream_targets and self._stream is not None:
                # Stream to every target in the background and hand replies over meanwhile: a
                # fast site's reply must not wait (held in memory) for the slowest site's copy.
                # ``by_name`` loses each future as its reply is handed over (a future holds its
                # reply: keeping them all would keep every reply of the broadcast alive).
                by_name.update((name, future) for future, name in waiting.items())
                streaming = asyncio.ensure_future(
                    self._stream.broadcast_message(
                        stream_targets, Message(replace(base, receiver=stream_targets[0]), payload)
                    )
                )
                streaming.add_done_callback(functools.partial(_fail_streams, by_name))
            del payload, tree, buffers, tree_frame  # the links and the stream hold what they send
            if on_handed_over is not None:
                if streaming is not None:
                    # The stream task encodes the payload in its first step, before it first
                    # waits: let it take that step before the caller lets go of the payload.
                    await asyncio.sleep(0)
                on_handed_over()
            for name, unreachable_error in unreachable:
                yield name, unreachable_error
            deadline = loop.time() + timeout
            while waiting and (remaining := deadline - loop.time()) > 0:
                done, _ = await asyncio.wait(
                    waiting, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
                )
                while done:
                    # No local keeps the reply: once yielded, only the consumer holds it.
                    yield self._hand_over(done.pop(), waiting, by_name, base.msg_id)
            for future, name in list(waiting.items()):
                del waiting[future]
                self._pending.pop((base.msg_id, name), None)
                self._counters.timed_out += 1
                yield (
                    name,
                    RequestTimeoutError(
                        f"no reply from {name!r} on channel {channel!r} within {timeout} s"
                    ),
                )
        finally:
            for future, name in waiting.items():
                self._pending.pop((base.msg_id, name), None)
                if future.done() and not future.cancelled():
                    future.exception()  # failed while closing: nobody reads it, do not log it
                future.cancel()
            if streaming is not None and not streaming.done():
                streaming.cancel()
                with contextlib.suppress(asyncio.CancelledError, FedcellError):
                    await streaming

    def _hand_over(
        self,
        future: asyncio.Future[Any],
        waiting: dict[asyncio.Future[Any], str],
        by_name: dict[str, asyncio.Future[Any]],
        msg_id: str,
    ) -> tuple[str, Any]:
        """Forget a broadcast target's completed reply future; return ``(target, reply or
        exception)``."""
        name = waiting.pop(future)
        by_name.pop(name, None)
        self._pending.pop((msg_id, name), None)
        failure = future.exception()
        return name, failure if failure is not None else future.result()

    async def send_file(
        self,
        target: str,
        path: str | Path,
        *,
        channel: str,
        meta: Mapping[str, Any] | None = None,
    ) -> str:
        """Stream the file at ``path`` to ``target``; return its hex xxh3_128 once verified.

        The target's file sink decides where the file lands; its handler on ``channel`` then
        gets a message whose payload is a :class:`~fedcell.transports.stream.ReceivedFile`
        (path, size, digest, ``meta``). Memory stays bounded by the stream window whatever the
        file size.

        Raises
        ------
        UnreachableError
            If there is no route to ``target``.
        StreamError
            If the transfer fails (integrity, stall, cancelled, or the target refuses files).
        OSError
            If ``path`` cannot be read.
        """
        self._check_running()
        if self._route(target) is None:
            raise CellError(f"cell {self._name!r} cannot send a file to itself")
        assert self._stream is not None
        return await self._stream.send_file(
            target, Path(path), channel=channel, meta=dict(meta or {})
        )

    # ------------------------------------------------------------------------------------------
    # routing and sending

    def _check_running(self) -> None:
        if self._state != "running":
            raise CellError(f"cell {self._name!r} is {self._state}, not running")

    def _route(self, target: str) -> str | None:
        return next_hop(
            self._name,
            target,
            self._neighbours,
            self.parent,
            parent_configured=self._parent_url is not None,
        )

    async def _transmit(self, message: Message, via: str | None) -> None:
        frames = to_wire(message)
        if (
            via is not None
            and self._stream is not None
            and _buffer_bytes(frames) > self._stream.threshold
        ):
            await self._stream.send_message(message.receiver, message)
            return
        await self._transmit_frames(message.envelope, frames, via)

    async def _transmit_frames(
        self, envelope: Envelope, frames: list[Buffer], via: str | None
    ) -> None:
        if via is None:
            self._dispatch(self._decode(envelope, frames))
            return
        link = self._neighbours.get(via)
        if link is None:
            raise UnreachableError(f"cannot reach {envelope.receiver!r}: {via!r} just left")
        await self._send_on(link, frames)

    async def _send_on(self, link: _Link, frames: Sequence[Buffer]) -> None:
        try:
            await link.conn.send(frames)
        except TransportError as exc:
            raise UnreachableError(f"cannot send to {link.describe()}: {exc}") from exc
        self._counters.sent += 1

    async def _send_stream_frames(self, peer: str, frames: list[Buffer]) -> None:
        envelope = Envelope(sender=self._name, receiver=peer, channel=STREAM_CHANNEL)
        via = self._route(peer)
        if via is None:
            raise CellError(f"cell {self._name!r} cannot stream to itself")
        await self._transmit_frames(envelope, [pack_envelope(envelope), *frames], via)

    async def _deliver_streamed(self, message: Message) -> None:
        if message.receiver != self._name:
            self._drop(f"streamed message for {message.receiver!r} from {message.sender!r}")
            return
        self._dispatch(message)

    def _reply_array_sink(
        self, peer: str, sid: int, envelope: Envelope, skeleton: Any
    ) -> ArraySink | None:
        """The stream layer's hook: the reply sink of the request a streamed reply answers."""
        if envelope.kind != "reply" or envelope.sender != peer or envelope.correlation_id is None:
            return None
        key = (envelope.correlation_id, peer)
        pending = self._pending.get(key)
        if pending is None or pending.reply_sink is None or pending.future.done():
            return None
        try:
            sink = pending.reply_sink(peer, skeleton)
        except FedcellError as exc:
            _fail_unless_done(pending.future, exc)
            raise
        if sink is None:
            return None
        future, pendings = pending.future, self._pending
        # The check closes over the future, not the pending request: that holds the reply sink.
        return _ReplySinkGuard(
            sink, future, lambda: getattr(pendings.get(key), "future", None) is future
        )

    def _decode(self, envelope: Envelope, frames: Sequence[Buffer]) -> Message:
        if len(frames) < 2:
            raise FrameError(f"a message needs at least 2 frames, got {len(frames)}")
        tree = codec.unpack_tree(frames[1], self._config.max_payload_header_bytes)
        return Message(envelope, codec.decode(tree, frames[2:]))

    # ------------------------------------------------------------------------------------------
    # local delivery

    def _dispatch(self, message: Message) -> None:
        kind = message.kind
        if kind == "reply" or kind == "error":
            self._resolve(message)
            return
        handler = self._handlers.get((message.channel, message.topic)) or self._handlers.get(
            (message.channel, "*")
        )
        if handler is None:
            text = (
                f"cell {self._name!r} has no handler for channel {message.channel!r}"
                f" (topic {message.topic!r})"
            )
            if kind == "request":
                self._spawn(
                    self._answer_error(message.envelope, "no-handler", "NoHandlerError", text)
                )
            else:
                self._drop(f"{text}; one-way message from {message.sender!r} dropped")
            return
        self._spawn(self._run_handler(handler, message))

    async def _run_handler(self, handler: Handler, message: Message) -> None:
        try:
            result = await handler(message)
        except Exception as exc:
            if message.kind != "request":
                log.exception(
                    "%s: handler for channel %r raised on a one-way message from %r",
                    self._name,
                    message.channel,
                    message.sender,
                )
                return
            remote_type = type(exc).__name__
            text = (
                f"handler for channel {message.channel!r} on {self._name!r} raised "
                f"{remote_type}: {exc}"
            )
            await self._answer_error(message.envelope, "raised", remote_type, text)
            return
        if message.kind != "request":
            return
        reply = message.reply(result)
        try:
            await self._transmit(reply, self._route(reply.receiver))
        except EncodeError as exc:
            text = f"reply of {self._name!r} on channel {message.channel!r} cannot be sent: {exc}"
            await self._answer_error(message.envelope, "raised", "EncodeError", text)
        except FedcellError as exc:
            self._drop(f"reply to {reply.receiver!r} on {message.channel!r} undeliverable: {exc}")

    def _resolve(self, message: Message) -> None:
        env = message.envelope
        target: object = (
            env.headers.get(FOR_HEADER, env.sender) if env.kind == "error" else env.sender
        )
        pending = None
        if env.correlation_id is not None and isinstance(target, str):
            pending = self._pending.pop((env.correlation_id, target), None)
        if pending is None or pending.future.done():
            self._drop(f"{env.kind} from {env.sender!r} matches no pending request (late?)")
            return
        if env.kind == "reply":
            pending.future.set_result(message.payload)
        else:
            pending.future.set_exception(_error_from_payload(message.payload, env.sender))

    async def _answer_error(
        self, request: Envelope, kind: ErrorKind, remote_type: str, text: str
    ) -> None:
        """Send an error reply for ``request`` (requests only; other kinds are dropped)."""
        if request.kind != "request":
            self._drop(
                f"{request.kind} message {request.channel!r} from {request.sender!r}: {text}"
            )
            return
        envelope = Envelope(
            sender=self._name,
            receiver=request.sender,
            channel=request.channel,
            topic=request.topic,
            kind="error",
            correlation_id=request.msg_id,
            headers={FOR_HEADER: request.receiver},
        )
        message = Message(envelope, {"kind": kind, "type": remote_type, "message": text})
        try:
            await self._transmit(message, self._route(request.sender))
        except FedcellError as exc:
            self._drop(f"error reply to {request.sender!r} undeliverable ({exc}); it said: {text}")

    def _drop(self, reason: str) -> None:
        self._counters.dropped += 1
        log.warning("%s: dropped: %s", self._name, reason)

    # ------------------------------------------------------------------------------------------
    # links: opening, reading, liveness

    async def _open_link(self, url: str, *, is_parent: bool) -> str:
        conn = await get_transport(url, self._config.transport).connect(url)
        link = _Link(conn, url)
        link.welcome = asyncio.get_running_loop().create_future()
        self._links.add(link)
        if is_parent:
            self._parent_link = link
        self._attach_connection(link, conn)
        try:
            # The hello's send is bounded too: a connection whose peer refused it at the
            # transport level (a CurveZMQ handshake failure) may never become writable.
            async with asyncio.timeout(self._config.connect_timeout):
                await self._send_on(link, self._control_frames(link, "hello", self._hello_payload()))
                return await link.welcome
        except TimeoutError:
            await self._drop_link(link)
            raise ConnectError(
                f"{url} did not answer the handshake of {self._name!r} within "
                f"{self._config.connect_timeout} s"
            ) from None
        except UnreachableError as exc:  # the connection closed before the hello went out
            await self._drop_link(link)
            raise ConnectError(f"handshake of {self._name!r} with {url} failed: {exc}") from exc
        except BaseException:
            await self._drop_link(link)
            raise
        finally:
            link.welcome = None

    def _attach_connection(self, link: _Link, conn: Connection) -> None:
        link.conn = conn
        conn.add_state_listener(functools.partial(self._on_connection_state, link, conn))
        link.reader = asyncio.get_running_loop().create_task(self._read(link, conn))

    async def _drop_link(self, link: _Link) -> None:
        self._link_lost(link, "link closed")
        self._links.discard(link)
        if link is self._parent_link:
            self._parent_link = None
        if link.reader is not None and link.reader is not asyncio.current_task():
            await _cancel_and_wait(link.reader)
        await link.conn.close()

    async def _accept_loop(self, listener: Listener) -> None:
        while True:
            try:
                conn = await listener.accept()
            except TransportClosedError:
                return
            link = _Link(conn, url=None)
            self._links.add(link)
            self._attach_connection(link, conn)

    async def _read(self, link: _Link, conn: Connection) -> None:
        while True:
            try:
                frames = await conn.recv()
            except TransportError as exc:
                if link.welcome is not None and not link.welcome.done():  # e.g. CurveZMQ refusal
                    link.welcome.set_exception(
                        ConnectError(f"{link.url} closed the connection during the handshake of "
                                     f"{self._name!r}: {exc}")
                    )  # fmt: skip
                break
            link.last_seen = time.monotonic()
            self._counters.received += 1
            try:
                await self._on_frames(link, frames)
            except ProtocolError as exc:
                self._counters.malformed += 1
                log.warning("%s: malformed message from %s: %s", self._name, link.describe(), exc)
            except Exception:
                log.exception("%s: error handling a message from %s", self._name, link.describe())
        if self._state == "running" and link.conn is conn:
            self._link_lost(link, "connection closed")
            if link.url is None:
                self._links.discard(link)

    def _on_connection_state(self, link: _Link, conn: Connection, state: ConnectionState) -> None:
        if self._state != "running" or link.conn is not conn:
            return
        if state == "disconnected":
            self._link_lost(link, "transport reports disconnected")
        elif link.url is not None and not link.attached:
            self._send_control_nowait(link, "hello", self._hello_payload())

    def _link_lost(self, link: _Link, reason: str) -> None:
        if not link.attached:
            return
        name = link.name
        assert name is not None
        link.attached = False
        link.detached_since = time.monotonic()
        if self._neighbours.get(name) is link:
            del self._neighbours[name]
        self._counters.peers_lost += 1
        level = logging.INFO if reason == _GOODBYE else logging.WARNING
        log.log(level, "%s: peer %r is gone (%s)", self._name, name, reason)
        for pending in self._pending.values():
            if pending.via == name and not pending.future.done():
                pending.future.set_exception(
                    UnreachableError(f"{name!r} is gone ({reason}); the request cannot complete")
                )
        for key, relayed in list(self._relayed.items()):
            if relayed.via == name:
                del self._relayed[key]
                text = f"{relayed.request.receiver!r} is unreachable: {name!r} is gone ({reason})"
                self._spawn(
                    self._answer_error(relayed.request, "unreachable", "UnreachableError", text)
                )
            elif relayed.requester == name:
                del self._relayed[key]
        self._cancel_streams_beyond(name, reason)
        self._notify_peer(name, "left")

    def _cancel_streams_beyond(self, name: str, reason: str) -> None:
        """Cancel the open streams whose peer became unreachable when ``name`` left."""
        if self._stream is None:
            return
        for info in self._stream.streams():
            try:
                self._route(info.peer)
            except UnreachableError:
                with contextlib.suppress(StreamError):
                    self._stream.cancel(info.peer, info.sid, f"{name!r} is gone ({reason})")

    def _cancel_inbound_streams(self, peer: str, reason: str) -> None:
        """Cancel the open streams that ``peer`` itself is sending to this cell."""
        if self._stream is None:
            return
        for info in self._stream.streams():
            if info.peer == peer and info.direction == "in":
                with contextlib.suppress(StreamError):
                    self._stream.cancel(peer, info.sid, f"{peer!r} {reason}")

    def _notify_peer(self, name: str, event: PeerEvent) -> None:
        for listener in list(self._peer_listeners):
            try:
                listener(name, event)
            except Exception:
                log.exception("%s: peer listener raised on (%r, %r)", self._name, name, event)

    async def _watchdog(self) -> None:
        while True:
            await asyncio.sleep(self._config.heartbeat_interval)
            try:
                await self._tick(time.monotonic())
            except Exception:  # a bug here must not silence the heartbeats for good
                log.exception("%s: heartbeat tick failed", self._name)

    async def _tick(self, now: float) -> None:
        """Ping live links, declare silent ones gone, re-hello or reconnect our own links."""
        config = self._config
        for link in list(self._links):
            if link.attached:
                silent = now - link.last_seen
                if silent <= config.peer_timeout:
                    self._send_control_nowait(link, "ping")
                    continue
                self._link_lost(link, f"silent for {silent:.1f} s")
                if link.url is None:
                    await self._drop_link(link)
                    continue
            if link.url is None:
                if now - link.detached_since > config.peer_timeout:
                    await self._drop_link(link)  # connected but never introduced itself
            elif link.welcome is not None:
                continue  # start()/connect() is waiting for the first answer
            elif link.conn.closed or now - link.detached_since > config.peer_timeout:
                await self._reconnect(link)
            else:
                self._send_control_nowait(link, "hello", self._hello_payload())
        for key, relayed in list(self._relayed.items()):
            if relayed.deadline < now:
                del self._relayed[key]

    async def _reconnect(self, link: _Link) -> None:
        assert link.url is not None
        if link.reader is not None:
            await _cancel_and_wait(link.reader)
        await link.conn.close()
        link.detached_since = time.monotonic()
        try:
            conn = await get_transport(link.url, self._config.transport).connect(link.url)
        except ConnectError as exc:
            link.failed_reconnects += 1
            level = logging.INFO if link.failed_reconnects == 1 else logging.DEBUG
            log.log(level, "%s: reconnecting to %s failed: %s", self._name, link.url, exc)
            return
        link.failed_reconnects = 0
        log.debug("%s: new connection to %s, saying hello", self._name, link.url)
        self._attach_connection(link, conn)
        self._send_control_nowait(link, "hello", self._hello_payload())

    # ------------------------------------------------------------------------------------------
    # incoming messages

    async def _on_frames(self, link: _Link, frames: list[Buffer]) -> None:
        if not frames:
            raise FrameError("empty message (no frames)")
        envelope = unpack_envelope(frames[0])
        if envelope.channel == CONTROL_CHANNEL:
            self._on_control(link, envelope, frames)
            return
        if not link.attached:
            if link.url is not None:  # our own link, not welcomed (yet again): hello is under way
                self._drop(f"{envelope.kind} from {link.describe()} before its welcome")
                return
            self._drop(f"{envelope.kind} from unknown connection {link.conn.peer}; asking who")
            self._send_control_nowait(link, "who")
            return
        last_hop = envelope.route[-1] if envelope.route else envelope.sender
        if last_hop != link.name:
            self._drop(
                f"message claiming to come from {last_hop!r} arrived over the link of "
                f"{link.name!r} (spoofed)"
            )
            return
        if envelope.receiver != self._name:
            await self._relay(envelope, frames)
        elif envelope.channel == STREAM_CHANNEL:
            assert self._stream is not None
            await self._stream.handle(envelope.sender, frames[1:])
        else:
            try:
                message = self._decode(envelope, frames)
            except ProtocolError as exc:
                self._counters.malformed += 1
                log.warning(
                    "%s: payload from %r does not decode: %s", self._name, envelope.sender, exc
                )
                text = f"payload sent to {self._name!r} does not decode: {exc}"
                await self._answer_error(envelope, "malformed", type(exc).__name__, text)
                return
            self._dispatch(message)

    async def _relay(self, envelope: Envelope, frames: list[Buffer]) -> None:
        if self._name in envelope.route or envelope.sender == self._name:
            path = " → ".join((envelope.sender, *envelope.route, self._name))
            text = f"message for {envelope.receiver!r} is looping: {path}"
            await self._answer_error(envelope, "loop", "RouteLoopError", text)
            return
        try:
            via = self._route(envelope.receiver)
        except UnreachableError as exc:
            await self._answer_error(envelope, "unreachable", "UnreachableError", str(exc))
            return
        assert via is not None
        relayed = replace(envelope, route=(*envelope.route, self._name))
        if envelope.kind == "request":
            requester = envelope.route[-1] if envelope.route else envelope.sender
            timeout = envelope.headers.get(TIMEOUT_HEADER)
            if not isinstance(timeout, (int, float)) or isinstance(timeout, bool):
                timeout = self._config.peer_timeout
            self._relayed[(envelope.msg_id, envelope.receiver)] = _Relayed(
                envelope, requester, via, time.monotonic() + float(timeout)
            )
        elif envelope.correlation_id is not None:
            target = envelope.headers.get(FOR_HEADER, envelope.sender)
            if isinstance(target, str):
                self._relayed.pop((envelope.correlation_id, target), None)
        try:
            await self._transmit_frames(relayed, [pack_envelope(relayed), *frames[1:]], via)
        except UnreachableError as exc:
            self._relayed.pop((envelope.msg_id, envelope.receiver), None)
            await self._answer_error(envelope, "unreachable", "UnreachableError", str(exc))
            return
        self._counters.relayed += 1

    # ------------------------------------------------------------------------------------------
    # the hop-by-hop control protocol

    def _hello_payload(self) -> dict[str, Any]:
        return {"name": self._name, "claims": self._claims}

    def _control_frames(self, link: _Link, topic: str, payload: Any = None) -> list[Buffer]:
        envelope = Envelope(
            sender=self._name, receiver=link.name or "", channel=CONTROL_CHANNEL, topic=topic
        )
        return to_wire(Message(envelope, payload))

    def _send_control_nowait(self, link: _Link, topic: str, payload: Any = None) -> None:
        try:
            link.conn.send_nowait(self._control_frames(link, topic, payload))
        except TransportError as exc:  # full queue, closed, or the peer vanished
            log.debug("%s: %s to %s not sent: %s", self._name, topic, link.describe(), exc)
            return
        self._counters.sent += 1

    def _on_control(self, link: _Link, envelope: Envelope, frames: list[Buffer]) -> None:
        topic = envelope.topic
        if topic == "ping":
            if not link.attached and link.url is None:
                self._send_control_nowait(link, "who")
            return
        payload = self._decode(envelope, frames).payload
        if topic == "hello" and link.url is None:
            self._on_hello(link, payload)
        elif topic == "welcome" and link.url is not None:
            self._on_welcome(link, payload)
        elif topic == "refused" and link.url is not None:
            reason = payload.get("reason") if isinstance(payload, dict) else None
            error = CellError(f"{link.url} refused {self._name!r}: {reason}")
            if link.welcome is not None and not link.welcome.done():
                link.welcome.set_exception(error)
            else:
                log.error("%s: %s", self._name, error)
        elif topic == "who" and link.url is not None:
            self._link_lost(link, "it does not know this cell (restarted?)")
            self._send_control_nowait(link, "hello", self._hello_payload())
        elif topic == "bye":
            self._link_lost(link, _GOODBYE)
            if link.url is None:
                self._spawn(self._drop_link(link))
        else:
            raise FrameError(f"unexpected control message {topic!r} from {link.describe()}")

    def _on_hello(self, link: _Link, payload: Any) -> None:
        if not (
            isinstance(payload, dict)
            and isinstance(payload.get("name"), str)
            and isinstance(payload.get("claims"), dict)
        ):
            raise FrameError(f"malformed hello from {link.conn.peer}")
        try:
            claimed = validate_cell_name(payload["name"])
            hello = Hello(
                claimed, payload["claims"], link.conn.peer, link.conn.authenticated_identity
            )
            name = validate_cell_name(
                self._authenticate(hello) if self._authenticate is not None else claimed
            )
        except Exception as exc:
            self._refuse(link, f"hello not accepted: {exc}")
            return
        if name == self._name:
            self._refuse(link, f"{name!r} is the name of the cell it connects to")
            return
        holder = self._neighbours.get(name)
        if holder is not None and holder is not link:
            silent = time.monotonic() - holder.last_seen
            if silent <= 2 * self._config.heartbeat_interval and not holder.conn.closed:
                self._refuse(link, f"name {name!r} is taken by a live cell at {self._name!r}")
                return
            self._link_lost(holder, "replaced by a new connection claiming its name")
            self._spawn(self._drop_link(holder))
        if link.attached and link.name != name:
            self._link_lost(link, f"it now calls itself {name!r}")
        elif link.attached:
            # An opener says hello on a link we hold only after it lost the link and took it
            # back (ZeroMQ reconnected a cut connection): losing it failed the streams it was
            # sending us, but their CANCEL could not reach us. Without this they would hold the
            # admission budget until they stall. Its new streams open after our welcome, so
            # after every hello of this reconnection: none of them is cancelled here.
            self._cancel_inbound_streams(name, "lost the link and said hello again")
        link.name = name
        self._send_control_nowait(link, "welcome", {"name": self._name})
        if not link.attached:
            link.attached = True
            self._neighbours[name] = link
            log.info("%s: %r joined from %s", self._name, name, link.conn.peer)
            self._notify_peer(name, "joined")

    def _refuse(self, link: _Link, reason: str) -> None:
        log.warning("%s: refused %s: %s", self._name, link.conn.peer, reason)
        self._send_control_nowait(link, "refused", {"reason": reason})

    def _on_welcome(self, link: _Link, payload: Any) -> None:
        name = payload.get("name") if isinstance(payload, dict) else None
        name = validate_cell_name(name) if isinstance(name, str) else None
        if name is None:
            raise FrameError(f"malformed welcome from {link.conn.peer}")
        holder = self._neighbours.get(name)
        if (holder is not None and holder is not link) or name == self._name:
            error = CellError(f"{link.url} is cell {name!r}, already linked to {self._name!r}")
            if link.welcome is not None and not link.welcome.done():
                link.welcome.set_exception(error)
            else:
                log.error("%s: %s", self._name, error)
            return
        if link.attached:
            return  # an answer to a repeated hello
        link.name = name
        link.attached = True
        self._neighbours[name] = link
        if link.welcome is not None and not link.welcome.done():
            link.welcome.set_result(name)
        log.info("%s: linked to %r at %s", self._name, name, link.url)
        self._notify_peer(name, "joined")

    # ------------------------------------------------------------------------------------------
    # tasks

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("%s: background task failed", self._name, exc_info=task.exception())


async def _cancel_and_wait(task: asyncio.Task[Any]) -> None:
    """Cancel ``task`` and wait for it to end, without swallowing a cancellation of the caller
    (``await task`` inside ``suppress(CancelledError)`` would: stop() could then hang)."""
    task.cancel()
    await asyncio.wait([task])


def _fail_unless_done(future: asyncio.Future[Any], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)


class _ReplySinkGuard(ArraySink):
    """A request's reply sink, cut off once the request stopped waiting (timed out, abandoned,
    its broadcast closed): the next piece fails the stream, and the sender is told to stop. A
    failing reply stream fails the request with the stream's error. Once its stream ended it
    drops the sink and the request: whatever still holds the finished stream must not keep the
    requester's state alive (a fold and the model it holds)."""

    def __init__(
        self, sink: ArraySink, future: asyncio.Future[Any], waiting: Callable[[], bool]
    ) -> None:
        self._sink: ArraySink | None = sink
        self._future: asyncio.Future[Any] | None = future
        self._waiting = waiting

    def _live(self) -> ArraySink:
        if self._sink is None or self._future is None or self._future.done() or not self._waiting():
            raise StreamCancelledError("the request no longer waits for this reply")
        return self._sink

    def write(self, frame: int, start: int, data: memoryview) -> None:
        self._live().write(frame, start, data)

    def finish(self) -> Any:
        sink = self._live()
        try:
            return sink.finish()
        finally:
            self._forget()

    def abort(self, error: StreamError) -> None:
        sink, future, waiting = self._sink, self._future, self._waiting()
        self._forget()
        try:
            if sink is not None:
                sink.abort(error)
        finally:
            if future is not None and waiting:  # else nobody will ever read its exception
                _fail_unless_done(future, error)

    def _forget(self) -> None:
        self._sink = None
        self._future = None


def _fail_streams(
    futures: Mapping[str, asyncio.Future[Any]],
    streaming: asyncio.Future[dict[str, BaseException | None]],
) -> None:
    """Fail the reply futures of the targets a background broadcast stream could not reach."""
    if streaming.cancelled():
        return
    failure = streaming.exception()
    if failure is not None:
        for waiting in futures.values():
            _fail_unless_done(waiting, failure)
        return
    for name, error in streaming.result().items():
        pending = futures.get(name)  # absent: its reply was already handed over
        if error is not None and pending is not None:
            _fail_unless_done(pending, error)


def _error_from_payload(payload: Any, sender: str) -> CellError:
    if not isinstance(payload, dict) or not isinstance(payload.get("message"), str):
        return RemoteError(f"malformed error reply from {sender!r}: {payload!r:.200}", "FrameError")
    kind = payload.get("kind")
    text: str = payload["message"]
    if kind == "unreachable":
        return UnreachableError(text)
    if kind == "loop":
        return RouteLoopError(text)
    if kind == "no-handler":
        return NoHandlerError(text)
    remote_type = payload.get("type")
    return RemoteError(text, remote_type if isinstance(remote_type, str) else "Exception")
