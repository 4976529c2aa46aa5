"""The stream layer: large messages and files as flow-controlled, verified chunk streams.

A cell hands every message whose payload buffers exceed :attr:`StreamConfig.threshold` to its
:class:`StreamEndpoint` instead of sending it in one piece. The endpoint sends control headers
and chunks through the cell's ``send(peer, frames)`` (the cell's ``_fc.stream`` channel) and
gets every incoming stream frame through :meth:`StreamEndpoint.handle`. A verified message is
handed to ``deliver(message)``, and the cell dispatches it as if it had come in one piece.

Protocol (wire details in :mod:`~fedcell.transports.stream_protocol`)
--------------------------------------------------------------------
``OPEN`` announces stream id, kind (message or file), total size, chunk size, window, codec and
the layout: for a message its envelope and codec tree (every array's dtype and shape), for a file
its name and meta. The receiver validates it, waits for admission, allocates the destination and
answers ``GRANT``. The sender then sends ``DATA`` chunks, each with sequence, offset, raw length,
codec and an xxh3_64 of its wire bytes; the receiver verifies and writes each chunk in place and
acks cumulatively (``ACK upto``) every quarter window (acks also coalesce when the receiver's
outgoing queue is behind).
``END`` carries the chunk count, size and whole-stream digest; the receiver checks them, answers
``DONE`` and delivers. :meth:`StreamEndpoint.send_message` returns on ``DONE``.

Window
    The sender keeps ``sent - acked <= window`` raw bytes per peer (instrumented:
    ``statistics().peak_in_flight``). A chunk never exceeds the window, so the stream always
    progresses. With chunk ``c`` and window ``w`` the pipe holds ``w / c`` chunks: enough to
    cover one ack round trip, small enough to bound memory on both sides by ``w`` for files.
Zero copy
    Uncompressed message chunks are read-only ``memoryview`` slices of the sender's arrays
    (several frames when a chunk spans arrays), which the transport sends without copying and
    without waiting for ZeroMQ to release them; the receiver copies each byte once, from the
    frame into the preallocated array. The caller must not modify the payload until
    ``send_message`` returns (the read-only views are that promise to the transport).
Admission
    The receiver admits streams FIFO while the bytes of admitted streams stay within
    ``max_inbound_bytes`` (a message costs its size, a file one window); one stream is always
    admitted, whatever its size. Others wait for their ``GRANT`` (the receiver repeats
    ``QUEUED`` so their senders know it is alive). A server collecting N models of S bytes
    therefore holds about ``max(S, max_inbound_bytes)`` of partial models, flat in N.
Integrity
    Per-chunk xxh3_64 over the wire bytes (before decompression) and a whole-stream digest, the
    xxh3_128 over every chunk's raw-content xxh3_64 (after decompression; for a chunk sent raw
    that is its wire hash, so each byte is hashed once per side: see
    :mod:`~fedcell.transports.stream_protocol`). A file's content xxh3_128 is computed too, for
    :meth:`StreamEndpoint.send_file` and :class:`ReceivedFile`. A lost, reordered, corrupted or
    truncated chunk fails the stream with :class:`~fedcell.errors.StreamIntegrityError`; nothing
    half-received is delivered, a file's temporary is deleted, and the endpoint keeps serving
    other streams.
Liveness by progress
    Every chunk (receiver) and every control frame (sender) is progress. One watchdog task per
    endpoint ticks every ``stall_timeout / 4`` and fails a stream that made none for
    ``stall_timeout`` with :class:`~fedcell.errors.StreamStalledError` (so within 1.25 ×
    ``stall_timeout``); the other side gets a ``CANCEL`` saying why. A slow transfer that keeps
    moving never times out, however long it takes. (A send that the transport blocks is not
    interrupted: a peer that is gone is the cell's to detect, by heartbeats, which closes the
    link and so fails the send.)
Cancellation
    :meth:`StreamEndpoint.cancel` (either side) or cancelling the task running ``send_message``
    sends ``CANCEL``; the other side fails the stream with
    :class:`~fedcell.errors.StreamCancelledError`. Receiver-side failures are reported to the
    ``on_failure`` callback and counted in :meth:`StreamEndpoint.statistics`.
Compression
    ``codec="auto"`` compresses a sample of the payload with each candidate and picks one only
    where it pays at the link throughput measured from this peer's acks (starting from
    ``link_throughput_hint``): see :mod:`~fedcell.transports.compression`. The codec is recorded
    per chunk: a chunk that does not shrink travels raw.
Broadcast
    One payload to many peers: each chunk is encoded (compressed and hashed) once, the first time
    any peer needs it, and kept until every live peer has sent it; each peer has its own stream,
    window and task, so a slow or stuck peer delays only itself.
Memory
    Receiver: each admitted message costs its size (its arrays, allocated at ``GRANT``; arrays
    of 1 MiB or more reuse the memory of received arrays the application has dropped, up to
    the larger of ``max_inbound_bytes`` and the largest admitted message kept, which spares the
    page faults of fresh memory), plus one
    chunk of scratch when chunks arrive compressed; a file, and a message whose arrays an
    :class:`~fedcell.transports.array_sink.ArraySink` consumes as they arrive (``array_sink``
    hook), cost the chunks in flight (at most a window). A queued stream costs its header. Sender: the payload stays the caller's; compressed
    chunks live until every peer has sent them; a file is read into a ring of chunk buffers,
    each reused once its chunk is acked, so about a window is in memory.
Errors from the network
    A malformed or oversized header, an unknown codec or a decompression failure is logged and
    counted (``rejected_frames``), the stream it names (if any) is failed and its sender told
    why, and :meth:`handle` returns normally: the connection keeps serving. Frames of a stream
    that is no longer open (late chunks after a cancel) are dropped quietly.

Defaults (measured, see ``docs/benchmarks.md``)
-----------------------------------------------
Measured with ``benchmarks/stream.py --sweep`` (sender and receiver cells in two processes,
256-512 MiB numpy models, ``codec="none"``) on the team's shared 2-core VM; CPU seconds per GiB
(sender + receiver, every thread) is the steadier figure on a busy machine, throughput the
noisier one. Figures in ``docs/benchmarks.md``.

``chunk_size = 4 MiB``
    Each chunk is one message through the cell and ZeroMQ, and a message costs a fixed amount of
    CPU on both sides (envelope, asyncio wake-ups, zero-copy release tracking). 256 KiB chunks
    cost 2.5-3.4 CPU s/GiB, 1 MiB chunks 1.2-2.8, 4 MiB chunks 0.9-1.9 (raw pyzmq: 0.5-0.8).
    In steady state (receiver memory already faulted in) a chunk costs about 130 us of CPU,
    both sides together, beyond its bytes: 1 MiB chunks 0.82-0.88 CPU s/GiB, 4 MiB 0.64-0.78,
    16 MiB 0.74. Larger chunks gain little more (16 MiB: about 0.025 s/GiB) and coarsen
    progress: liveness is judged per chunk, and a 16 MiB chunk takes 34 s on a 4 Mbit/s link,
    longer than the stall timeout (4 MiB: 8 s). They also grow the receiver's scratch buffer for
    compressed chunks.
``window = 32 MiB``
    8 chunks in flight: one ack (every quarter window, 8 MiB) is always on its way while the
    sender still has room. 4 MiB windows (1 MiB chunks) stalled on acks (2.1-2.4 CPU s/GiB and
    lower throughput); 64 MiB windows were no faster, nor were 8 or 16 MiB windows slower with
    4 MiB chunks over loopback (same CPU s/GiB). 32 MiB also covers the bandwidth-delay
    product of a 1 Gbit/s link with 250 ms round trips, and bounds file-to-file memory.
``threshold = 1 MiB``
    Streaming costs two extra round trips (OPEN/GRANT, END/DONE): a 256 KiB request took 4.1 ms
    streamed vs 0.4 ms in one piece, 4 MiB 4.9 vs 2.8 ms. Below 1 MiB that latency buys nothing;
    above it, one-piece messages cost twice their size on the receiver (frame + decoded copy)
    and escape admission control, so many sites sending at once could exhaust a server.
``max_inbound_bytes = 256 MiB``
    A receiver assembling messages holds at most ``max(S, 256 MiB)`` of them (a model above the
    budget is admitted alone); several small models still assemble at once. A FedAvg server
    folds results as they stream in (array sinks, a window each) and sets a smaller budget
    (``fedcell.engine.simulator.SERVER_INBOUND_BYTES``): its memory is the global model, the
    aggregate and the windows in flight.
``link_throughput_hint = 125 MB/s``
    1 Gbit/s until the acks have measured the link: a first stream to a slow WAN peer is
    compressed if it pays, and the first stream over loopback may be compressed needlessly once
    (the next ones are measured and go raw).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import msgpack

from fedcell.errors import (
    ConfigError,
    EncodeError,
    FedcellError,
    StreamCancelledError,
    StreamError,
    StreamIntegrityError,
    StreamStalledError,
    TransportClosedError,
)
from fedcell.transports import codec, compression
from fedcell.transports.array_sink import ArraySink
from fedcell.transports.base import Buffer
from fedcell.transports.message import Envelope, Message, pack_envelope
from fedcell.transports.stream_protocol import (
    Ack,
    Cancel,
    CancelCode,
    ControlHeader,
    Data,
    Done,
    End,
    Grant,
    Open,
    Queued,
    StreamKind,
    pack_header,
    parse_header,
    peek_header,
)
from fedcell.transports.stream_receiver import (
    ArrayPool,
    ArraySinkHook,
    ChunkCopier,
    FileOffer,
    FileSinkPolicy,
    InboundStream,
    ReceivedFile,
    directory_sink,
)
from fedcell.transports.stream_sender import (
    ChunkEncoder,
    ChunkSource,
    ChunkTape,
    FileSource,
    OutboundStream,
    PayloadSource,
)

__all__ = [
    "STREAM_CHANNEL",
    "FileOffer",
    "FileSinkPolicy",
    "ReceivedFile",
    "StreamConfig",
    "StreamEndpoint",
    "StreamInfo",
    "StreamStats",
    "directory_sink",
]

log = logging.getLogger(__name__)

#: The cell channel stream frames travel on.
STREAM_CHANNEL = "_fc.stream"

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
_MAX_HEADER_BYTES = codec.DEFAULT_MAX_TREE_BYTES + 128 * KiB


@dataclass(frozen=True, slots=True)
class StreamConfig:
    """Tunables of a :class:`StreamEndpoint` (defaults measured; see the module docstring).

    Attributes
    ----------
    threshold:
        Payloads whose buffers total more than this many bytes are streamed (the cell decides).
    chunk_size:
        Raw bytes per chunk.
    window:
        Raw bytes in flight per stream and peer (sent, not yet acked); at least ``chunk_size``.
    stall_timeout:
        Seconds without progress after which a stream fails with ``StreamStalledError``.
    codec:
        ``"auto"`` (choose per stream from a sample) or a registered codec name to force.
    max_inbound_bytes:
        Admission budget: bytes of inbound streams assembling at once (one is always admitted).
    link_throughput_hint:
        Bytes per second assumed for a peer before its acks measured the link.
    codec_candidates:
        Codecs ``"auto"`` weighs against sending raw.
    sample_bytes:
        Bytes of payload compressed to choose the codec.
    max_chunk_size:
        Largest chunk size a peer may announce (receiver side).
    max_header_bytes:
        Largest control header accepted (an ``OPEN`` holds the payload's codec tree).
    """

    threshold: int = 1 * MiB
    chunk_size: int = 4 * MiB
    window: int = 32 * MiB
    stall_timeout: float = 30.0
    codec: str = "auto"
    max_inbound_bytes: int = 256 * MiB
    link_throughput_hint: float = 125e6
    codec_candidates: tuple[str, ...] = ("blosc2-lz4", "blosc2-zstd")
    sample_bytes: int = 256 * KiB
    max_chunk_size: int = 64 * MiB
    max_header_bytes: int = _MAX_HEADER_BYTES

    def __post_init__(self) -> None:
        if self.chunk_size <= 0 or self.threshold < 0:
            raise ConfigError("chunk_size must be positive and threshold non-negative")
        if self.window < self.chunk_size:
            raise ConfigError(f"window ({self.window}) must hold a chunk ({self.chunk_size})")
        if self.chunk_size > self.max_chunk_size:
            raise ConfigError(f"chunk_size {self.chunk_size} is above max_chunk_size")
        if self.stall_timeout <= 0 or self.link_throughput_hint <= 0:
            raise ConfigError("stall_timeout and link_throughput_hint must be positive")
        if self.max_inbound_bytes <= 0:
            raise ConfigError("max_inbound_bytes must be positive")
        for name in (*self.codec_candidates, *([] if self.codec == "auto" else [self.codec])):
            compression.get_codec(name)


@dataclass(slots=True)
class StreamStats:
    """Counters of one endpoint (:meth:`StreamEndpoint.statistics` returns a copy)."""

    streams_sent: int = 0
    streams_received: int = 0
    streams_failed: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    chunks_encoded: int = 0
    chunks_compressed: int = 0
    open_outbound: int = 0
    open_inbound: int = 0
    queued_inbound: int = 0
    inbound_bytes_admitted: int = 0
    peak_inbound_bytes_admitted: int = 0
    peak_in_flight: int = 0
    rejected_frames: int = 0
    arrays_reused: int = 0
    pooled_bytes: int = 0
    codec_choices: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class StreamInfo:
    """One open stream, as :meth:`StreamEndpoint.streams` lists it."""

    peer: str
    sid: int
    direction: Literal["in", "out"]
    size: int
    done_bytes: int
    state: Literal["queued", "open"]


FailureCallback = Callable[[str, int, StreamError], None]

#: ``hook(peer, stream id, envelope, skeleton)``: see ``StreamEndpoint(array_sink=...)``.
EndpointArraySinkHook = Callable[[str, int, Envelope, Any], ArraySink | None]


def _code_of(exc: BaseException) -> CancelCode:
    if isinstance(exc, StreamIntegrityError):
        return "integrity"
    if isinstance(exc, StreamStalledError):
        return "stalled"
    if isinstance(exc, StreamCancelledError):
        return "cancelled"
    return "protocol"


def _remote_error(peer: str, header: Cancel) -> StreamError:
    text = f"{peer} cancelled stream {header.sid} ({header.code}): {header.reason}"
    if header.code == "integrity":
        return StreamIntegrityError(text)
    if header.code == "stalled":
        return StreamStalledError(text)
    if header.code in ("cancelled", "closed", "refused"):
        return StreamCancelledError(text)
    return StreamError(text)


def _control_frame(item: bytes | InboundStream) -> bytes | None:
    """The frame an outbox item stands for: itself, or the ack of a stream (``None`` if closed)."""
    if not isinstance(item, InboundStream):
        return item
    item.ack_posted = False
    if item.closed:
        return None
    item.ack_sent = item.received
    return pack_header(Ack(item.sid, item.received))


def _as_stream_error(exc: FedcellError) -> StreamError:
    if isinstance(exc, StreamError):
        return exc
    error = StreamError(str(exc))
    error.__cause__ = exc
    return error


class StreamEndpoint:
    """Sends and receives streams for one cell (see the module docstring).

    Parameters
    ----------
    send:
        ``send(peer, frames)``: the cell sends ``frames`` to ``peer`` on :data:`STREAM_CHANNEL`,
        awaiting transport backpressure.
    deliver:
        Called (in its own task) with each complete, verified message.
    config:
        Tunables; :class:`StreamConfig` defaults if omitted.
    name:
        This cell's name: the sender of the messages that :meth:`send_file` builds.
    file_sink:
        Where offered files land (see :func:`directory_sink`); ``None`` refuses every file.
    on_failure:
        Called with ``(peer, stream id, error)`` when an inbound stream fails.
    array_sink:
        Called at each inbound message stream's ``OPEN`` with ``(peer, stream id, envelope,
        skeleton)``; returns an :class:`~fedcell.transports.array_sink.ArraySink` that consumes
        the message's arrays as they arrive (the stream then costs a window of the inbound
        budget, not its size), or ``None`` to assemble the message; raises to refuse it.
    """

    def __init__(
        self,
        send: Callable[[str, list[Buffer]], Awaitable[None]],
        deliver: Callable[[Message], Awaitable[None]],
        config: StreamConfig | None = None,
        *,
        name: str = "",
        file_sink: FileSinkPolicy | None = None,
        on_failure: FailureCallback | None = None,
        array_sink: EndpointArraySinkHook | None = None,
    ) -> None:
        self.config = config or StreamConfig()
        self._array_sink = array_sink
        self.name = name
        self._send_frames = send
        self._deliver = deliver
        self._file_sink = file_sink
        self._on_failure = on_failure
        self._sids = itertools.count(secrets.randbits(48))
        self._outbound: dict[tuple[str, int], OutboundStream] = {}
        self._inbound: dict[tuple[str, int], InboundStream] = {}
        self._waiting: deque[InboundStream] = deque()
        self._admitted_bytes = 0
        self._outboxes: dict[str, deque[bytes | InboundStream]] = {}
        self._drainers: set[asyncio.Task[None]] = set()
        self._deliveries: set[asyncio.Task[None]] = set()
        self._watchdog: asyncio.Task[None] | None = None
        self._link: dict[str, float] = {}
        self._pool = ArrayPool(self.config.max_inbound_bytes)
        self._copier = ChunkCopier()
        self._stats = StreamStats()
        self._closed = False

    # ------------------------------------------------------------------------------------------
    # public API

    @property
    def threshold(self) -> int:
        """Payloads whose buffers exceed this many bytes should be streamed (the cell asks)."""
        return self.config.threshold

    async def send_message(self, peer: str, message: Message) -> None:
        """Stream ``message`` to ``peer``; return once the receiver verified the whole stream.

        Raises
        ------
        EncodeError
            If the payload holds a type the wire does not carry.
        StreamError
            ``StreamIntegrityError``, ``StreamStalledError``, ``StreamCancelledError`` or a
            ``StreamError`` naming the receiver's refusal.
        TransportError
            If the cell could not send a frame.
        """
        source, layout = self._message_source(message)
        envelopes = {peer: pack_envelope(message.envelope)}
        outcome = await self._stream(envelopes, "message", layout, source)
        if outcome[peer] is not None:
            raise outcome[peer]  # type: ignore[misc]

    async def broadcast_message(
        self, peers: Sequence[str], message: Message
    ) -> dict[str, BaseException | None]:
        """Stream one payload to every peer, encoding each chunk once.

        The envelope's receiver is rewritten per peer. Returns each peer's outcome: ``None`` on
        success, else the error (a failing peer does not stop the others).

        Raises
        ------
        EncodeError
            If the payload holds a type the wire does not carry.
        """
        source, layout = self._message_source(message)
        envelopes = {
            peer: pack_envelope(replace(message.envelope, receiver=peer)) for peer in dict.fromkeys(peers)
        }
        outcome = await self._stream(envelopes, "message", layout, source)
        return outcome

    async def send_file(
        self, peer: str, path: Path, *, channel: str, meta: dict[str, Any] | None = None
    ) -> str:
        """Stream the file at ``path`` to ``peer``; return its hex xxh3_128 once verified.

        The receiver's file sink policy picks the destination; its ``deliver`` gets a message on
        ``channel`` whose payload is a :class:`ReceivedFile` carrying ``meta``.

        Raises
        ------
        EncodeError
            If ``meta`` holds arrays or types the wire does not carry.
        StreamError
            As :meth:`send_message`; ``StreamCancelledError`` if the receiver refuses the file.
        OSError
            If ``path`` cannot be opened.
        """
        tree, buffers = codec.encode(dict(meta or {}))
        if buffers:
            raise EncodeError("file meta must not hold arrays; send them as a message")
        layout = msgpack.packb({"name": path.name, "meta": codec.pack_tree(tree)}, use_bin_type=True)
        envelope = Message.create(self.name, peer, channel).envelope
        source = FileSource(path, self.config.chunk_size)
        try:
            outcome = await self._stream({peer: pack_envelope(envelope)}, "file", layout, source)
        finally:
            source.close()
        if outcome[peer] is not None:
            raise outcome[peer]  # type: ignore[misc]
        return source.content_digest()

    async def handle(self, peer: str, frames: list[Buffer]) -> None:
        """Process one incoming stream frame list from ``peer``. Never raises for bad input and
        never waits: replies are queued to a per-peer sender task."""
        if self._closed:
            return
        if not frames:
            self._reject(peer, "empty stream frame list")
            return
        try:
            header = parse_header(frames[0], self.config.max_header_bytes)
        except FedcellError as exc:
            self._on_unreadable(peer, frames[0], exc)
            return
        if isinstance(header, (Open, Data, End)) or (
            isinstance(header, Cancel) and header.side == "sender"
        ):
            self._on_inbound(peer, header, frames)
        else:
            self._on_outbound(peer, header)

    def cancel(self, peer: str, sid: int, reason: str = "cancelled by the application") -> None:
        """Cancel the stream ``sid`` with ``peer`` (either direction; see :meth:`streams`).

        Raises
        ------
        StreamError
            If no such stream is open.
        """
        error = StreamCancelledError(f"stream {sid} with {peer}: {reason}")
        inbound = self._inbound.get((peer, sid))
        if inbound is not None:
            self._fail_inbound(inbound, error, notify=True)
            return
        outbound = self._outbound.get((peer, sid))
        if outbound is None:
            raise StreamError(f"no open stream {sid} with {peer}")
        outbound.fail(error, remote=False)

    def streams(self) -> list[StreamInfo]:
        """The open streams, both directions."""
        infos = [
            StreamInfo(o.peer, o.sid, "out", o.size, o.acked, "open" if o.granted else "queued")
            for o in self._outbound.values()
        ]
        infos.extend(
            StreamInfo(i.peer, i.sid, "in", i.size, i.received, "open" if i.granted else "queued")
            for i in self._inbound.values()
        )
        return infos

    def link_throughput(self, peer: str) -> float:
        """Estimated bytes per second to ``peer`` (from acks; the hint until measured)."""
        return self._link.get(peer, self.config.link_throughput_hint)

    def statistics(self) -> StreamStats:
        """A snapshot of this endpoint's counters."""
        s = replace(self._stats, codec_choices=dict(self._stats.codec_choices))
        s.open_outbound = len(self._outbound)
        s.open_inbound = len(self._inbound)
        s.queued_inbound = len(self._waiting)
        s.inbound_bytes_admitted = self._admitted_bytes
        s.arrays_reused = self._pool.reused
        s.pooled_bytes = self._pool.free_bytes
        return s

    async def close(self) -> None:
        """Cancel every open stream (telling the peers), then stop this endpoint's tasks."""
        if self._closed:
            return
        closing = StreamCancelledError("the stream endpoint is closing")
        for out in list(self._outbound.values()):
            out.fail(closing, remote=False)
            if not out.peer_notified:
                self._post_cancel(out.peer, out.sid, "sender", closing)
                out.peer_notified = True
        for inbound in list(self._inbound.values()):
            self._fail_inbound(inbound, closing, notify=True)
        if self._drainers:
            await asyncio.wait(set(self._drainers), timeout=min(1.0, self.config.stall_timeout))
        self._closed = True
        tasks = [*self._drainers, *self._deliveries]
        if self._watchdog is not None:
            tasks.append(self._watchdog)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._copier.close()
        self._pool.close()

    # ------------------------------------------------------------------------------------------
    # sending

    def _message_source(self, message: Message) -> tuple[PayloadSource, bytes]:
        tree, buffers = codec.encode(message.payload)
        specs = codec.array_specs(tree)
        itemsizes = [spec.nbytes // max(1, math.prod(spec.shape)) or 1 for spec in specs]
        return PayloadSource(buffers, itemsizes), codec.pack_tree(tree)

    def _choose_codec(self, source: ChunkSource, peers: Sequence[str]) -> str:
        cfg = self.config
        if cfg.codec != "auto":
            return cfg.codec
        link = min(self.link_throughput(peer) for peer in peers)
        choice = compression.choose_codec(
            source.samples(cfg.sample_bytes), link, cfg.codec_candidates
        )
        return choice.name

    async def _stream(
        self,
        envelopes: dict[str, bytes],
        kind: StreamKind,
        layout: bytes,
        source: ChunkSource,
    ) -> dict[str, BaseException | None]:
        """Stream ``source`` to every peer of ``envelopes``; return each peer's outcome."""
        if self._closed:
            raise StreamCancelledError("the stream endpoint is closed")
        cfg = self.config
        codec_name = self._choose_codec(source, list(envelopes))
        self._stats.codec_choices[codec_name] = self._stats.codec_choices.get(codec_name, 0) + 1
        encoder = ChunkEncoder(source, cfg.chunk_size, codec_name)
        tape = ChunkTape(encoder, envelopes)
        outs = [
            OutboundStream(peer, next(self._sids), source.size, cfg.window, self._sender(peer))
            for peer in envelopes
        ]
        for out in outs:
            self._outbound[(out.peer, out.sid)] = out
        self._ensure_watchdog()

        async def run(out: OutboundStream) -> None:
            try:
                header = Open(out.sid, kind, source.size, cfg.chunk_size, cfg.window, codec_name,
                              envelopes[out.peer], layout)  # fmt: skip
                await out.send([pack_header(header)])
                await out.wait_until(lambda: out.granted)
                for seq in range(encoder.chunks):
                    source.release_through(min(o.acked for o in outs))
                    chunk = tape.get(seq)
                    data = Data(out.sid, seq, chunk.offset, chunk.raw, chunk.codec, chunk.hash)
                    await out.send_chunk(pack_header(data), chunk)
                    tape.advance(out.peer, seq)
                end = End(out.sid, encoder.chunks, source.size, encoder.digest())
                out.ended = True  # before awaiting: DONE may arrive while ``send`` still waits
                await out.send([pack_header(end)])
                await out.wait_until(lambda: out.done)
            except Exception as exc:
                out.fail(exc, remote=False)
            finally:
                tape.leave(out.peer)
                self._retire(out)

        try:
            if len(outs) == 1:
                await run(outs[0])
            else:
                await asyncio.gather(*(run(out) for out in outs))
        finally:
            self._stats.chunks_encoded += tape.encoded
            self._stats.chunks_compressed += encoder.compressed_chunks
        results: dict[str, BaseException | None] = {}
        for out in outs:
            results[out.peer] = out.failure
            if out.failure is not None:
                self._stats.streams_failed += 1
            else:
                self._stats.streams_sent += 1
                self._stats.bytes_sent += out.size
                self._learn_link(out, encoder.seconds)
        return results

    def _learn_link(self, out: OutboundStream, encode_seconds: float) -> None:
        measured = out.throughput(encode_seconds)
        if measured is not None:
            known = self._link.get(out.peer)
            self._link[out.peer] = measured if known is None else (known + measured) / 2

    def _retire(self, out: OutboundStream) -> None:
        self._outbound.pop((out.peer, out.sid), None)
        self._stats.peak_in_flight = max(self._stats.peak_in_flight, out.peak_in_flight)
        if out.done:
            return
        if out.failure is None:  # the sending task was cancelled
            out.fail(StreamCancelledError("the sending task was cancelled"), remote=False)
        if not out.peer_notified and out.failure is not None:
            self._post_cancel(out.peer, out.sid, "sender", out.failure)
            out.peer_notified = True

    def _sender(self, peer: str) -> Callable[[list[Buffer]], Awaitable[None]]:
        async def send(frames: list[Buffer]) -> None:
            await self._send_frames(peer, frames)

        return send

    # ------------------------------------------------------------------------------------------
    # receiving

    def _on_inbound(self, peer: str, header: ControlHeader, frames: list[Buffer]) -> None:
        if isinstance(header, Open):
            self._on_open(peer, header)
            return
        stream = self._inbound.get((peer, header.sid))
        if stream is None:
            # Late frames of a stream that already failed or was cancelled land here.
            log.debug("dropping %s for unknown stream %s from %s", type(header).__name__,
                      header.sid, peer)  # fmt: skip
            return
        try:
            if isinstance(header, Data):
                stream.write_chunk(header, frames[1:])
                self._post_ack(stream)
            elif isinstance(header, End):
                message = stream.finish(header)
                self._complete_inbound(stream, message)
            elif isinstance(header, Cancel):
                self._fail_inbound(stream, _remote_error(peer, header), notify=False)
        except FedcellError as exc:
            if not isinstance(exc, StreamError):
                self._stats.rejected_frames += 1
            self._fail_inbound(stream, _as_stream_error(exc), notify=True)

    def _on_open(self, peer: str, header: Open) -> None:
        if (peer, header.sid) in self._inbound:
            self._reject(peer, f"duplicate OPEN for stream {header.sid}")
            return
        cfg = self.config
        try:
            stream = InboundStream(
                peer, header, max_chunk_size=cfg.max_chunk_size,
                max_tree_bytes=codec.DEFAULT_MAX_TREE_BYTES, file_sink=self._file_sink,
                pool=self._pool, copier=self._copier,
                array_sink=self._array_sink_for(peer, header.sid),
            )  # fmt: skip
        except Exception as exc:  # the file sink policy is application code: refuse on any error
            reason = f"stream {header.sid} from {peer} refused: {exc}"
            self._reject(peer, reason)
            error = StreamCancelledError(reason) if isinstance(exc, ConfigError) else StreamError(reason)
            self._post_cancel(peer, header.sid, "receiver", error)
            self._report(peer, header.sid, error)
            return
        self._inbound[(peer, header.sid)] = stream
        self._waiting.append(stream)
        self._ensure_watchdog()
        self._admit()
        if not stream.granted and not stream.closed:
            self._post(peer, pack_header(Queued(stream.sid)))

    def _array_sink_for(self, peer: str, sid: int) -> ArraySinkHook | None:
        hook = self._array_sink
        if hook is None:
            return None
        return lambda envelope, skeleton: hook(peer, sid, envelope, skeleton)

    def _admit(self) -> None:
        budget = self.config.max_inbound_bytes
        while self._waiting:
            stream = self._waiting[0]
            if self._admitted_bytes and self._admitted_bytes + stream.cost > budget:
                return
            self._waiting.popleft()
            try:
                stream.grant()
            except (FedcellError, OSError) as exc:
                error = exc if isinstance(exc, StreamError) else StreamError(str(exc))
                self._fail_inbound(stream, error, notify=True)
                continue
            self._admitted_bytes += stream.cost
            self._pool.make_room_for(stream.cost if stream.kind == "message" else 0)
            self._stats.peak_inbound_bytes_admitted = max(
                self._stats.peak_inbound_bytes_admitted, self._admitted_bytes
            )
            self._post(stream.peer, pack_header(Grant(stream.sid)))

    def _release(self, stream: InboundStream) -> None:
        del self._inbound[(stream.peer, stream.sid)]
        if stream.granted:
            self._admitted_bytes -= stream.cost
        else:
            self._waiting.remove(stream)

    def _complete_inbound(self, stream: InboundStream, message: Message) -> None:
        self._release(stream)
        self._stats.streams_received += 1
        self._stats.bytes_received += stream.size
        self._post(stream.peer, pack_header(Done(stream.sid)))
        self._spawn_delivery(message)
        self._admit()

    def _fail_inbound(self, stream: InboundStream, error: StreamError, *, notify: bool) -> None:
        self._release(stream)
        stream.abort(error)
        self._stats.streams_failed += 1
        if notify:
            self._post_cancel(stream.peer, stream.sid, "receiver", error)
        log.warning("inbound stream %s from %s failed: %s", stream.sid, stream.peer, error)
        self._report(stream.peer, stream.sid, error)
        self._admit()

    def _report(self, peer: str, sid: int, error: StreamError) -> None:
        if self._on_failure is not None:
            try:
                self._on_failure(peer, sid, error)
            except Exception:
                log.exception("stream failure callback raised")

    def _spawn_delivery(self, message: Message) -> None:
        task = asyncio.get_running_loop().create_task(self._deliver_one(message))
        self._deliveries.add(task)
        task.add_done_callback(self._deliveries.discard)

    async def _deliver_one(self, message: Message) -> None:
        try:
            await self._deliver(message)
        except Exception:
            log.exception("delivering streamed message %s failed", message.envelope.msg_id)

    def _on_outbound(self, peer: str, header: ControlHeader) -> None:
        out = self._outbound.get((peer, header.sid))
        if out is None:
            log.debug("dropping %s for unknown outbound stream %s to %s",
                      type(header).__name__, header.sid, peer)  # fmt: skip
            return
        try:
            if isinstance(header, Grant):
                out.on_grant()
            elif isinstance(header, Queued):
                out.on_queued()
            elif isinstance(header, Ack):
                out.on_ack(header.upto)
            elif isinstance(header, Done):
                if not out.ended:
                    raise StreamError(f"{peer} confirmed stream {out.sid} before its END")
                out.on_done()
            elif isinstance(header, Cancel):
                out.fail(_remote_error(peer, header), remote=True)
        except StreamError as exc:
            self._stats.rejected_frames += 1
            out.fail(exc, remote=False)

    def _on_unreadable(self, peer: str, frame: Buffer, exc: FedcellError) -> None:
        """Reject a header that does not parse; fail the stream it names, if it names one."""
        ident = peek_header(frame)
        reason = f"unreadable stream header from {peer}: {exc}"
        self._reject(peer, reason)
        if ident is None:
            return
        kind, sid = ident
        error = StreamError(reason)
        error.__cause__ = exc
        if kind in ("open", "data", "end"):
            inbound = self._inbound.get((peer, sid))
            if inbound is not None:
                self._fail_inbound(inbound, error, notify=True)
            elif kind == "open":
                self._post_cancel(peer, sid, "receiver", error)
                self._report(peer, sid, error)
        else:
            outbound = self._outbound.get((peer, sid))
            if outbound is not None:
                outbound.fail(error, remote=False)

    def _reject(self, peer: str, reason: str) -> None:
        self._stats.rejected_frames += 1
        log.warning("rejected stream frame from %s: %s", peer, reason)

    # ------------------------------------------------------------------------------------------
    # control frames out (never awaited by handle) and the watchdog

    def _post(self, peer: str, item: bytes | InboundStream) -> None:
        if self._closed:
            return
        queue = self._outboxes.get(peer)
        if queue is None:
            queue = self._outboxes[peer] = deque()
            task = asyncio.get_running_loop().create_task(self._drain(peer, queue))
            self._drainers.add(task)
            task.add_done_callback(self._drainers.discard)
        queue.append(item)

    def _post_ack(self, stream: InboundStream) -> None:
        if not stream.ack_posted and stream.received - stream.ack_sent >= stream.ack_every:
            stream.ack_posted = True
            self._post(stream.peer, stream)

    def _post_cancel(
        self, peer: str, sid: int, side: Literal["sender", "receiver"], exc: BaseException
    ) -> None:
        self._post(peer, pack_header(Cancel(sid, side, _code_of(exc), str(exc)[:4000])))

    async def _drain(self, peer: str, queue: deque[bytes | InboundStream]) -> None:
        try:
            while queue:
                # No local keeps the stream while the send waits: a finished stream (and its
                # sink, e.g. a fold and the model it holds) must not outlive its last ack.
                frame = _control_frame(queue.popleft())
                if frame is None:
                    continue
                try:
                    await self._send_frames(peer, [frame])
                except (FedcellError, OSError) as exc:
                    log.warning("cannot send stream control frame to %s: %s", peer, exc)
                    self._fail_peer(peer, exc)
        finally:
            if self._outboxes.get(peer) is queue:
                del self._outboxes[peer]

    def _fail_peer(self, peer: str, exc: BaseException) -> None:
        error = StreamError(f"cannot reach {peer}: {exc}")
        for inbound in [s for s in self._inbound.values() if s.peer == peer]:
            self._fail_inbound(inbound, error, notify=False)
        if isinstance(exc, TransportClosedError):
            for out in [o for o in self._outbound.values() if o.peer == peer]:
                out.fail(error, remote=True)

    def _ensure_watchdog(self) -> None:
        if self._watchdog is None:
            self._watchdog = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        stall = self.config.stall_timeout
        try:
            while self._inbound or self._outbound:
                await asyncio.sleep(stall / 4)
                now = time.monotonic()
                for stream in list(self._inbound.values()):
                    if not stream.granted:
                        self._post(stream.peer, pack_header(Queued(stream.sid)))
                    elif now - stream.last_progress > stall:
                        error = StreamStalledError(
                            f"stream {stream.sid} from {stream.peer} stalled: no chunk for "
                            f"{stall:g} s at {stream.received} of {stream.size} bytes"
                        )
                        self._fail_inbound(stream, error, notify=True)
                for out in list(self._outbound.values()):
                    if out.failure is None and not out.done and now - out.last_progress > stall:
                        out.fail(StreamStalledError(
                            f"stream {out.sid} to {out.peer} stalled: no answer for {stall:g} s "
                            f"at {out.acked} of {out.size} bytes acked"
                        ), remote=False)  # fmt: skip
        finally:
            self._watchdog = None

