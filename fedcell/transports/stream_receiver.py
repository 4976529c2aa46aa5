"""The receiving half of the stream layer: validating an OPEN, sinks, and per-chunk checks.

An :class:`InboundStream` is created from a validated ``OPEN`` (nothing is allocated yet: a stream
waiting for admission costs only its header) and gets its sink when the endpoint admits it:

- :class:`MessageSink` preallocates every array the codec tree names (``codec.array_specs``; large
  arrays come from the :class:`ArrayPool`, which recycles the memory of arrays the application
  has dropped) and scatters each chunk straight into them; a chunk may span arrays. Receiving
  an S-byte message costs S (plus one chunk of scratch per compressed chunk that spans
  arrays). On machines with cores to spare the :class:`ChunkCopier`'s thread does the copies
  while the event loop checks the next chunk.
- :class:`FileSink` writes each chunk with ``pwrite`` into a temporary file next to the
  destination that the file-sink policy chose; only after the whole-stream digest matches is it
  renamed into place. On any failure it is closed and deleted.

:meth:`InboundStream.write_chunk` checks, in this order: the chunk is the next one (sequence and
offset; a gap means a lost chunk), its raw length fits the announced chunk size and total, its
codec is ``none`` or the announced one, its xxh3_64 matches the wire bytes (before any
decompression), and the compressed chunk decompresses to exactly its raw length. It then feeds the
chunk's raw-content xxh3_64 (its wire hash when it came raw; the xxh3_64 of the decompressed bytes
otherwise) to the :class:`~fedcell.transports.stream_protocol.StreamDigest`, and a file's bytes to
the file's content xxh3_128 (:attr:`ReceivedFile.digest`). :meth:`InboundStream.finish` checks
the chunk count, total and digest announced by ``END``. Every failure raises a
:class:`~fedcell.errors.StreamError` or :class:`~fedcell.errors.ProtocolError` naming the stream,
and the endpoint discards the stream; nothing half-received is ever delivered.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import errno
import logging
import mmap
import os
import sys
import tempfile
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import xxhash

from fedcell.errors import ConfigError, FrameError, StreamError, StreamIntegrityError
from fedcell.transports import codec, compression
from fedcell.transports.array_sink import ArraySink, ArraySinkAdapter, Regions, skeleton
from fedcell.transports.base import Buffer
from fedcell.transports.message import Envelope, Message, unpack_envelope
from fedcell.transports.stream_protocol import Data, End, Open, StreamDigest, chunk_hash

__all__ = [
    "COPIED_APART_MIN_BYTES",
    "COPIER_MIN_CORES",
    "COPY_AHEAD",
    "POOLED_MIN_BYTES",
    "ArrayPool",
    "ArraySinkHook",
    "ChunkCopier",
    "FileOffer",
    "FileSink",
    "FileSinkPolicy",
    "InboundStream",
    "MessageSink",
    "ReceivedFile",
    "directory_sink",
]


log = logging.getLogger(__name__)

#: Arrays at least this large are allocated from the :class:`ArrayPool`.
POOLED_MIN_BYTES = 1024 * 1024
#: Pieces at least this large are copied into their array by the :class:`ChunkCopier`'s thread.
COPIED_APART_MIN_BYTES = 256 * 1024
#: Copies a :class:`MessageSink` lets run behind the chunk it is writing (held frames: this many
#: chunks beyond the window).
COPY_AHEAD = 2
#: A :class:`ChunkCopier` copies on a thread of its own only where the process may use at least
#: this many cores: a transfer between two processes of one machine keeps four threads busy (each
#: side's event loop and I/O thread), five with the copier's.
COPIER_MIN_CORES = 8

#: ``madvise`` advice (Linux 5.14+): fault a range in, writable, without touching its bytes.
_MADV_POPULATE_WRITE = 23


def _libc_madvise() -> Callable[[int, int, int], int] | None:
    if sys.platform != "linux":
        return None
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise


#: ``None`` where ``MADV_POPULATE_WRITE`` is unavailable (set so on the first ``EINVAL``).
_madvise = _libc_madvise()


def _populate(region: mmap.mmap) -> None:
    """Fault ``region`` in with ``MADV_POPULATE_WRITE`` (ctypes releases the GIL meanwhile).

    Raises
    ------
    OSError
        If the kernel refuses (``EINVAL`` before Linux 5.14, ``ENOMEM``).
    """
    assert _madvise is not None
    anchor = ctypes.c_char.from_buffer(region)  # holds the mapping's buffer while in use
    try:
        if _madvise(ctypes.addressof(anchor), len(region), _MADV_POPULATE_WRITE) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))
    finally:
        del anchor


@codec.wire_type("fedcell.ReceivedFile")
@dataclass(frozen=True, slots=True)
class ReceivedFile:
    """The payload delivered for a streamed file: where it is now and what it is.

    ``digest`` is the hex xxh3_128 of the file's bytes, verified against the sender's.
    """

    path: str
    size: int
    digest: str
    name: str
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class FileOffer:
    """What a sender proposes: the file sink policy decides where (and whether) it lands."""

    peer: str
    name: str
    size: int
    channel: str
    meta: dict[str, Any]


#: Returns the destination path for an offered file, or raises to refuse it.
FileSinkPolicy = Callable[[FileOffer], Path]

#: ``hook(envelope, skeleton)`` at a message stream's ``OPEN``: an :class:`ArraySink` to consume
#: its arrays piece by piece, ``None`` to assemble it as usual; raises to refuse the stream.
ArraySinkHook = Callable[[Envelope, Any], ArraySink | None]


def directory_sink(root: Path) -> FileSinkPolicy:
    """A policy that stores every offered file in ``root`` under its base name.

    Names that are empty, hidden or carry a directory part are refused, so a peer cannot write
    outside ``root``.
    """

    def place(offer: FileOffer) -> Path:
        base = Path(offer.name).name
        if not base or base != offer.name or base.startswith("."):
            raise ConfigError(f"refusing file name {offer.name!r} from {offer.peer}")
        return root / base

    return place


class ArrayPool:
    """Memory for received arrays, recycled once the application has dropped every view of it.

    Fresh anonymous memory costs a page fault per 4 KiB page on its first write: measured at
    0.5-2 CPU s/GiB on the project's VM, more than receiving the bytes. A server receives arrays
    of the same sizes round after round, so every array of at least :data:`POOLED_MIN_BYTES`
    lives in its own anonymous ``mmap`` region; a ``weakref.finalize`` on the region's base
    array (which every numpy view and every tensor made from it keeps alive) hands the region
    back when the last view dies, and the next array of that size reuses it, already faulted in.
    At most ``capacity`` bytes wait in the pool (the admission budget, raised to the largest
    admitted message: that much is in use while it assembles anyway), and each fresh allocation
    evicts as many pooled bytes of other sizes, so memory that does not get reused does not
    stay. Regions hold stale bytes, which is safe: a stream is delivered only after
    every byte was written. Finalizers may run on any thread, hence the lock.

    A fresh region (a miss) is faulted in by one worker thread of the event loop's default
    executor, region after region in allocation order, with ``MADV_POPULATE_WRITE`` (Linux
    5.14+), while the event loop starts writing chunks into it: the kernel serializes the two
    per page, and populating does not touch the bytes. Measured on the project's VM, 1 GiB of
    fresh regions: 0.21 CPU s on the worker instead of 0.45-2 CPU s of page faults on the event
    loop (whose copies then run at the speed of reused memory). Without a running event loop or
    without kernel support, the first write faults the pages in as before.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.reused = 0
        self._free: dict[int, list[mmap.mmap]] = {}
        self._free_bytes = 0
        self._lock = threading.Lock()
        self._closed = False
        self._to_populate: deque[mmap.mmap] = deque()
        self._populating = False

    def allocate(self, spec: codec.ArraySpec) -> Any:
        """An uninitialized, writable array or tensor matching ``spec``."""
        size = spec.nbytes
        if size < POOLED_MIN_BYTES:
            return codec.allocate_like(spec)
        with self._lock:
            regions = self._free.get(size)
            region = regions.pop() if regions else None
            if region is not None:
                self._free_bytes -= size
                self.reused += 1
            else:
                self._evict(size)
        if region is None:
            region = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            self._prefault(region)
        base = np.frombuffer(region, dtype=np.uint8)
        weakref.finalize(base, self._release, region).atexit = False
        if spec.library == "numpy":
            return base.view(np.dtype(spec.dtype)).reshape(spec.shape)
        import torch

        return torch.from_numpy(base).view(getattr(torch, spec.dtype)).reshape(spec.shape)

    def _prefault(self, region: mmap.mmap) -> None:
        if _madvise is None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not on an event loop: the first write faults the pages in
            return
        with self._lock:
            self._to_populate.append(region)
            if self._populating:
                return
            self._populating = True
        try:
            job = loop.run_in_executor(None, self._populate_queued)
        except RuntimeError:  # the loop's executor is shut down: the writes fault pages in
            with self._lock:
                self._to_populate.clear()
                self._populating = False
            return
        job.add_done_callback(_report_populate)

    def _populate_queued(self) -> None:
        """Worker thread: fault in the queued regions, oldest first, until none is left."""
        global _madvise
        while True:
            with self._lock:
                if not self._to_populate or _madvise is None:
                    self._to_populate.clear()
                    self._populating = False
                    return
                region = self._to_populate.popleft()
            try:
                _populate(region)
            except OSError as exc:
                log.debug("cannot fault in received-array memory ahead of the writes: %s", exc)
                if exc.errno == errno.EINVAL:  # no MADV_POPULATE_WRITE in this kernel
                    _madvise = None

    def _evict(self, size: int) -> None:
        # A miss: the process is about to grow by ``size``. Pooled regions of sizes that did not
        # come back are dropped to make up for it, so a change of model does not leave a
        # budget of stale memory behind; with the same sizes every round nothing is evicted.
        evicted = 0
        while evicted < size and self._free_bytes:
            largest = max(self._free, key=lambda s: len(self._free[s]) * s)
            self._free[largest].pop()
            if not self._free[largest]:
                del self._free[largest]
            self._free_bytes -= largest
            evicted += largest

    def _release(self, region: mmap.mmap) -> None:
        # Runs while the base array is being freed (it still exports the region's buffer), so a
        # region that is not kept is left to reference counting, which unmaps it right after.
        size = len(region)
        with self._lock:
            if not self._closed and self._free_bytes + size <= self.capacity:
                self._free.setdefault(size, []).append(region)
                self._free_bytes += size

    def make_room_for(self, nbytes: int) -> None:
        """Keep up to ``nbytes`` (a message just admitted) when its arrays are dropped: a
        server then reuses one model's memory round after round, even above the budget."""
        with self._lock:
            self.capacity = max(self.capacity, nbytes)

    @property
    def free_bytes(self) -> int:
        """Bytes waiting in the pool."""
        return self._free_bytes

    def close(self) -> None:
        """Drop every pooled region; arrays still in use are unmapped when they die."""
        with self._lock:
            self._closed = True
            self._free.clear()
            self._free_bytes = 0
            self._to_populate.clear()


