"""The one exception tree of fedcell.

Every error fedcell raises derives from :class:`FedcellError`. Library errors (pyzmq, msgpack,
blosc2, OS errors) are mapped at the boundary with ``raise ... from exc`` so callers catch one
tree. Each class says whether retrying the same operation can succeed (``retryable``).

::

    FedcellError
    ├── ConfigError                 bad configuration or arguments (fatal)
    ├── TransportError              moving bytes failed
    │   ├── UnknownSchemeError      no transport registered for the URL scheme
    │   ├── TransportClosedError    the connection/listener is closed
    │   ├── WouldBlockError         send_nowait on a full queue (retryable)
    │   └── ConnectError            could not connect/listen (retryable)
    ├── ProtocolError               malformed input from the network (receiver keeps serving)
    │   ├── FrameError              a frame or header that does not decode
    │   └── OversizedError          a header or message above the configured limit
    ├── EncodeError                 the sender asked to send something the codec refuses
    ├── CellError                   addressing and request/reply
    │   ├── UnreachableError        no route to the named cell, or it is gone
    │   ├── RouteLoopError          a relayed message came back to a cell on its route
    │   ├── RequestTimeoutError     no reply within the timeout (retryable)
    │   └── RemoteError             the remote handler raised; carries its message
    │       └── NoHandlerError      the remote cell has no handler for the channel/topic
    ├── StreamError                 the stream layer
    │   ├── StreamIntegrityError    checksum mismatch or truncated stream
    │   ├── StreamStalledError      no progress within the stall bound (retryable)
    │   └── StreamCancelledError    either side cancelled
    ├── JobError                    jobs and tasks
    │   ├── TaskFailedError         user code raised (Failed)
    │   ├── SiteCrashedError        the site was lost (Crashed)
    │   ├── TooFewResultsError      fewer sites answered ok than a task's min_responses
    │   ├── JobAbortedError         aborted by an admin or by the scheduler
    │   └── CheckpointError         a checkpoint is torn, corrupt, foreign, or cannot be written
    └── SecurityError
        ├── AuthenticationError     no valid credentials
        ├── PolicyError             the site's policy refuses the action
        └── SealError               a sealed message does not open (tampered, not for this
                                    cell, replayed, expired, or signed by an unknown sender)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

__all__ = [
    "AuthenticationError",
    "CellError",
    "CheckpointError",
    "ConfigError",
    "ConnectError",
    "EncodeError",
    "FedcellError",
    "FrameError",
    "JobAbortedError",
    "JobError",
    "NoHandlerError",
    "OversizedError",
    "PolicyError",
    "ProtocolError",
    "RemoteError",
    "RequestTimeoutError",
    "RouteLoopError",
    "SealError",
    "SecurityError",
    "SiteCrashedError",
    "StreamCancelledError",
    "StreamError",
    "StreamIntegrityError",
    "StreamStalledError",
    "TaskFailedError",
    "TooFewResultsError",
    "TransportClosedError",
    "TransportError",
    "UnknownSchemeError",
    "UnreachableError",
    "WouldBlockError",
]


class FedcellError(Exception):
    """Root of every fedcell error."""

    retryable: ClassVar[bool] = False


class ConfigError(FedcellError, ValueError):
    """A configuration, job definition or argument is invalid."""


class TransportError(FedcellError):
    """Moving bytes between endpoints failed."""


class UnknownSchemeError(TransportError, ConfigError):
    """No transport is registered for a URL scheme."""


class TransportClosedError(TransportError):
    """The connection or listener is closed."""


class WouldBlockError(TransportError):
    """``send_nowait`` found the outgoing queue full."""

    retryable = True


class ConnectError(TransportError):
    """Could not connect to, or listen on, an address."""

    retryable = True


class ProtocolError(FedcellError):
    """Input from the network is malformed; the receiver drops it and keeps serving."""


class FrameError(ProtocolError):
    """A frame or header does not decode."""


class OversizedError(ProtocolError):
    """A header or message is larger than the configured limit."""


class EncodeError(FedcellError, TypeError):
    """The codec refuses a value (unsupported type, non-string key, ...)."""


class CellError(FedcellError):
    """Addressing, routing or request/reply between cells failed."""


class UnreachableError(CellError):
    """No route to the named cell, or the cell is gone."""


class RouteLoopError(CellError):
    """A relayed message reached a cell already on its route."""


class RequestTimeoutError(CellError, TimeoutError):
    """No reply arrived within the timeout."""

    retryable = True


class RemoteError(CellError):
    """The remote handler raised; ``remote_type`` names its exception class."""

    def __init__(self, message: str, remote_type: str = "Exception") -> None:
        super().__init__(message)
        self.remote_type = remote_type


class NoHandlerError(RemoteError):
    """The remote cell has no handler registered for the request's channel and topic."""

    def __init__(self, message: str) -> None:
        super().__init__(message, remote_type="NoHandlerError")


class StreamError(FedcellError):
    """A stream failed."""


class StreamIntegrityError(StreamError):
    """A chunk or the whole stream failed its checksum, or the stream is truncated."""


class StreamStalledError(StreamError, TimeoutError):
    """A stream made no progress within its stall bound."""

    retryable = True


class StreamCancelledError(StreamError):
    """The sender or the receiver cancelled the stream."""


class JobError(FedcellError):
    """A job or one of its tasks did not finish."""


class TaskFailedError(JobError):
    """User code raised while running a task (the job state is *failed*)."""


class SiteCrashedError(JobError):
    """A site was lost while running a task (the job state is *crashed*)."""

    retryable = True


class TooFewResultsError(JobError):
    """Fewer sites answered a task ok than its ``min_responses``.

    ``results`` holds every target's ``fedcell.engine.dispatcher.TaskResult`` (data dropped), so
    the caller can say who dropped and why.
    """

    def __init__(self, message: str, results: Sequence[Any] = ()) -> None:
        super().__init__(message)
        self.results = tuple(results)


class JobAbortedError(JobError):
    """The job was aborted by an admin or by the scheduler."""


class CheckpointError(JobError):
    """A job checkpoint cannot be read back (torn, corrupt, or written for another job) or
    cannot be written (a value the codec does not carry, a disk error)."""


class SecurityError(FedcellError):
    """Authentication or authorization failed."""


class AuthenticationError(SecurityError):
    """The peer has no valid credentials."""


class PolicyError(SecurityError):
    """The site's policy refuses the action; the message says which rule."""


class SealError(SecurityError):
    """A sealed (end-to-end encrypted) message does not open: tampered, addressed to another
    cell, replayed, expired, or signed by a sender the project CA does not vouch for."""
