"""The sending half of the stream layer: chunk sources, the chunk encoder, the per-peer window.

A stream's bytes come from a :class:`ChunkSource`: the raw buffers of an encoded message
(:class:`PayloadSource`, zero-copy read-only ``memoryview`` slices of the arrays, which a
transport may send without copying or waiting for their release; a chunk that spans arrays is
several slices, never concatenated) or a file (:class:`FileSource`, a ring of buffers filled with ``preadv`` and reused once their chunk is acked,
so memory is bounded by the window whatever the file size).

The :class:`ChunkEncoder` turns chunk ``seq`` into an :class:`EncodedChunk` exactly once: it
hashes the raw bytes (xxh3_64) into the :class:`~fedcell.transports.stream_protocol.StreamDigest`,
compresses (when the stream's codec is not ``none`` and the chunk shrinks by at least
:data:`MIN_SHRINK`) and hashes the compressed bytes; a chunk sent raw reuses its raw hash as its
wire hash, so each byte is read once. A broadcast hands the same :class:`EncodedChunk` to every
peer. A :class:`FileSource` also hashes the file's content (xxh3_128, what ``send_file`` returns).

Each peer has its own :class:`OutboundStream`: a window of ``window`` raw bytes. ``send_chunk``
waits until ``sent - acked + chunk.raw <= window`` before sending, so the bytes in flight never
exceed the window (:attr:`OutboundStream.peak_in_flight` records the maximum). Every control frame
from the receiver (``QUEUED``, ``GRANT``, ``ACK``, ``DONE``) counts as progress; the endpoint's
watchdog fails a stream that makes none for ``stall_timeout``. Acks also feed the link throughput
estimate (wire bytes acked per second) that the codec choice uses for the next stream.
"""

from __future__ import annotations

import asyncio
import bisect
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import xxhash

from fedcell.errors import StreamError
from fedcell.transports import compression
from fedcell.transports.base import Buffer
from fedcell.transports.stream_protocol import StreamDigest, chunk_hash

__all__ = [
    "MIN_SHRINK",
    "ChunkEncoder",
    "ChunkSource",
    "ChunkTape",
    "EncodedChunk",
    "FileSource",
    "OutboundStream",
    "PayloadSource",
]

#: A compressed chunk is sent compressed only if it is at most this fraction of its raw size.
MIN_SHRINK = 0.95
#: A sender that waited for window space this share of a transfer was paced by the link.
LINK_BOUND_SHARE = 0.25
_SAMPLE_SLICES = 4


class ChunkSource(Protocol):
    """Where a stream's raw bytes come from."""

    @property
    def size(self) -> int:
        """Total raw bytes."""

    def read(self, offset: int, length: int) -> list[Buffer]:
        """The raw bytes ``[offset, offset + length)`` as one or more buffers."""

    def typesize_at(self, offset: int) -> int:
        """Itemsize of the data at ``offset`` (the shuffle unit for compression)."""

    def samples(self, nbytes: int) -> list[tuple[Buffer, int]]:
        """About ``nbytes`` spread over the source, as ``(bytes, typesize)`` slices."""

    def release_through(self, acked: int) -> None:
        """Every peer has acked the bytes before ``acked``: their buffers may be reused."""