def _report_populate(future: asyncio.Future[None]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.error("faulting in received-array memory failed", exc_info=future.exception())


class ChunkCopier:
    """One thread that copies verified chunks into their arrays, beside the event loop.

    ``np.copyto`` releases the GIL while it copies; xxh3 (the chunk check) does not. With the
    copy on its own thread the event loop hashes and dispatches the next chunk while the last
    one is copied, so a receiver's event loop costs about the larger of the two instead of
    their sum. That pays only where a core is free for the thread. Measured with
    ``benchmarks/stream.py``'s 1 GiB transfer, sender and receiver on one machine (docs/
    benchmarks.md, "Stream layer"): on 16 cores ipc went from 0.84-1.04 to 1.09-1.16 of raw
    pyzmq (tcp unchanged, 1.05-1.17); on 4 cores ipc fell from 0.98-1.08 to 0.75-0.79 and tcp
    from 1.07-1.20 to 0.89-1.04; on 2 cores tcp was unchanged and ipc 0-15 % slower. So by
    default the thread is used only where the process may run on :data:`COPIER_MIN_CORES`
    cores or more; elsewhere copies run on the caller's thread, as they did before. The thread
    starts with the first copy and ends with :meth:`close`.
    """

    def __init__(self, threaded: bool | None = None) -> None:
        self._threaded = _usable_cores() >= COPIER_MIN_CORES if threaded is None else threaded
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None

    @property
    def threaded(self) -> bool:
        """Whether copies go to the copier's thread: if not (too few cores, or closed), the
        caller copies them itself."""
        return self._threaded

    def submit(self, target: memoryview, data: Buffer) -> concurrent.futures.Future[None]:
        """Copy ``data`` into ``target`` (same length) on the copier's thread.

        Raises
        ------
        RuntimeError
            If the copier is not :attr:`threaded`.
        """
        if not self._threaded:
            raise RuntimeError("this chunk copier has no thread: copy on the caller's")
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix="fedcell-stream-copy"
            )
        return self._executor.submit(_copy, target, data)

    def close(self) -> None:
        """Finish the queued copies and stop the thread; later copies are the callers'."""
        self._threaded = False
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _copy(target: memoryview, data: Buffer) -> None:
    np.copyto(np.frombuffer(target, dtype=np.uint8), np.frombuffer(data, dtype=np.uint8))


