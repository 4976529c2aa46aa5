"""Transports keyed by URL scheme.

Built-ins are named in one table (:data:`BUILTINS`) and imported on first use, so that importing
``fedcell.transports`` stays cheap. Third-party transports register through the entry-point group
``fedcell.transports`` (``scheme = "package.module:TransportClass"``) or at run time with
:func:`register_transport`. Nothing scans folders.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from urllib.parse import urlsplit

from fedcell.errors import ConfigError, UnknownSchemeError
from fedcell.transports.base import Transport, TransportOptions

__all__ = ["BUILTINS", "ENTRY_POINT_GROUP", "get_transport", "register_transport", "scheme_of"]

ENTRY_POINT_GROUP = "fedcell.transports"

#: scheme -> "module:Class" of the built-in transports (imported lazily).
BUILTINS: dict[str, str] = {
    "inproc": "fedcell.transports.inproc:InprocTransport",
    "tcp": "fedcell.transports.zmq_transport:ZmqTransport",
    "ipc": "fedcell.transports.zmq_transport:ZmqTransport",
}

_registered: dict[str, type[Transport]] = {}


def scheme_of(url: str) -> str:
    """Return the scheme of ``url``; raise ``ConfigError`` if it has none."""
    scheme = urlsplit(url).scheme
    if not scheme:
        raise ConfigError(f"transport URL {url!r} has no scheme (expected e.g. tcp://host:port)")
    return scheme


def register_transport(transport_cls: type[Transport], *, replace: bool = False) -> None:
    """Register ``transport_cls`` for each scheme in its ``schemes``."""
    for scheme in transport_cls.schemes:
        if scheme in _registered and not replace and _registered[scheme] is not transport_cls:
            raise ConfigError(f"transport scheme {scheme!r} is already registered")
        _registered[scheme] = transport_cls


def _load(spec: str) -> type[Transport]:
    module_name, _, attr = spec.partition(":")
    cls = getattr(importlib.import_module(module_name), attr)
    if not (isinstance(cls, type) and issubclass(cls, Transport)):
        raise ConfigError(f"{spec} is not a fedcell Transport subclass")
    return cls


def _lookup(scheme: str) -> type[Transport]:
    if scheme in _registered:
        return _registered[scheme]
    if scheme in BUILTINS:
        cls = _load(BUILTINS[scheme])
        _registered[scheme] = cls
        return cls
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == scheme:
            cls = _load(ep.value)
            _registered[scheme] = cls
            return cls
    known = sorted(set(BUILTINS) | set(_registered))
    raise UnknownSchemeError(f"no transport for scheme {scheme!r} (known: {', '.join(known)})")


def get_transport(url: str, options: TransportOptions | None = None) -> Transport:
    """Return a transport instance able to serve ``url``."""
    return _lookup(scheme_of(url))(options)
