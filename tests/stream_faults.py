"""Fault injection into a cell's stream layer, shared by tests in several folders (``tests/`` is
on ``sys.path`` through its ``conftest.py``)."""

from __future__ import annotations

from collections.abc import Callable

from fedcell.transports.base import Buffer
from fedcell.transports.cell import Cell
from fedcell.transports.stream_protocol import Data, parse_header


def flip_a_bit_in_chunk(cell: Cell, seq: int, when: Callable[[], bool]) -> None:
    """Make ``cell``'s stream layer send chunk ``seq`` of its streams with its first byte's low
    bit flipped, whenever ``when()`` holds at that moment (the receiver's checksum catches it)."""
    endpoint = cell._stream
    assert endpoint is not None
    send = endpoint._send_frames

    async def flipping(peer: str, frames: list[Buffer]) -> None:
        header = parse_header(frames[0], 1 << 30)
        if isinstance(header, Data) and header.seq == seq and when():
            flipped = bytearray(memoryview(frames[1]).cast("B"))
            flipped[0] ^= 1
            frames = [frames[0], bytes(flipped), *frames[2:]]
        await send(peer, frames)

    endpoint._send_frames = flipping