class MessageSink:
    """Preallocated arrays of one message; chunks are scattered straight into them.

    Pieces of :data:`COPIED_APART_MIN_BYTES` or more are copied by the :class:`ChunkCopier`; at
    most :data:`COPY_AHEAD` such copies run behind the caller, and :meth:`finish` waits for all
    of them. A copy holds its piece (a received frame) and its target view (which keeps the
    array, and so its pooled memory, alive) until it is done.
    """

    def __init__(
        self,
        envelope: Envelope,
        tree: Any,
        specs: list[codec.ArraySpec],
        pool: ArrayPool,
        copier: ChunkCopier,
    ) -> None:
        self._envelope = envelope
        self._tree = tree
        self._arrays = [pool.allocate(spec) for spec in specs]
        self._views = [codec.writable_bytes(array) for array in self._arrays]
        self._regions = Regions([view.nbytes for view in self._views])
        self._copier = copier
        self._copies: deque[concurrent.futures.Future[None]] = deque()

    def target(self, offset: int, length: int) -> memoryview | None:
        """The destination bytes if ``[offset, offset+length)`` lies inside one array."""
        index, start = self._regions.locate(offset)
        view = self._views[index]
        if start + length <= view.nbytes:
            return view[start : start + length]
        return None

    def write(self, offset: int, pieces: Sequence[Buffer]) -> None:
        for index, start, data in self._regions.split(offset, pieces):
            target = self._views[index][start : start + data.nbytes]
            if data.nbytes < COPIED_APART_MIN_BYTES or not self._copier.threaded:
                target[:] = data
                continue
            self._copies.append(self._copier.submit(target, data))
            while len(self._copies) > COPY_AHEAD:
                self._copies.popleft().result()

    def _settle(self) -> None:
        while self._copies:
            self._copies.popleft().result()

    def finish(self, digest: str) -> Message:
        try:
            self._settle()
        except Exception as exc:
            raise StreamError(f"copying received chunks into their arrays failed: {exc}") from exc
        arrays = self._arrays
        payload = codec.decode(self._tree, [], arrays=lambda spec: arrays[spec.frame])
        self.abort()  # the message owns the arrays now
        return Message(self._envelope, payload)

    def abort(self) -> None:
        with contextlib.suppress(Exception):  # the message is dropped: its copies' fate too
            self._settle()
        self._views.clear()
        self._arrays.clear()


