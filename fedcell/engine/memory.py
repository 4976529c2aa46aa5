"""Process-wide allocator settings for fedcell's own processes (servers, sites, simulator).

ZeroMQ allocates every message it receives with ``malloc`` on its I/O thread: a 1 GiB stream
is 256 mallocs of 4 MiB (plus a few bytes), each freed once the stream layer has copied the
chunk into its array. Which memory glibc hands back for those blocks decides what receiving
costs:

- **mmap-ed blocks** (glibc's first choice above its 128 KiB threshold, and every time when the
  threshold is pinned there) are fresh pages: the I/O thread faults in and zeroes all 4 MiB of
  every chunk, 262 144 page faults per GiB received.
- **heap blocks** are reused, already faulted in. glibc's *dynamic* threshold gets there by
  itself after the first free (it raises the mmap threshold to the freed block's size), but it
  also sets the trim threshold to twice that size, 8 MiB: whenever more than 8 MiB is free at
  the top of the I/O thread's heap (a window of chunks just copied), it gives the pages back
  and the next chunks fault them in again: 31 000-63 000 faults per GiB on this project's VM.

:func:`tune_allocator_for_streams` pins the mmap threshold at glibc's ceiling for its dynamic
one (32 MiB: any chunk size a stream normally uses comes from the heap) and the trim threshold
at one default stream window (32 MiB of free heap top is kept: the room the next window's chunks
need). Blocks above 32 MiB (large arrays) are still mmap-ed and go back to the system when
freed. Measured (docs/benchmarks.md, "Stream layer" and "FedAvg of a 1 GiB model"): page faults
of the receiving I/O thread 31 000-63 000 → under 4 000 per GiB; a FedAvg round of a 256 MiB
model with 4 site processes 1.62 → 0.98-1.01 s (server peak RSS 431-434 → 421-486 MiB), of a
1 GiB model with 8 sites 13.5 → 7.7-8.4 s (server 1272 → 1307-1539 MiB, within its
2·S + 256 MiB budget). It replaces pinning the mmap threshold at 128 KiB, chosen when the
server assembled whole results from 1 MiB chunks and retained heap chunks grew it to 2.6 GiB on
that 256 MiB × 4 run; results are folded as they stream in since. A process whose owner set
``GLIBC_TUNABLES`` for ``malloc`` keeps the owner's settings.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "tune_allocator_for_streams"]

#: Blocks at least this large are mmap-ed (glibc's ceiling for its dynamic threshold).
MMAP_THRESHOLD = 32 * 1024 * 1024
#: Free heap top beyond this is given back to the system (one default stream window).
TRIM_THRESHOLD = 32 * 1024 * 1024
_M_TRIM_THRESHOLD = -1  # from glibc's malloc.h
_M_MMAP_THRESHOLD = -3

logger = logging.getLogger(__name__)
_applied = False


def tune_allocator_for_streams() -> bool:
    """Pin glibc's mmap and trim thresholds so received stream chunks reuse heap memory.

    Idempotent. Returns ``False`` (and changes nothing) off Linux, off glibc, or when
    ``GLIBC_TUNABLES`` already sets a ``glibc.malloc`` tunable.
    """
    global _applied
    if _applied:
        return True
    if not sys.platform.startswith("linux") or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    if mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) != 1 or mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) != 1:
        logger.debug("mallopt refused the stream allocator thresholds")
        return False
    _applied = True
    return True
