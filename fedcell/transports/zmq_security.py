"""CurveZMQ security for the ZeroMQ transport: encrypted links and a ZAP handler that names peers.

Why CurveZMQ and not TLS
------------------------
libzmq has no TLS; TLS would mean a second transport (asyncio streams) next to the ZeroMQ one,
with its own framing, backpressure and reconnect logic. CurveZMQ (RFC 26) is built into libzmq:
every frame is encrypted and authenticated (Curve25519 + XSalsa20-Poly1305, perfect forward
secrecy per connection), the handshake authenticates both ends, and the ZeroMQ transport keeps its
ROUTER/DEALER design, zero-copy sends and reconnects unchanged. What CurveZMQ lacks is a PKI: a
key is just 32 bytes. The deployment layer (:mod:`fedcell.deploy`) supplies it: the project CA
signs each participant's X.509 certificate, which carries the participant's Curve25519 public key
in an extension, so the CA vouches for "this curve key is site-1".

Contract
--------
:class:`CurveSecurity` is handed to the transport in
:attr:`~fedcell.transports.base.TransportOptions.security`.

- **Connecting** (DEALER, CurveZMQ client): the socket uses the endpoint's own key pair and
  ``server_key``, the listener's public key. A listener with another key fails the handshake: a
  site cannot be lured to an impostor server.
- **Listening** (ROUTER, CurveZMQ server): the socket uses the endpoint's key pair and a ZAP domain
  of its own. ZeroMQ asks the ZAP handler (RFC 27) about each connecting client's public key; the
  handler asks the listener's :data:`KeyAuthorizer`, which returns the participant name the key
  belongs to, or ``None`` to refuse (ZAP status 400: the handshake fails, nothing reaches the
  application). The name becomes the ZAP *user id*: libzmq stamps it on every message of that
  connection as the ``User-Id`` property, and the transport exposes it as the connection's
  :attr:`~fedcell.transports.base.Connection.authenticated_identity`. The cell layer then binds
  the cell name to it (a hello claiming another name is refused).
- A listener without an authorizer or a client without ``server_key`` is a
  :class:`~fedcell.errors.ConfigError`: a secured endpoint never falls back to admitting anyone.

The ZAP handler
---------------
libzmq consults the handler bound at ``inproc://zeromq.zap.01`` of the socket's context. By
default a CURVE server with no handler bound admits every client; secured listeners set
``ZAP_ENFORCE_DOMAIN`` so that they refuse instead (fail closed). The handler is started *before*
the first secured listener binds and stays up while any secured listener exists (:func:`register_listener`
returns a release function that the listener calls on close; the last release stops it). One
handler serves the whole process (one per ZeroMQ context is all libzmq allows); each listener has
its own ZAP domain, so two listeners in one process (two projects, in tests) keep separate
authorizers. It runs on a thread of its own, not on an event loop, because listeners of one
process may live on different loops and a handshake must be answered whatever each loop is doing.
A request for an unknown domain, a mechanism other than CURVE, or a malformed request is refused.
A forked child starts its own handler (the parent's thread does not exist there).
An authorizer that raises refuses (and is logged): a bug there must not admit anyone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import zmq
import zmq.asyncio
from zmq.utils import z85

from fedcell.errors import ConfigError

__all__ = [
    "USER_ID_PROPERTY",
    "ZAP_ENDPOINT",
    "CurveSecurity",
    "KeyAuthorizer",
    "apply_client_security",
    "authenticated_user",
    "curve_keypair",
    "curve_public_key",
    "register_listener",
]

logger = logging.getLogger(__name__)

ZAP_ENDPOINT: Final = "inproc://zeromq.zap.01"
#: The message property libzmq sets to the ZAP user id on every received frame.
USER_ID_PROPERTY: Final = "User-Id"
_ZAP_VERSION: Final = b"1.0"
_STOP_ENDPOINT: Final = "inproc://fedcell-zap-stop"

#: ``authorize(public_key_z85) -> name``: the participant a client key belongs to, or ``None``.
KeyAuthorizer = Callable[[bytes], "str | None"]


def curve_keypair() -> tuple[bytes, bytes]:
    """A fresh Curve25519 key pair as Z85 text: ``(public_key, secret_key)``, 40 bytes each."""
    return zmq.curve_keypair()


def curve_public_key(secret_key: bytes) -> bytes:
    """The Z85 public key that belongs to the Z85 ``secret_key``.

    Raises
    ------
    ConfigError
        If ``secret_key`` is not a 40-character Z85 Curve25519 key.
    """
    try:
        return zmq.curve_public(secret_key)
    except (ValueError, zmq.ZMQError) as exc:
        raise ConfigError(f"not a Z85 Curve25519 secret key: {exc}") from exc


def _check_key(key: bytes, what: str) -> None:
    if not isinstance(key, bytes) or len(key) != 40:
        size = len(key) if isinstance(key, bytes) else type(key).__name__
        raise ConfigError(f"{what} must be a 40-byte Z85 Curve25519 key, got {size}")


@dataclass(frozen=True, slots=True)
class CurveSecurity:
    """Credentials of one endpoint for CurveZMQ.

    Attributes
    ----------
    public_key, secret_key:
        This endpoint's Curve25519 key pair (Z85, 40 bytes each).
    server_key:
        The listener's public key, required to connect (the server's key, from its certificate).
    authorizer:
        Required to listen: maps a connecting client's public key to its participant name, or to
        ``None`` to refuse it.

    Raises
    ------
    ConfigError
        If a key is not a Z85 Curve25519 key or the secret key does not match the public key.
    """

    public_key: bytes
    secret_key: bytes
    server_key: bytes | None = None
    authorizer: KeyAuthorizer | None = None

    def __post_init__(self) -> None:
        _check_key(self.public_key, "public_key")
        _check_key(self.secret_key, "secret_key")
        if self.server_key is not None:
            _check_key(self.server_key, "server_key")
        if curve_public_key(self.secret_key) != self.public_key:
            raise ConfigError("the Curve25519 secret key does not belong to the public key")

    def __repr__(self) -> str:  # never print the secret key
        return f"CurveSecurity(public_key={self.public_key!r}, server_key={self.server_key!r})"


def apply_client_security(sock: zmq.asyncio.Socket, security: CurveSecurity, url: str) -> None:
    """Make ``sock`` (before ``connect``) a CurveZMQ client of the listener at ``url``.

    Raises
    ------
    ConfigError
        If ``security`` has no ``server_key``.
    """
    if security.server_key is None:
        raise ConfigError(
            f"cannot connect to {url} securely: CurveSecurity has no server_key (the listener's "
            "public key)"
        )
    sock.curve_secretkey = security.secret_key
    sock.curve_publickey = security.public_key
    sock.curve_serverkey = security.server_key


def register_listener(sock: zmq.asyncio.Socket, security: CurveSecurity) -> Callable[[], None]:
    """Make ``sock`` (before ``bind``) a CurveZMQ server whose clients ``security`` authorizes.

    Starts the process's ZAP handler if needed. Returns the function that unregisters the
    listener (call it once the socket is closed; the last one stops the handler).

    Raises
    ------
    ConfigError
        If ``security`` has no ``authorizer``.
    """
    if security.authorizer is None:
        raise ConfigError("cannot listen securely: CurveSecurity has no authorizer")
    domain = _zap.add(security.authorizer)
    try:
        sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
        sock.zap_domain = domain.encode()
        sock.curve_server = True
        sock.curve_secretkey = security.secret_key
        sock.curve_publickey = security.public_key
    except BaseException:
        _zap.remove(domain)
        raise
    released = False

    def release() -> None:
        nonlocal released
        if not released:
            released = True
            _zap.remove(domain)

    return release


class _ZapHandler:
    """The process-wide ZAP server: one thread, one domain per secured listener."""

    def __init__(self) -> None:
        # _lifecycle serializes starting and stopping the thread (a stop joins it, so a start
        # never binds the endpoint while the old handler still holds it); _lock guards the domain
        # table, which the handler thread reads, so a join never waits on a lock it holds.
        self._lifecycle = threading.Lock()
        self._lock = threading.Lock()
        self._authorizers: dict[str, KeyAuthorizer] = {}
        self._next_domain = 0
        self._thread: threading.Thread | None = None
        self._stop: zmq.Socket[bytes] | None = None
        self._pid = os.getpid()

    def add(self, authorizer: KeyAuthorizer) -> str:
        with self._lifecycle:
            if self._pid != os.getpid():  # forked: the parent's thread and sockets are not ours
                self._authorizers.clear()
                self._thread = self._stop = None
                self._pid = os.getpid()
            if self._thread is None:
                self._start()
            with self._lock:
                self._next_domain += 1
                domain = f"fedcell-{self._next_domain}"
                self._authorizers[domain] = authorizer
            return domain

    def remove(self, domain: str) -> None:
        with self._lifecycle:
            with self._lock:
                self._authorizers.pop(domain, None)
                if self._authorizers or self._thread is None:
                    return
            thread, stop = self._thread, self._stop
            self._thread = self._stop = None
            assert stop is not None
            stop.send(b"")
            thread.join()
            stop.close(linger=0)

    def _context(self) -> zmq.Context[zmq.Socket[bytes]]:
        # The transport's sockets live in the asyncio context; the handler must bind in the same
        # libzmq context, through a blocking-API shadow of it.
        return zmq.Context.shadow(zmq.asyncio.Context.instance().underlying)

    def _start(self) -> None:
        ctx = self._context()
        handler = ctx.socket(zmq.REP)
        stop_in = ctx.socket(zmq.PAIR)
        try:
            handler.linger = 0
            handler.bind(ZAP_ENDPOINT)  # bound before any secured listener exists
            stop_in.bind(_STOP_ENDPOINT)
        except zmq.ZMQError as exc:
            handler.close(linger=0)
            stop_in.close(linger=0)
            raise ConfigError(f"cannot start the ZAP handler: {exc}") from exc
        self._stop = ctx.socket(zmq.PAIR)
        self._stop.connect(_STOP_ENDPOINT)
        self._thread = threading.Thread(
            target=self._serve, args=(handler, stop_in), name="fedcell-zap", daemon=True
        )
        self._thread.start()

    def _serve(self, handler: zmq.Socket[bytes], stop_in: zmq.Socket[bytes]) -> None:
        poller = zmq.Poller()
        poller.register(handler, zmq.POLLIN)
        poller.register(stop_in, zmq.POLLIN)
        try:
            while True:
                events = dict(poller.poll())
                if stop_in in events:
                    return
                if handler in events:
                    handler.send_multipart(self._answer(handler.recv_multipart()))
        finally:
            handler.close(linger=0)
            stop_in.close(linger=0)

    def _answer(self, request: list[bytes]) -> list[bytes]:
        """The ZAP reply to ``request`` (RFC 27): 200 with the user id, or 400 with a reason."""
        if len(request) < 6 or request[0] != _ZAP_VERSION:
            logger.error("ZAP: malformed request (%d frames) refused", len(request))
            request_id = request[1] if len(request) > 1 else b""
            return [_ZAP_VERSION, request_id, b"400", b"malformed ZAP request", b"", b""]
        request_id, domain, address, mechanism = request[1], request[2], request[3], request[5]
        credentials = request[6:]

        def refuse(reason: str) -> list[bytes]:
            logger.warning("ZAP: refused a client from %s: %s", address.decode(errors="replace"),
                           reason)  # fmt: skip
            return [_ZAP_VERSION, request_id, b"400", reason.encode(), b"", b""]

        with self._lock:
            authorizer = self._authorizers.get(domain.decode(errors="replace"))
        if authorizer is None:
            return refuse(f"unknown ZAP domain {domain!r}")
        if mechanism != b"CURVE" or len(credentials) != 1 or len(credentials[0]) != 32:
            return refuse(f"mechanism {mechanism!r} is not CURVE with one 32-byte key")
        key = z85.encode(credentials[0])
        try:
            name = authorizer(key)
        except Exception:
            logger.exception("ZAP: the authorizer raised on key %r; refusing it", key)
            name = None
        if name is None:
            return refuse(f"public key {key.decode()} is not admitted by the listener")
        return [_ZAP_VERSION, request_id, b"200", b"OK", name.encode(), b""]


_zap = _ZapHandler()


def authenticated_user(frame: zmq.Frame) -> str | None:
    """The ZAP user id stamped on a received ``frame``, or ``None`` on an unsecured socket."""
    with contextlib.suppress(zmq.ZMQError):
        user = frame.get(USER_ID_PROPERTY)
        return user if isinstance(user, str) else None
    return None