class FileSink:
    """A temporary file next to ``destination``, renamed into place once verified."""

    def __init__(self, envelope: Envelope, offer: FileOffer, destination: Path) -> None:
        self._envelope = envelope
        self._offer = offer
        self._destination = destination
        try:
            self._fd, temp = tempfile.mkstemp(
                dir=destination.parent, prefix=f".{destination.name}.", suffix=".part"
            )
        except OSError as exc:
            raise StreamError(f"cannot create a temporary file for {destination}: {exc}") from exc
        self.temp_path = Path(temp)

    def target(self, offset: int, length: int) -> memoryview | None:
        return None

    def write(self, offset: int, pieces: Sequence[Buffer]) -> None:
        try:
            for piece in pieces:
                view = memoryview(piece).cast("B")
                while view.nbytes:
                    written = os.pwrite(self._fd, view, offset)
                    view = view[written:]
                    offset += written
        except OSError as exc:
            raise StreamError(f"writing {self.temp_path} failed: {exc}") from exc

    def finish(self, digest: str) -> Message:
        try:
            size = os.fstat(self._fd).st_size
            if size != self._offer.size:
                raise StreamIntegrityError(
                    f"{self.temp_path} has {size} bytes, expected {self._offer.size}"
                )
            os.close(self._fd)
            self._fd = -1
            os.replace(self.temp_path, self._destination)
        except OSError as exc:
            raise StreamError(f"cannot move the received file to {self._destination}: {exc}") from exc
        received = ReceivedFile(
            str(self._destination), size, digest, self._offer.name, self._offer.meta
        )
        return Message(self._envelope, received)

    def abort(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self.temp_path.unlink(missing_ok=True)


def _file_layout(raw: bytes, max_tree_bytes: int) -> tuple[str, dict[str, Any]]:
    try:
        layout = msgpack.unpackb(raw, raw=False)
    except Exception as exc:
        raise FrameError(f"file description does not decode: {exc}") from exc
    if not isinstance(layout, dict) or type(layout.get("name")) is not str:
        raise FrameError("file description lacks a name")
    meta_tree = layout.get("meta")
    if type(meta_tree) is not bytes:
        raise FrameError("file description lacks its meta tree")
    meta = codec.decode(codec.unpack_tree(meta_tree, max_tree_bytes), [])
    if not isinstance(meta, dict):
        raise FrameError("file meta is not a map")
    return layout["name"], meta


class InboundStream:
    """One stream from one peer: validated layout, admission state, sink, progress, digest."""

    def __init__(
        self,
        peer: str,
        header: Open,
        *,
        max_chunk_size: int,
        max_tree_bytes: int,
        file_sink: FileSinkPolicy | None,
        pool: ArrayPool,
        copier: ChunkCopier,
        array_sink: ArraySinkHook | None = None,
    ) -> None:
        """Validate ``header`` (nothing is allocated until :meth:`grant`).

        ``array_sink`` is asked, for a message, whether an :class:`ArraySink` consumes its arrays
        as they arrive; such a stream costs at most a window, like a file.

        Raises
        ------
        FrameError, OversizedError
            If the header's layout is malformed or inconsistent.
        ConfigError
            If the codec is unknown or the file sink refuses the file.
        FedcellError
            Whatever ``array_sink`` raised to refuse the stream.
        """
        if not 0 < header.chunk <= max_chunk_size:
            raise FrameError(f"chunk size {header.chunk} outside (0, {max_chunk_size}]")
        if header.window < header.chunk:
            raise FrameError(f"window {header.window} is smaller than a chunk ({header.chunk})")
        compression.get_codec(header.codec)
        self.peer = peer
        self.sid = header.sid
        self.kind = header.kind
        self.size = header.size
        self.chunk = header.chunk
        self.codec = header.codec
        # The sink factories close over locals, never over ``self``: a reference cycle would keep
        # a received model's arrays alive until the cyclic garbage collector runs.
        envelope = unpack_envelope(header.envelope)
        self._make_sink: Callable[[], MessageSink | FileSink | ArraySinkAdapter]
        self._consumer: ArraySinkAdapter | None = None
        if header.kind == "message":
            tree = codec.unpack_tree(header.layout, max_tree_bytes)
            specs = codec.array_specs(tree)
            total = sum(spec.nbytes for spec in specs)
            if total != header.size:
                raise FrameError(f"payload arrays hold {total} bytes; the stream announces {header.size}")
            consumer = array_sink(envelope, skeleton(tree)) if array_sink is not None else None
            if consumer is not None:
                adapter = self._consumer = ArraySinkAdapter(envelope, specs, consumer)
                self.cost = min(header.size, header.window)  # the chunks in flight, as a file
                self._make_sink = lambda: adapter
            else:
                self.cost = header.size
                self._make_sink = lambda: MessageSink(envelope, tree, specs, pool, copier)
        else:
            if file_sink is None:
                raise ConfigError("this endpoint accepts no files (no file sink policy)")
            name, meta = _file_layout(header.layout, max_tree_bytes)
            offer = FileOffer(peer, name, header.size, envelope.channel, meta)
            destination = file_sink(offer)
            # A file costs about one window of memory whatever its size.
            self.cost = min(header.size, header.window)
            self._make_sink = lambda: FileSink(envelope, offer, destination)
        self.sink: MessageSink | FileSink | ArraySinkAdapter | None = None
        self.received = 0
        self.next_seq = 0
        self.last_progress = time.monotonic()
        # Ack every quarter window: blocked senders always get one (a sender waits only once
        # more than ``window - chunk`` bytes are unacked, which is at least ``ack_every``), at a
        # quarter of the messages of acking every chunk.
        self.ack_every = max(header.chunk, min(header.window // 4, header.window - header.chunk))
        self.ack_sent = 0
        self.ack_posted = False
        self.closed = False
        self._digest = StreamDigest()
        # A file's content digest (what ReceivedFile.digest reports); messages need none.
        self._content = xxhash.xxh3_128() if header.kind == "file" else None

    @property
    def granted(self) -> bool:
        return self.sink is not None

    def grant(self) -> None:
        """Allocate the sink (arrays or temporary file)."""
        self.sink = self._make_sink()
        self.last_progress = time.monotonic()

    def write_chunk(self, data: Data, frames: Sequence[Buffer]) -> None:
        """Verify one chunk and write it in place (see the module docstring for the checks)."""
        if self.sink is None:
            raise FrameError(f"stream {self.sid} from {self.peer}: data before the grant")
        if data.seq != self.next_seq or data.offset != self.received:
            raise StreamIntegrityError(
                f"stream {self.sid} from {self.peer}: got chunk {data.seq} at byte {data.offset}, "
                f"expected chunk {self.next_seq} at byte {self.received} (a chunk was lost)"
            )
        if not 0 < data.raw <= self.chunk or self.received + data.raw > self.size:
            raise FrameError(
                f"stream {self.sid} from {self.peer}: chunk {data.seq} of {data.raw} bytes does not "
                f"fit chunk size {self.chunk} / total {self.size}"
            )
        if data.codec not in (compression.NONE, self.codec):
            raise FrameError(
                f"stream {self.sid} from {self.peer}: chunk codec {data.codec!r} was not announced"
            )
        wire_hash = chunk_hash(frames)
        if wire_hash != data.hash:
            raise StreamIntegrityError(
                f"stream {self.sid} from {self.peer}: chunk {data.seq} fails its checksum"
            )
        if data.codec == compression.NONE:
            wire = sum(memoryview(f).nbytes for f in frames)
            if wire != data.raw:
                raise StreamIntegrityError(
                    f"stream {self.sid} from {self.peer}: chunk {data.seq} has {wire} bytes, "
                    f"announced {data.raw}"
                )
            self.sink.write(data.offset, frames)
            self._digest.add(wire_hash)
            if self._content is not None:
                for frame in frames:
                    self._content.update(frame)
        else:
            packed = frames[0] if len(frames) == 1 else b"".join(frames)
            target = self.sink.target(data.offset, data.raw)
            if target is None:  # spans arrays: decompressed apart (a buffer of its own, since
                # the sink may still be copying it after this returns), then scattered
                target = memoryview(bytearray(data.raw))
                compression.get_codec(data.codec).decompress_into(packed, target)
                self.sink.write(data.offset, [target])
            else:
                compression.get_codec(data.codec).decompress_into(packed, target)
            self._digest.add(xxhash.xxh3_64_intdigest(target))
            if self._content is not None:
                self._content.update(target)
        self.received += data.raw
        self.next_seq += 1
        self.last_progress = time.monotonic()

    def finish(self, end: End) -> Message:
        """Verify ``END`` against what arrived and build the message to deliver."""
        if self.sink is None:
            raise FrameError(f"stream {self.sid} from {self.peer}: END before the grant")
        if end.chunks != self.next_seq or end.size != self.size or self.received != self.size:
            raise StreamIntegrityError(
                f"stream {self.sid} from {self.peer} is truncated: {self.received} of {self.size} "
                f"bytes in {self.next_seq} chunks; the sender sent {end.chunks} chunks"
            )
        if end.digest != self._digest.digest():
            raise StreamIntegrityError(
                f"stream {self.sid} from {self.peer}: whole-stream checksum mismatch"
            )
        self.closed = True
        # A file reports its content's xxh3_128 (ReceivedFile.digest); a message, the stream's.
        reported = end.digest.hex() if self._content is None else self._content.hexdigest()
        return self.sink.finish(reported)

    def abort(self, error: StreamError | None = None) -> None:
        """Discard what arrived; an :class:`ArraySink` is told ``error`` (admitted or not)."""
        self.closed = True
        if self._consumer is not None:
            self._consumer.abort(error)
        elif self.sink is not None:
            self.sink.abort()
