"""The transport interface: what every byte mover provides.

A transport moves *messages*, each a list of frames (byte buffers), between two endpoints. It
knows nothing of cells, names or payload types: the cell layer and the wire codec sit on top.

Contract (checked for every implementation by :func:`fedcell.transports.testing.check_transport`):

- ``Transport.listen(url)`` returns a :class:`Listener`; ``Listener.url`` is the address peers
  connect to (a ``tcp://127.0.0.1:0`` listener reports the port it was given).
  ``Listener.accept()`` returns one :class:`Connection` per connecting peer.
- ``Transport.connect(url)`` returns a :class:`Connection`. Connecting may complete before the
  listener exists (ZeroMQ semantics): frames queue until the peer is there, bounded by the queue.
- Frames of one message arrive together and in order; messages on one connection keep their order.
- Backpressure is explicit: ``send`` waits while the outgoing queue is full; ``send_nowait`` raises
  :class:`~fedcell.errors.WouldBlockError` instead. Queues are bounded (``queue_size`` messages).
- Frames handed to ``send`` must not be mutated until ``send`` returns (transports may send them
  without copying). ``recv`` returns read-only or private ``memoryview``/``bytes`` frames.
- After ``close()``, ``send``/``recv`` raise :class:`~fedcell.errors.TransportClosedError`;
  a peer's ``recv`` raises it too once the transport knows the other side is gone (in-process);
  over ZeroMQ loss of a peer is detected by the cell layer's heartbeats.
- ``statistics()`` reports counters without side effects.
- State listeners get ``"connected"``/``"disconnected"`` as the transport observes them (a ZeroMQ
  client sees the server restart as disconnected → connected; the socket reconnects by itself).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal

if TYPE_CHECKING:
    from fedcell.transports.zmq_security import CurveSecurity

__all__ = [
    "Buffer",
    "Connection",
    "ConnectionState",
    "ConnectionStats",
    "Listener",
    "Transport",
    "TransportOptions",
]

Buffer = bytes | bytearray | memoryview
ConnectionState = Literal["connected", "disconnected"]
StateListener = Callable[[ConnectionState], None]


@dataclass(frozen=True, slots=True)
class TransportOptions:
    """Tunables shared by all transports.

    Attributes
    ----------
    queue_size:
        Messages that may wait in each direction before ``send`` blocks (ZeroMQ high-water mark).
    copy_threshold:
        Frames at least this large are sent without copying (ZeroMQ ``copy=False``).
    security:
        CurveZMQ credentials (:class:`~fedcell.transports.zmq_security.CurveSecurity`): the ZeroMQ
        transport then encrypts every link and admits only peers the credentials authorize.
        ``None``: plaintext. The in-process transport ignores it (nothing leaves the process).
    """

    queue_size: int = 1000
    copy_threshold: int = 64 * 1024
    security: CurveSecurity | None = None


@dataclass(slots=True)
class ConnectionStats:
    """Counters of one connection (messages and payload bytes, both directions)."""

    messages_sent: int = 0
    messages_received: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0


class Connection(abc.ABC):
    """One bidirectional, ordered, message-framed channel to a peer."""

    #: A human-readable name of the remote end (URL or peer identity), for error messages.
    peer: str
    #: The name the transport authenticated the remote end as (under CurveZMQ, the ZAP user id
    #: of an accepted peer); ``None`` where the transport does not authenticate peers.
    authenticated_identity: str | None = None

    def __init__(self) -> None:
        self._stats = ConnectionStats()
        self._state_listeners: list[StateListener] = []

    @abc.abstractmethod
    async def send(self, frames: Sequence[Buffer]) -> None:
        """Send one message; wait while the outgoing queue is full."""

    @abc.abstractmethod
    def send_nowait(self, frames: Sequence[Buffer]) -> None:
        """Send one message or raise ``WouldBlockError`` if the outgoing queue is full."""

    @abc.abstractmethod
    async def recv(self) -> list[Buffer]:
        """Receive the next message's frames."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Close this end. Idempotent."""

    @property
    @abc.abstractmethod
    def closed(self) -> bool:
        """Whether :meth:`close` was called or the transport knows the peer is gone."""

    def statistics(self) -> ConnectionStats:
        """A snapshot of this connection's counters."""
        s = self._stats
        return ConnectionStats(s.messages_sent, s.messages_received, s.bytes_sent, s.bytes_received)

    def add_state_listener(self, listener: StateListener) -> None:
        """Call ``listener("connected" | "disconnected")`` when the link changes state."""
        self._state_listeners.append(listener)

    def _notify_state(self, state: ConnectionState) -> None:
        for listener in list(self._state_listeners):
            listener(state)

    def _count_sent(self, frames: Sequence[Buffer]) -> None:
        self._stats.messages_sent += 1
        self._stats.bytes_sent += sum(memoryview(f).nbytes for f in frames)

    def _count_received(self, frames: Sequence[Buffer]) -> None:
        self._stats.messages_received += 1
        self._stats.bytes_received += sum(memoryview(f).nbytes for f in frames)


class Listener(abc.ABC):
    """A bound address that yields one :class:`Connection` per connecting peer."""

    #: The address peers connect to (with the real port when the URL asked for port 0).
    url: str

    @abc.abstractmethod
    async def accept(self) -> Connection:
        """Wait for the next peer; raises ``TransportClosedError`` once closed."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop listening and close every accepted connection. Idempotent."""


class Transport(abc.ABC):
    """A byte mover for one or more URL schemes. Instances are cheap and stateless."""

    schemes: ClassVar[tuple[str, ...]]

    def __init__(self, options: TransportOptions | None = None) -> None:
        self.options = options or TransportOptions()

    @abc.abstractmethod
    async def listen(self, url: str) -> Listener:
        """Bind ``url`` and return a listener."""

    @abc.abstractmethod
    async def connect(self, url: str) -> Connection:
        """Connect to ``url`` and return a connection."""