def _sample_offsets(size: int, nbytes: int) -> list[tuple[int, int]]:
    if size == 0 or nbytes <= 0:
        return []
    piece = max(1, min(size, nbytes) // _SAMPLE_SLICES)
    starts = {(size - piece) * i // max(1, _SAMPLE_SLICES - 1) for i in range(_SAMPLE_SLICES)}
    return [(start, piece) for start in sorted(starts)]


_RELEASED = memoryview(b"")


class PayloadSource:
    """The raw buffers of an encoded message, read as zero-copy slices.

    Each buffer is let go once every peer acked all of it, so a caller that dropped its own
    references to the payload (a server that spilled the global model it broadcasts) gets each
    array's memory back as the stream progresses, not when the slowest peer is done.
    """

    def __init__(self, buffers: list[Buffer], itemsizes: list[int]) -> None:
        # Read-only views: the transport may send them without copying and without waiting
        # for their release (the caller keeps the payload unchanged until the stream is done).
        self._views = [memoryview(b).cast("B").toreadonly() for b in buffers]
        self._released = 0  # buffers before this index were acked by every peer and let go
        self._itemsizes = itemsizes
        self._starts: list[int] = []
        total = 0
        for view in self._views:
            self._starts.append(total)
            total += view.nbytes
        self._size = total

    @property
    def size(self) -> int:
        return self._size

    def _index(self, offset: int) -> int:
        return bisect.bisect_right(self._starts, offset) - 1

    def read(self, offset: int, length: int) -> list[Buffer]:
        pieces: list[Buffer] = []
        index = self._index(offset)
        while length > 0:
            view = self._views[index]
            start = offset - self._starts[index]
            take = min(length, view.nbytes - start)
            if take > 0:
                pieces.append(view[start : start + take])
                offset += take
                length -= take
            index += 1
        return pieces

    def typesize_at(self, offset: int) -> int:
        return self._itemsizes[self._index(offset)] if self._views else 1

    def release_through(self, acked: int) -> None:
        views = self._views
        while (
            self._released < len(views)
            and self._starts[self._released] + views[self._released].nbytes <= acked
        ):
            views[self._released] = _RELEASED
            self._released += 1

    def samples(self, nbytes: int) -> list[tuple[Buffer, int]]:
        out: list[tuple[Buffer, int]] = []
        for start, length in _sample_offsets(self._size, nbytes):
            pieces = self.read(start, length)
            data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
            out.append((data, self.typesize_at(start)))
        return out


class FileSource:
    """A file read chunk by chunk into a ring of reused buffers.

    A buffer is reused only once the receiver has acked the chunk it held (the transport and the
    receiver are done with it then), so memory is the window plus a chunk or two whatever the
    file size, and after the first lap no chunk allocates memory (a fresh 4 MiB allocation per
    chunk would fragment the allocator's heap and page-fault on every lap).
    """

    def __init__(self, path: Path, chunk_size: int) -> None:
        self._fd = os.open(path, os.O_RDONLY)
        try:
            self._size = os.fstat(self._fd).st_size
        except BaseException:
            os.close(self._fd)
            raise
        self.path = path
        self._chunk_size = chunk_size
        self._free: list[bytearray] = []
        self._in_use: deque[tuple[int, bytearray]] = deque()  # (end offset, buffer)
        self._content = xxhash.xxh3_128()

    @property
    def size(self) -> int:
        return self._size

    def read(self, offset: int, length: int) -> list[Buffer]:
        buf = self._free.pop() if self._free else bytearray(self._chunk_size)
        view = memoryview(buf)[:length]
        done = 0
        while done < length:
            n = os.preadv(self._fd, [view[done:]], offset + done)
            if n == 0:
                raise StreamError(f"{self.path} shrank to {offset + done} bytes while streaming")
            done += n
        self._content.update(view)
        self._in_use.append((offset + length, buf))
        # Read-only: the transport sends it without copying or waiting for its release.
        return [view.toreadonly()]

    def release_through(self, acked: int) -> None:
        while self._in_use and self._in_use[0][0] <= acked:
            self._free.append(self._in_use.popleft()[1])

    def typesize_at(self, offset: int) -> int:
        return 1

    def samples(self, nbytes: int) -> list[tuple[Buffer, int]]:
        return [
            (os.pread(self._fd, length, start), 1)
            for start, length in _sample_offsets(self._size, nbytes)
        ]

    def content_digest(self) -> str:
        """Hex xxh3_128 of the bytes read so far (the whole file once every chunk was read:
        the encoder reads each chunk once, in order)."""
        return self._content.hexdigest()

    def close(self) -> None:
        os.close(self._fd)


@dataclass(frozen=True, slots=True)
class EncodedChunk:
    """One chunk ready to send: its wire frames, codec and checksum."""

    seq: int
    offset: int
    raw: int
    codec: str
    frames: list[Buffer]
    hash: int
    wire_nbytes: int


class ChunkEncoder:
    """Encodes a source's chunks in order, once each, and computes the whole-stream digest
    (:class:`~fedcell.transports.stream_protocol.StreamDigest`)."""

    def __init__(self, source: ChunkSource, chunk_size: int, codec_name: str) -> None:
        self.source = source
        self.chunk_size = chunk_size
        self.codec_name = codec_name
        self._codec = compression.get_codec(codec_name)
        self._digest = StreamDigest()
        self._next_seq = 0
        self.chunks = (source.size + chunk_size - 1) // chunk_size
        self.compressed_chunks = 0
        #: Seconds spent reading, compressing and hashing chunks.
        self.seconds = 0.0

    def encode(self, seq: int) -> EncodedChunk:
        """Chunk ``seq`` (must be called for 0, 1, 2, ... in order)."""
        if seq != self._next_seq:
            raise RuntimeError(f"chunks must be encoded in order: got {seq}, want {self._next_seq}")
        self._next_seq += 1
        started = time.perf_counter()
        offset = seq * self.chunk_size
        raw = min(self.chunk_size, self.source.size - offset)
        pieces = self.source.read(offset, raw)
        raw_hash = chunk_hash(pieces)
        self._digest.add(raw_hash)
        frames, codec_name, wire_hash = pieces, compression.NONE, raw_hash
        if self.codec_name != compression.NONE:
            data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
            packed = self._codec.compress(data, self.source.typesize_at(offset))
            if memoryview(packed).nbytes <= raw * MIN_SHRINK:
                frames, codec_name = [packed], self.codec_name
                wire_hash = chunk_hash(frames)
                self.compressed_chunks += 1
        wire = sum(memoryview(f).nbytes for f in frames)
        chunk = EncodedChunk(seq, offset, raw, codec_name, frames, wire_hash, wire)
        self.seconds += time.perf_counter() - started
        return chunk

    def digest(self) -> bytes:
        """The :class:`~fedcell.transports.stream_protocol.StreamDigest` of the chunks encoded so
        far."""
        return self._digest.digest()


class ChunkTape:
    """The encoded chunks of one stream, shared by its peers.

    Each chunk is encoded the first time any peer needs it and kept until every live peer has
    sent it, so peers move independently (a stuck peer does not hold the others back) and no
    chunk is encoded twice. Uncompressed chunks are views of the payload and cost nothing to
    keep; compressed ones cost at most the compressed bytes between the slowest and the fastest
    live peer.
    """

    def __init__(self, encoder: ChunkEncoder, peers: Iterable[str]) -> None:
        self.encoder = encoder
        self._chunks: dict[int, EncodedChunk] = {}
        self._encoded = 0
        self._trimmed = 0
        self._positions = dict.fromkeys(peers, 0)

    @property
    def encoded(self) -> int:
        """How many chunks were encoded."""
        return self._encoded

    def get(self, seq: int) -> EncodedChunk:
        while self._encoded <= seq:
            self._chunks[self._encoded] = self.encoder.encode(self._encoded)
            self._encoded += 1
        return self._chunks[seq]

    def advance(self, peer: str, seq: int) -> None:
        """``peer`` has sent chunk ``seq``."""
        self._positions[peer] = seq + 1
        self._trim()

    def leave(self, peer: str) -> None:
        """``peer`` needs no more chunks (finished or failed)."""
        self._positions.pop(peer, None)
        self._trim()

    def _trim(self) -> None:
        low = min(self._positions.values(), default=self._encoded)
        while self._trimmed < low:
            self._chunks.pop(self._trimmed, None)
            self._trimmed += 1


SendFrames = Callable[[list[Buffer]], Awaitable[None]]


class OutboundStream:
    """One stream to one peer: grant, window, acks, completion, failure."""

    def __init__(self, peer: str, sid: int, size: int, window: int, send: SendFrames) -> None:
        self.peer = peer
        self.sid = sid
        self.size = size
        self.window = window
        self.send = send
        self.granted = False
        self.ended = False
        self.done = False
        self.failure: BaseException | None = None
        #: The peer knows the stream failed (it cancelled, or a CANCEL is posted): send none.
        self.peer_notified = False
        self.sent = 0
        self.acked = 0
        self.peak_in_flight = 0
        self.last_progress = time.monotonic()
        self._wake = asyncio.Event()
        self._marks: deque[tuple[int, int]] = deque()  # (raw end, cumulative wire bytes)
        self._wire_sent = 0
        self._wire_acked = 0
        self._first_send: float | None = None
        self._last_ack: float | None = None
        self._window_wait = 0.0  # seconds the sender waited for window space

    # -- events from the receiver (called by the endpoint's handle, never block) --------------

    def _progress(self) -> None:
        self.last_progress = time.monotonic()
        self._wake.set()

    def on_queued(self) -> None:
        self._progress()

    def on_grant(self) -> None:
        self.granted = True
        self._progress()

    def on_ack(self, upto: int) -> None:
        if upto > self.sent or upto < self.acked:
            raise StreamError(f"ack up to byte {upto} outside the sent range [{self.acked}, {self.sent}]")
        self.acked = upto
        while self._marks and self._marks[0][0] <= upto:
            self._wire_acked = self._marks.popleft()[1]
        self._last_ack = time.monotonic()
        self._progress()

    def on_done(self) -> None:
        # DONE confirms every byte: it counts as the final ack.
        if self.sent == self.size:
            self.on_ack(self.sent)
        self.done = True
        self._progress()

    def fail(self, exc: BaseException, *, remote: bool) -> None:
        if self.failure is None and not self.done:
            self.failure = exc
            self.peer_notified = remote
        self._wake.set()

    # -- the sending task -------------------------------------------------------------------

    async def wait_until(self, ready: Callable[[], bool]) -> None:
        """Wait until ``ready()``; raise the stream's failure (the watchdog sets stalls)."""
        while True:
            if self.failure is not None:
                raise self.failure
            if ready():
                return
            self._wake.clear()
            await self._wake.wait()

    async def send_chunk(self, header: bytes, chunk: EncodedChunk) -> None:
        waiting_since = time.monotonic()
        await self.wait_until(lambda: self.sent - self.acked + chunk.raw <= self.window)
        now = time.monotonic()
        if self._first_send is None:
            self._first_send = now
        else:
            self._window_wait += now - waiting_since
        # Count the chunk as sent before awaiting the transport: on a fast link its ack can
        # arrive while ``send`` still waits for ZeroMQ to release the zero-copy frames.
        self.sent += chunk.raw
        self._wire_sent += chunk.wire_nbytes
        self._marks.append((self.sent, self._wire_sent))
        self.peak_in_flight = max(self.peak_in_flight, self.sent - self.acked)
        await self.send([header, *chunk.frames])

    def throughput(self, encode_seconds: float) -> float | None:
        """Wire bytes per second the link carried, or ``None`` if too little to judge.

        Which clock applies depends on who set the pace. If the sender waited for window space
        for at least :data:`LINK_BOUND_SHARE` of the transfer, the link did: compressing
        overlapped with sending, and the whole elapsed time is link time (taking the
        compression time off it made a 119 MB/s link look like 250 MB/s). Otherwise the sender
        did, and ``encode_seconds`` (compressing and hashing) is taken off the elapsed time: a
        sender busy compressing acks slowly however fast the link, and must not conclude the
        link is slow (which would make it compress forever).
        """
        if self._first_send is None or self._last_ack is None or len(self._marks) > 0:
            return None
        elapsed = self._last_ack - self._first_send
        if self._window_wait < LINK_BOUND_SHARE * elapsed:
            elapsed -= encode_seconds
        if self._wire_acked < 1024 * 1024:
            return None
        return self._wire_acked / max(elapsed, 1e-3)
