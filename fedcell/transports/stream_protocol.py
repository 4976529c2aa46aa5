"""The stream wire protocol: control headers, their validation, and chunk checksums.

Every stream frame list starts with one msgpack control header (frame 0); only ``DATA`` carries
more frames (the chunk's bytes). The cell adds its own envelope around the list, so a header
names its stream by a sender-chosen 64-bit id; the receiving endpoint keys streams by
``(peer, id)``. The header type says which side's table it addresses: ``OPEN``/``DATA``/``END``
go to the receiver's inbound table, ``GRANT``/``QUEUED``/``ACK``/``DONE`` to the sender's outbound
table, and ``CANCEL`` names the side that sent it.

::

    sender                                   receiver
    OPEN  sid size chunk window codec layout ──▶   admit (budget) or queue
                                        ◀── QUEUED sid        (repeated while it waits)
                                        ◀── GRANT  sid        (arrays / temp file ready)
    DATA  sid seq off raw codec h  + frames ──▶   verify h, decompress, write in place
                                        ◀── ACK    sid upto   (raw bytes written, every window/4)
    END   sid chunks size digest           ──▶   verify digest, deliver
                                        ◀── DONE   sid
    CANCEL sid side code reason            ◀─▶   either side, any time

Integers are msgpack 64-bit (no 32-bit length anywhere: a 5 GiB file is one stream). ``h`` is the
xxh3_64 of the chunk's *wire* bytes (checked before a compressed chunk reaches the decompressor).
``digest`` is a :class:`StreamDigest`: the xxh3_128 over every chunk's *raw-content* xxh3_64, in
order. An uncompressed chunk's raw-content hash is its ``h`` (its wire bytes are its raw bytes),
so each byte is hashed once on each side; a compressed chunk's is the xxh3_64 of its raw bytes
(the sender's before compressing, the receiver's after decompressing, so the digest covers the
codec too). The per-chunk check catches a corrupted chunk as it arrives; the digest, with the
chunk count and size in ``END``, catches a lost, duplicated, reordered or truncated stream and
a codec fault. (Protocol version 1 hashed every raw byte a second time with one xxh3_128 over the
whole content: about 0.04 CPU s/GiB on each side for no extra detection power, since a chunk
whose bytes differ already fails its xxh3_64.) Every field is type- and range-checked by
:func:`parse_header`; anything malformed raises :class:`~fedcell.errors.FrameError` or
:class:`~fedcell.errors.OversizedError` and the endpoint drops the frame (cancelling the stream it
names, if any) and keeps serving.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import msgpack
import xxhash

from fedcell.errors import FrameError, OversizedError
from fedcell.transports.base import Buffer

__all__ = [
    "PROTOCOL_VERSION",
    "Ack",
    "Cancel",
    "CancelCode",
    "ControlHeader",
    "Data",
    "Done",
    "End",
    "Grant",
    "Open",
    "Queued",
    "StreamDigest",
    "StreamKind",
    "chunk_hash",
    "pack_header",
    "parse_header",
    "peek_header",
]

PROTOCOL_VERSION = 2
_MAX_U64 = 2**64 - 1

StreamKind = Literal["message", "file"]
CancelCode = Literal["cancelled", "integrity", "stalled", "protocol", "refused", "closed"]
_KINDS: frozenset[str] = frozenset(("message", "file"))
_CODES: frozenset[str] = frozenset(
    ("cancelled", "integrity", "stalled", "protocol", "refused", "closed")
)


@dataclass(frozen=True, slots=True)
class Open:
    """Announces a stream. ``layout`` is the message envelope + codec tree (message streams) or
    the packed ``{"name", "channel", "meta"}`` description (file streams)."""

    sid: int
    kind: StreamKind
    size: int
    chunk: int
    window: int
    codec: str
    envelope: bytes
    layout: bytes


@dataclass(frozen=True, slots=True)
class Grant:
    sid: int


@dataclass(frozen=True, slots=True)
class Queued:
    sid: int


@dataclass(frozen=True, slots=True)
class Data:
    sid: int
    seq: int
    offset: int
    raw: int
    codec: str
    hash: int


@dataclass(frozen=True, slots=True)
class Ack:
    sid: int
    upto: int


@dataclass(frozen=True, slots=True)
class End:
    sid: int
    chunks: int
    size: int
    digest: bytes


@dataclass(frozen=True, slots=True)
class Done:
    sid: int


@dataclass(frozen=True, slots=True)
class Cancel:
    sid: int
    side: Literal["sender", "receiver"]
    code: CancelCode
    reason: str


ControlHeader = Open | Grant | Queued | Data | Ack | End | Done | Cancel

_TYPE_OF: dict[type[Any], str] = {
    Open: "open", Grant: "grant", Queued: "queued", Data: "data",
    Ack: "ack", End: "end", Done: "done", Cancel: "cancel",
}  # fmt: skip


def pack_header(header: ControlHeader) -> bytes:
    """Serialize a control header (frame 0 of every stream frame list)."""
    raw: dict[str, Any] = {"v": PROTOCOL_VERSION, "t": _TYPE_OF[type(header)]}
    raw.update((name, getattr(header, name)) for name in header.__slots__)
    return msgpack.packb(raw, use_bin_type=True)  # type: ignore[no-any-return]


def _uint(raw: dict[str, Any], key: str) -> int:
    value = raw.get(key)
    if type(value) is not int or not 0 <= value <= _MAX_U64:
        raise FrameError(f"stream header field {key!r} is missing or not an unsigned integer")
    return value


def _str(raw: dict[str, Any], key: str, limit: int = 256) -> str:
    value = raw.get(key)
    if type(value) is not str or len(value) > limit:
        raise FrameError(f"stream header field {key!r} is missing or not a short string")
    return value


def _bin(raw: dict[str, Any], key: str) -> bytes:
    value = raw.get(key)
    if type(value) is not bytes:
        raise FrameError(f"stream header field {key!r} is missing or not bytes")
    return value


def parse_header(frame: Buffer, max_header_bytes: int) -> ControlHeader:
    """Parse and validate a control header.

    Raises
    ------
    OversizedError
        If the frame is larger than ``max_header_bytes``.
    FrameError
        If it does not decode, has an unknown type or version, or a field is missing or invalid.
    """
    size = memoryview(frame).nbytes
    if size > max_header_bytes:
        raise OversizedError(f"stream header is {size} bytes, above the {max_header_bytes} limit")
    try:
        raw = msgpack.unpackb(frame, raw=False)
    except Exception as exc:
        raise FrameError(f"stream header does not decode: {exc}") from exc
    if not isinstance(raw, dict):
        raise FrameError("stream header is not a map")
    if raw.get("v") != PROTOCOL_VERSION:
        raise FrameError(f"unsupported stream protocol version {raw.get('v')!r}")
    kind = raw.get("t")
    sid = _uint(raw, "sid")
    if kind == "data":
        return Data(sid, _uint(raw, "seq"), _uint(raw, "offset"), _uint(raw, "raw"),
                    _str(raw, "codec"), _uint(raw, "hash"))  # fmt: skip
    if kind == "ack":
        return Ack(sid, _uint(raw, "upto"))
    if kind == "open":
        stream_kind = _str(raw, "kind")
        if stream_kind not in _KINDS:
            raise FrameError(f"unknown stream kind {stream_kind!r}")
        return Open(
            sid, stream_kind, _uint(raw, "size"), _uint(raw, "chunk"),  # type: ignore[arg-type]
            _uint(raw, "window"), _str(raw, "codec"), _bin(raw, "envelope"), _bin(raw, "layout"),
        )  # fmt: skip
    if kind == "end":
        return End(sid, _uint(raw, "chunks"), _uint(raw, "size"), _bin(raw, "digest"))
    if kind == "cancel":
        side = _str(raw, "side")
        code = _str(raw, "code")
        if side not in ("sender", "receiver") or code not in _CODES:
            raise FrameError(f"bad cancel side/code {side!r}/{code!r}")
        return Cancel(sid, side, code, _str(raw, "reason", 4096))  # type: ignore[arg-type]
    if kind == "grant":
        return Grant(sid)
    if kind == "queued":
        return Queued(sid)
    if kind == "done":
        return Done(sid)
    raise FrameError(f"unknown stream header type {kind!r}")


def peek_header(frame: Buffer) -> tuple[str, int] | None:
    """``(type, stream id)`` of a header that :func:`parse_header` refused, if they can be read.

    :func:`pack_header` writes ``v``, ``t`` and ``sid`` first, so they are in the first bytes even
    of an oversized header; this lets the receiver fail the stream a bad header names (and tell
    its sender why) instead of leaving it to stall.
    """
    unpacker = msgpack.Unpacker(raw=False, max_buffer_size=256)
    try:
        unpacker.feed(memoryview(frame)[:128])
        fields = {}
        for _ in range(min(3, unpacker.read_map_header())):
            key = unpacker.unpack()
            fields[key] = unpacker.unpack()
    except Exception:
        return None
    kind, sid = fields.get("t"), fields.get("sid")
    if type(kind) is str and type(sid) is int and 0 <= sid <= _MAX_U64:
        return kind, sid
    return None


def chunk_hash(frames: Sequence[Buffer]) -> int:
    """xxh3_64 of the concatenation of ``frames`` (without concatenating them)."""
    if len(frames) == 1:
        return xxhash.xxh3_64_intdigest(frames[0])
    hasher = xxhash.xxh3_64()
    for frame in frames:
        hasher.update(frame)
    return hasher.intdigest()


class StreamDigest:
    """The whole-stream checksum carried by ``END``: xxh3_128 over the chunks' raw-content
    xxh3_64 values (8 bytes little-endian each), in chunk order (see the module docstring)."""

    __slots__ = ("_hasher",)

    def __init__(self) -> None:
        self._hasher = xxhash.xxh3_128()

    def add(self, raw_hash: int) -> None:
        """Fold in the next chunk's raw-content xxh3_64."""
        self._hasher.update(raw_hash.to_bytes(8, "little"))

    def digest(self) -> bytes:
        """The 16-byte digest of the chunks added so far."""
        return self._hasher.digest()
