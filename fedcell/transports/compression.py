"""Chunk compression codecs for the stream layer, and the rule that decides when to compress.

Registry
--------
A codec is an object with a ``name`` and two methods (:class:`ChunkCodec`): ``compress(data,
typesize)`` returns the compressed bytes of one chunk, ``decompress_into(data, out)`` fills
``out`` (exactly the chunk's raw length) or raises. Built-ins live in one table
(:data:`BUILTINS`): ``none``, ``blosc2-lz4`` and ``blosc2-zstd``. Both blosc2 codecs byte-shuffle
with the array's itemsize as ``typesize``: for float weights the sign/exponent bytes of
neighbouring values are alike, the mantissa bytes are noise, and shuffling puts like bytes
together. Third-party codecs register through the entry-point group ``fedcell.codecs``
(``name = "package.module:factory"``, the factory called with no argument) or at run time with
:func:`register_codec`. Nothing scans folders.

The receiver never trusts a compressed chunk: before decompressing it reads the blosc2 header and
refuses a chunk whose announced raw size differs from the chunk's raw length (no decompression
bombs); a chunk that does not decompress raises :class:`~fedcell.errors.FrameError`. The stream
layer checks every chunk's checksum before decompressing it, so a corrupted chunk never reaches
the decompressor.

When compression pays
---------------------
Compressing costs CPU on both ends and saves link time. :func:`choose_codec` compresses a sample
of the payload (a few slices spread over it) with each candidate and estimates, per raw byte::

    cost(none)  = 1 / link
    cost(codec) = t_compress + t_decompress + (compressed / raw) / link

where ``link`` is the link's throughput in bytes per second (the stream layer measures it from
acks and starts from a hint). The decompression time is taken to be the sample's measured one, on
the assumption that both ends have similar CPUs. A codec is chosen only if it is at least
:data:`MIN_GAIN` (10 %) cheaper than sending raw: estimates from a small sample are noisy, and
"compress when it barely pays" loses on the next stream. On loopback (~2 GB/s) nothing pays; on a
100 Mbit/s link (12.5 MB/s) blosc2-lz4 pays as soon as the data shrinks by a few percent, and for
float32 weights rounded to bf16 precision (half the bytes are zeros) it roughly halves the time.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, Protocol, runtime_checkable

from fedcell.errors import ConfigError, FrameError
from fedcell.transports.base import Buffer

__all__ = [
    "BUILTINS",
    "ENTRY_POINT_GROUP",
    "MIN_GAIN",
    "NONE",
    "Blosc2Codec",
    "ChunkCodec",
    "CodecChoice",
    "NoCompression",
    "available_codecs",
    "choose_codec",
    "get_codec",
    "register_codec",
]

ENTRY_POINT_GROUP = "fedcell.codecs"
_BLOSC2_HEADER_BYTES = 32
NONE = "none"
MIN_GAIN = 0.10


@runtime_checkable
class ChunkCodec(Protocol):
    """What a chunk codec provides."""

    @property
    def name(self) -> str:
        """The registry name, recorded in every chunk header."""

    def compress(self, data: Buffer, typesize: int) -> Buffer:
        """Compress one chunk; ``typesize`` is the itemsize of the array it belongs to."""

    def decompress_into(self, data: Buffer, out: memoryview) -> None:
        """Decompress ``data`` into ``out``, which is exactly the chunk's raw length.

        Raises ``FrameError`` if ``data`` is malformed or does not decompress to ``len(out)``.
        """


class NoCompression:
    """The identity codec: chunks travel as raw bytes."""

    name = NONE

    def compress(self, data: Buffer, typesize: int) -> Buffer:
        return data

    def decompress_into(self, data: Buffer, out: memoryview) -> None:
        src = memoryview(data).cast("B")
        if src.nbytes != out.nbytes:
            raise FrameError(f"raw chunk has {src.nbytes} bytes, expected {out.nbytes}")
        out[:] = src


def _blosc2() -> Any:
    """blosc2, imported on first use: with what it imports (numexpr, ndindex, httpx) it was
    0.3 s and 20 MiB of every fedcell process's start-up (``import fedcell.transports.cell``:
    0.34 s / 59 MiB RSS with it, 0.20 s / 40 MiB without), and most processes never compress."""
    import blosc2

    return blosc2


@dataclass(frozen=True, slots=True)
class Blosc2Codec:
    """blosc2 with byte shuffle; ``inner`` names the compressor (``"LZ4"`` or ``"ZSTD"``)."""

    name: str
    inner: str
    clevel: int

    def compress(self, data: Buffer, typesize: int) -> Buffer:
        blosc2 = _blosc2()
        src = memoryview(data).cast("B")
        # blosc2 refuses a typesize that does not divide the buffer; 1 means "no shuffle".
        size = typesize if 0 < typesize <= 255 and src.nbytes % typesize == 0 else 1
        out: Buffer = blosc2.compress(
            src,
            typesize=size,
            clevel=self.clevel,
            filter=blosc2.Filter.SHUFFLE,
            codec=blosc2.Codec[self.inner],
        )
        return out

    def decompress_into(self, data: Buffer, out: memoryview) -> None:
        blosc2 = _blosc2()
        src = memoryview(data).cast("B")
        if src.nbytes < _BLOSC2_HEADER_BYTES:
            raise FrameError(f"{self.name} chunk of {src.nbytes} bytes is shorter than its header")
        try:
            raw_size, packed_size, _ = blosc2.get_cbuffer_sizes(src)
        except Exception as exc:
            raise FrameError(f"{self.name} chunk has no valid blosc2 header: {exc}") from exc
        # blosc2 trusts the sizes in the header: check them before it reads or writes anything.
        if packed_size != src.nbytes:
            raise FrameError(
                f"{self.name} chunk has {src.nbytes} bytes; its header says {packed_size}"
            )
        if raw_size != out.nbytes:
            raise FrameError(
                f"{self.name} chunk decompresses to {raw_size} bytes, expected {out.nbytes}"
            )
        try:
            blosc2.decompress(src, dst=out)
        except Exception as exc:
            raise FrameError(f"{self.name} chunk does not decompress: {exc}") from exc


#: name -> factory of the built-in codecs.
BUILTINS: dict[str, Callable[[], ChunkCodec]] = {
    NONE: NoCompression,
    "blosc2-lz4": lambda: Blosc2Codec("blosc2-lz4", "LZ4", clevel=5),
    "blosc2-zstd": lambda: Blosc2Codec("blosc2-zstd", "ZSTD", clevel=1),
}

_registered: dict[str, ChunkCodec] = {}


def register_codec(codec: ChunkCodec, *, replace: bool = False) -> None:
    """Register ``codec`` under ``codec.name``.

    Raises
    ------
    ConfigError
        If the name is taken (and ``replace`` is false) or ``codec`` is not a :class:`ChunkCodec`.
    """
    if not isinstance(codec, ChunkCodec):
        raise ConfigError(f"{codec!r} does not provide name/compress/decompress_into")
    taken = codec.name in _registered or codec.name in BUILTINS
    if taken and not replace and _registered.get(codec.name) is not codec:
        raise ConfigError(f"compression codec {codec.name!r} is already registered")
    _registered[codec.name] = codec


def get_codec(name: str) -> ChunkCodec:
    """The codec registered as ``name`` (built-in, run-time or entry point).

    Raises
    ------
    ConfigError
        If no codec has that name (``FrameError`` callers map it when the name came off the wire).
    """
    codec = _registered.get(name)
    if codec is not None:
        return codec
    factory = BUILTINS.get(name)
    if factory is None:
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            if ep.name == name:
                factory = ep.load()
                break
    if factory is None:
        raise ConfigError(
            f"unknown compression codec {name!r} (known: {', '.join(available_codecs())})"
        )
    codec = factory()
    if not isinstance(codec, ChunkCodec) or codec.name != name:
        raise ConfigError(f"codec factory for {name!r} did not return a ChunkCodec named {name!r}")
    _registered[name] = codec
    return codec


def available_codecs() -> list[str]:
    """Names of the built-in, run-time registered and entry-point codecs."""
    names = set(BUILTINS) | set(_registered)
    names.update(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))
    return sorted(names)


@dataclass(frozen=True, slots=True)
class CodecChoice:
    """The outcome of :func:`choose_codec`: the codec and the estimates behind the choice.

    ``costs`` maps each candidate to its estimated seconds per raw byte; ``ratios`` to its
    compression ratio (raw / compressed) on the sample.
    """

    name: str
    costs: dict[str, float]
    ratios: dict[str, float]


def choose_codec(
    samples: Sequence[tuple[Buffer, int]],
    link_bytes_per_s: float,
    candidates: Sequence[str] = ("blosc2-lz4", "blosc2-zstd"),
) -> CodecChoice:
    """Pick the cheapest way to move data like ``samples`` over a link of the given throughput.

    Parameters
    ----------
    samples:
        ``(bytes, typesize)`` slices of the payload (the stream layer takes a few spread over it).
    link_bytes_per_s:
        Estimated link throughput in bytes per second.
    candidates:
        Codec names to try besides ``none``.

    Raises
    ------
    ConfigError
        If a candidate is unknown or ``link_bytes_per_s`` is not positive.
    """
    if link_bytes_per_s <= 0:
        raise ConfigError(f"link throughput must be positive, got {link_bytes_per_s}")
    raw_cost = 1.0 / link_bytes_per_s
    costs = {NONE: raw_cost}
    ratios = {NONE: 1.0}
    total = sum(memoryview(data).nbytes for data, _ in samples)
    if total == 0:
        return CodecChoice(NONE, costs, ratios)
    for name in candidates:
        codec = get_codec(name)
        compressed = 0
        seconds = 0.0
        for data, typesize in samples:
            view = memoryview(data).cast("B")
            scratch = memoryview(bytearray(view.nbytes))
            start = time.perf_counter()
            packed = codec.compress(view, typesize)
            codec.decompress_into(packed, scratch)
            seconds += time.perf_counter() - start
            compressed += memoryview(packed).nbytes
        ratios[name] = total / max(compressed, 1)
        costs[name] = seconds / total + (compressed / total) / link_bytes_per_s
    best = min(costs, key=costs.__getitem__)
    if best != NONE and costs[best] > raw_cost * (1.0 - MIN_GAIN):
        best = NONE
    return CodecChoice(best, costs, ratios)
