"""Messages between cells and their wire form.

A :class:`Message` is a frozen, slotted dataclass: addressing and correlation headers plus a
payload (any value the :mod:`~fedcell.transports.codec` carries). Its wire form is a list of frames::

    frame 0   envelope   msgpack map: v, id, src, dst, ch, tp, k, cid, rt, h
    frame 1   payload    msgpack tree from codec.encode (ext nodes for arrays/tuples/dataclasses)
    frame 2+  buffers    raw array bytes, referenced by index from the tree

The envelope is separate so a relaying cell rewrites only frame 0 (appending itself to the route)
and forwards the payload frames untouched, without decoding them — the server never needs to
understand (or be able to read) what it relays.

:func:`to_wire` / :func:`from_wire` are the only conversion points; each validates every field and
raises :class:`~fedcell.errors.FrameError` naming the bad one.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, get_args

import msgpack

from fedcell.errors import FrameError, OversizedError
from fedcell.transports import codec
from fedcell.transports.base import Buffer

__all__ = [
    "WIRE_VERSION",
    "Envelope",
    "Message",
    "MessageKind",
    "from_wire",
    "new_id",
    "pack_envelope",
    "to_wire",
    "unpack_envelope",
]

WIRE_VERSION = 1
MAX_ENVELOPE_BYTES = 64 * 1024

MessageKind = Literal["oneway", "request", "reply", "error"]
_KINDS = frozenset(get_args(MessageKind))
HeaderValue = str | int | float | bool | None


def new_id() -> str:
    """A fresh 128-bit message id as hex."""
    return os.urandom(16).hex()


@dataclass(frozen=True, slots=True)
class Envelope:
    """Addressing and correlation headers of a message (everything but the payload)."""

    sender: str
    receiver: str
    channel: str
    topic: str = ""
    kind: MessageKind = "oneway"
    msg_id: str = field(default_factory=new_id)
    correlation_id: str | None = None
    route: tuple[str, ...] = ()
    headers: Mapping[str, HeaderValue] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Message:
    """A message between cells: an :class:`Envelope` plus a payload."""

    envelope: Envelope
    payload: Any = None

    @classmethod
    def create(
        cls,
        sender: str,
        receiver: str,
        channel: str,
        payload: Any = None,
        *,
        topic: str = "",
        kind: MessageKind = "oneway",
        correlation_id: str | None = None,
        headers: Mapping[str, HeaderValue] | None = None,
    ) -> Message:
        env = Envelope(
            sender=sender,
            receiver=receiver,
            channel=channel,
            topic=topic,
            kind=kind,
            correlation_id=correlation_id,
            headers=dict(headers or {}),
        )
        return cls(env, payload)

    # Shortcuts for the most read headers.
    @property
    def sender(self) -> str:
        return self.envelope.sender

    @property
    def receiver(self) -> str:
        return self.envelope.receiver

    @property
    def channel(self) -> str:
        return self.envelope.channel

    @property
    def topic(self) -> str:
        return self.envelope.topic

    @property
    def kind(self) -> MessageKind:
        return self.envelope.kind

    def reply(self, payload: Any = None, *, error: bool = False) -> Message:
        """A reply to this request, addressed back to its sender."""
        env = Envelope(
            sender=self.envelope.receiver,
            receiver=self.envelope.sender,
            channel=self.envelope.channel,
            topic=self.envelope.topic,
            kind="error" if error else "reply",
            correlation_id=self.envelope.msg_id,
        )
        return Message(env, payload)

    def with_route(self, hop: str) -> Message:
        return Message(replace(self.envelope, route=(*self.envelope.route, hop)), self.payload)


def pack_envelope(env: Envelope) -> bytes:
    return msgpack.packb(  # type: ignore[no-any-return]
        {
            "v": WIRE_VERSION,
            "id": env.msg_id,
            "src": env.sender,
            "dst": env.receiver,
            "ch": env.channel,
            "tp": env.topic,
            "k": env.kind,
            "cid": env.correlation_id,
            "rt": list(env.route),
            "h": dict(env.headers),
        },
        use_bin_type=True,
    )


def _typed(raw: Mapping[str, Any], key: str, kind: type, name: str) -> Any:
    value = raw.get(key)
    if type(value) is not kind:
        raise FrameError(f"message envelope field {name!r} is missing or not a {kind.__name__}")
    return value


def unpack_envelope(frame: Buffer) -> Envelope:
    """Parse and validate frame 0."""
    size = memoryview(frame).nbytes
    if size > MAX_ENVELOPE_BYTES:
        raise OversizedError(f"message envelope is {size} bytes, above {MAX_ENVELOPE_BYTES}")
    try:
        raw = msgpack.unpackb(frame, raw=False)
    except Exception as exc:
        raise FrameError(f"message envelope does not decode: {exc}") from exc
    if not isinstance(raw, dict):
        raise FrameError("message envelope is not a map")
    if raw.get("v") != WIRE_VERSION:
        raise FrameError(f"unsupported wire version {raw.get('v')!r} (this side speaks 1)")
    kind: MessageKind = raw.get("k")  # type: ignore[assignment]
    if kind not in _KINDS:
        raise FrameError(f"unknown message type {kind!r}")
    route = _typed(raw, "rt", list, "route")
    if not all(isinstance(hop, str) for hop in route):
        raise FrameError("message route holds a non-string hop")
    headers = _typed(raw, "h", dict, "headers")
    if not all(isinstance(k, str) for k in headers) or not all(
        v is None or isinstance(v, (str, int, float, bool)) for v in headers.values()
    ):
        raise FrameError("message headers must map strings to scalars")
    cid = raw.get("cid")
    if cid is not None and not isinstance(cid, str):
        raise FrameError("message envelope field 'correlation_id' is not a string")
    return Envelope(
        sender=_typed(raw, "src", str, "sender"),
        receiver=_typed(raw, "dst", str, "receiver"),
        channel=_typed(raw, "ch", str, "channel"),
        topic=_typed(raw, "tp", str, "topic"),
        kind=kind,
        msg_id=_typed(raw, "id", str, "msg_id"),
        correlation_id=cid,
        route=tuple(route),
        headers=headers,
    )


def to_wire(msg: Message) -> list[Buffer]:
    """Frames for ``msg`` (raises ``EncodeError`` for an unsupported payload)."""
    tree, buffers = codec.encode(msg.payload)
    return [pack_envelope(msg.envelope), codec.pack_tree(tree), *buffers]


def from_wire(frames: Sequence[Buffer], max_tree_bytes: int = codec.DEFAULT_MAX_TREE_BYTES) -> Message:
    """Rebuild a message from its frames (raises ``FrameError``/``OversizedError``)."""
    if len(frames) < 2:
        raise FrameError(f"a message needs at least 2 frames, got {len(frames)}")
    env = unpack_envelope(frames[0])
    tree = codec.unpack_tree(frames[1], max_tree_bytes)
    return Message(env, codec.decode(tree, frames[2:]))
