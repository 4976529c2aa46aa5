"""Consuming a streamed message's arrays chunk by chunk, without ever assembling them.

The default receiver of a streamed message (:class:`~fedcell.transports.stream_receiver.MessageSink`)
preallocates every array and delivers the message once all of it arrived: receiving S bytes costs
S. A consumer that only *reduces* the arrays (a server summing N model updates) does not need
them whole. An :class:`ArraySink` takes each verified piece as it arrives instead, and the stream
then costs about its window of memory, like a file.

Contract
--------
An application installs a hook on the :class:`~fedcell.transports.stream.StreamEndpoint`
(a cell does it for the replies of requests made with ``reply_sink``). The hook is called at
``OPEN`` with the message's envelope and the payload's *skeleton* (:func:`skeleton`: the payload
decoded with each array replaced by its :class:`~fedcell.transports.codec.ArraySpec`), so the
consumer sees every non-array value (names, weights, metadata) and every array's dtype and shape
before a single byte of data. It returns an :class:`ArraySink`, ``None`` to receive the message
as usual, or raises a :class:`~fedcell.errors.FedcellError` to refuse the stream (the sender is
told why).

Then, for each chunk, only after the chunk passed its checksum (and decompressed to its
announced length), :meth:`ArraySink.write` gets ``(frame, start, data)``: bytes
``[start, start + len(data))`` of array number ``frame`` (the spec's frame index). Pieces arrive
in order, each array front to back, and hold **whole elements only**: a chunk boundary that falls
inside an element (stream offsets are fixed multiples of the chunk size; arrays of odd sizes
shift element boundaries) is carried over by :class:`ArraySinkAdapter` in a buffer of at most one
element, so a consumer can view every piece with the array's dtype. ``data`` is valid only during
the call.

When ``END`` verified the chunk count, size and whole-stream digest, :meth:`ArraySink.finish`
returns the payload to deliver in place of the decoded message. On any failure (a later chunk
fails its checksum, the sender cancels or stalls, the peer is lost, the receiver is closing, the
sink itself raised) :meth:`ArraySink.abort` is called once, instead of ``finish``.

What a failure means is the consumer's business, and it is the hard part: the pieces written
before the failure were verified but the message as a whole never was. A consumer that folds
pieces into an aggregate as they come has added part of a message, which it cannot take back
without the bytes; it must treat the aggregate as tainted (see
:meth:`fedcell.engine.dispatcher.Dispatcher.broadcast_and_wait` for how rounds recover).
"""

from __future__ import annotations

import abc
import bisect
import math
from collections.abc import Iterator, Sequence
from typing import Any

from fedcell.errors import FedcellError, StreamError
from fedcell.transports import codec
from fedcell.transports.base import Buffer
from fedcell.transports.message import Envelope, Message

__all__ = ["ArraySink", "ArraySinkAdapter", "Regions", "skeleton"]


class Regions:
    """A stream's raw bytes as consecutive regions (one per array): where an offset falls.

    Parameters
    ----------
    sizes:
        Each region's size in bytes, in stream order.
    """

    def __init__(self, sizes: Sequence[int]) -> None:
        self.sizes = list(sizes)
        self.starts: list[int] = []
        total = 0
        for size in self.sizes:
            self.starts.append(total)
            total += size

    def locate(self, offset: int) -> tuple[int, int]:
        """``(region, offset inside it)`` of the stream offset ``offset``."""
        index = bisect.bisect_right(self.starts, offset) - 1
        return index, offset - self.starts[index]

    def split(
        self, offset: int, pieces: Sequence[Buffer]
    ) -> Iterator[tuple[int, int, memoryview]]:
        """``pieces`` (consecutive bytes from ``offset``) cut at region boundaries, as
        ``(region, offset inside it, bytes)``."""
        index, _ = self.locate(offset)
        for piece in pieces:
            src = memoryview(piece).cast("B")
            while src.nbytes:
                while offset - self.starts[index] >= self.sizes[index]:
                    index += 1
                start = offset - self.starts[index]
                take = min(src.nbytes, self.sizes[index] - start)
                yield index, start, src[:take]
                src = src[take:]
                offset += take

class ArraySink(abc.ABC):
    """Takes a streamed message's verified array bytes as they arrive (see the module docstring).

    Implementations raise a :class:`~fedcell.errors.FedcellError` from :meth:`write` or
    :meth:`finish` to fail the stream (the sender is told why, then :meth:`abort` is called).
    """

    @abc.abstractmethod
    def write(self, frame: int, start: int, data: memoryview) -> None:
        """Bytes ``[start, start + data.nbytes)`` of array ``frame``: whole elements, in order."""

    @abc.abstractmethod
    def finish(self) -> Any:
        """Every byte arrived and the stream verified: return the payload to deliver."""

    @abc.abstractmethod
    def abort(self, error: StreamError) -> None:
        """The stream failed (``error`` says why); nothing more will be written."""


def skeleton(tree: Any) -> Any:
    """The payload of ``tree`` with each array replaced by its :class:`~codec.ArraySpec`.

    Raises
    ------
    FrameError
        If the tree is malformed.
    """
    return codec.decode(tree, [], arrays=lambda spec: spec)


class ArraySinkAdapter:
    """Feeds an :class:`ArraySink` from a stream's chunks: the stream layer's sink interface
    (``target``/``write``/``finish``/``abort``, as :class:`MessageSink` has) over byte offsets,
    split per array and cut at element boundaries."""

    def __init__(
        self, envelope: Envelope, specs: Sequence[codec.ArraySpec], sink: ArraySink
    ) -> None:
        self._envelope = envelope
        self._sink = sink
        self._itemsizes = [spec.nbytes // max(1, math.prod(spec.shape)) or 1 for spec in specs]
        self._regions = Regions([spec.nbytes for spec in specs])
        self._carry = bytearray()  # the head of an element cut by the last chunk boundary
        self._done = False

    def target(self, offset: int, length: int) -> memoryview | None:
        """Compressed chunks decompress into the stream's scratch buffer, then :meth:`write`."""
        return None

    def write(self, offset: int, pieces: Sequence[Buffer]) -> None:
        for index, start, data in self._regions.split(offset, pieces):
            self._emit(index, start, data)

    def _emit(self, index: int, start: int, data: memoryview) -> None:
        itemsize = self._itemsizes[index]
        if self._carry:
            need = itemsize - len(self._carry)
            self._carry += data[:need]
            data = data[need:]
            if len(self._carry) < itemsize:
                return
            self._call(index, start - itemsize + need, memoryview(self._carry))
            self._carry = bytearray()
            start += need
        whole = data.nbytes - data.nbytes % itemsize
        if whole:
            self._call(index, start, data[:whole])
        if whole < data.nbytes:
            self._carry = bytearray(data[whole:])

    def _call(self, index: int, start: int, data: memoryview) -> None:
        try:
            self._sink.write(index, start, data)
        except FedcellError:
            raise
        except Exception as exc:  # a bug in the consumer must not take the receive loop down
            raise StreamError(f"the array sink failed: {type(exc).__name__}: {exc}") from exc

    def finish(self, digest: str) -> Message:
        try:
            payload = self._sink.finish()
        except FedcellError:
            raise
        except Exception as exc:
            raise StreamError(f"the array sink failed: {type(exc).__name__}: {exc}") from exc
        self._done = True
        return Message(self._envelope, payload)

    def abort(self, error: StreamError | None = None) -> None:
        if self._done:
            return
        self._done = True
        self._sink.abort(error or StreamError("the stream was aborted"))
