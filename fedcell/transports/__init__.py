"""Byte movers selected by URL scheme, the wire codec, cells and the stream layer.

This package imports nothing from the rest of fedcell (``engine``, ``controllers``, ...).
"""

from __future__ import annotations

from fedcell.transports.base import (
    Buffer,
    Connection,
    ConnectionStats,
    Listener,
    Transport,
    TransportOptions,
)
from fedcell.transports.registry import get_transport, register_transport


async def listen(url: str, options: TransportOptions | None = None) -> Listener:
    """Listen on ``url`` with the transport registered for its scheme."""
    return await get_transport(url, options).listen(url)


async def connect(url: str, options: TransportOptions | None = None) -> Connection:
    """Connect to ``url`` with the transport registered for its scheme."""
    return await get_transport(url, options).connect(url)


__all__ = [
    "Buffer",
    "Connection",
    "ConnectionStats",
    "Listener",
    "Transport",
    "TransportOptions",
    "connect",
    "get_transport",
    "listen",
    "register_transport",
]
