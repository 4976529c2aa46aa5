"""Admin commands signed by an admin's certificate: :func:`sign_command` / :func:`verify_command`.

A job CLI (submit, abort, list ...) sends a :class:`SignedCommand`; whoever acts on it (the
server, a site enforcing its policy) verifies it first. The command proves who sent it, that it
was not altered, and that it is fresh:

- ``body`` is canonical JSON (sorted keys, no spaces) of ``{"admin", "project", "issued_at",
  "nonce", "payload"}``; the signature covers these exact bytes, so the verifier never
  re-serializes anything (no canonicalization ambiguity).
- ``signature`` is ECDSA P-256 with SHA-256 by the admin's private key.
- ``certificate`` is the admin's certificate (PEM). The verifier checks it chains to the project
  CA (:func:`~fedcell.deploy.certificates.verify_participant`), that its role is an admin role,
  that it names the ``admin`` of the body, and that the signature verifies with its key. The
  admin's name, role and organization come from that certificate (the CA vouches for them), never
  from the body.
- Revocation: given the server's :class:`~fedcell.deploy.kit.TrustedParticipants`, the admin
  must still be in the trust folder (an admin removed from ``project.yml`` is refused at once).
- Freshness: ``issued_at`` (seconds since the epoch) must be within ``max_age`` seconds in the past
  (and at most ``max_skew`` in the future); a :class:`ReplayGuard` remembers every nonce it
  accepted for as long as its command would be fresh, so a captured command cannot be sent again.

Any failure raises :class:`~fedcell.errors.AuthenticationError` saying which check failed.
:class:`SignedCommand` is a registered wire type: it travels as a cell payload as is.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from fedcell.deploy.certificates import (
    ADMIN_ROLES,
    certificate_pem,
    load_certificate,
    verify_participant,
)
from fedcell.deploy.kit import StartupKit, TrustedParticipants
from fedcell.errors import AuthenticationError, ConfigError, EncodeError
from fedcell.transports.codec import wire_type

__all__ = [
    "DEFAULT_MAX_AGE_S",
    "DEFAULT_MAX_SKEW_S",
    "ReplayGuard",
    "SignedCommand",
    "VerifiedCommand",
    "sign_command",
    "verify_command",
]

DEFAULT_MAX_AGE_S: Final = 300.0
DEFAULT_MAX_SKEW_S: Final = 30.0
_BODY_KEYS: Final = {"admin", "project", "issued_at", "nonce", "payload"}


@wire_type("fedcell.SignedCommand")
@dataclass(frozen=True, slots=True)
class SignedCommand:
    """An admin command as sent: the signed body, the signature and the admin's certificate."""

    body: bytes
    signature: bytes
    certificate: bytes


@dataclass(frozen=True, slots=True)
class VerifiedCommand:
    """A command that passed :func:`verify_command`.

    Attributes
    ----------
    admin:
        The admin's name, from its certificate.
    role:
        The admin's role (``project_admin``, ``lead`` or ``member``), from its certificate.
    organization:
        The admin's organization, from its certificate (``None``: it names none).
    payload:
        The command itself, as signed.
    issued_at:
        When the admin signed it (seconds since the epoch).
    nonce:
        The command's unique nonce (hex).
    """

    admin: str
    role: str
    organization: str | None
    payload: Any
    issued_at: float
    nonce: str


def sign_command(
    admin_kit: StartupKit, payload: Mapping[str, Any], *, now: float | None = None
) -> SignedCommand:
    """Sign ``payload`` (JSON data) with the admin's key, stamped with the time and a nonce.

    Raises
    ------
    ConfigError
        If ``admin_kit`` is not an admin's kit.
    EncodeError
        If ``payload`` is not JSON data.
    """
    if not admin_kit.is_admin:
        raise ConfigError(f"{admin_kit.name!r} is a {admin_kit.role}, not an admin: cannot sign")
    body = {
        "admin": admin_kit.name,
        "project": admin_kit.project,
        "issued_at": time.time() if now is None else now,
        "nonce": os.urandom(16).hex(),
        "payload": payload,
    }
    try:
        data = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()
    except (TypeError, ValueError) as exc:
        raise EncodeError(f"an admin command must be JSON data: {exc}") from exc
    signature = admin_kit.private_key.sign(data, ec.ECDSA(hashes.SHA256()))
    return SignedCommand(data, signature, certificate_pem(admin_kit.me.certificate))


class ReplayGuard:
    """Remembers accepted nonces while their commands are fresh, and refuses them again.

    Memory is bounded by the commands accepted within ``max_age + max_skew`` seconds.
    """

    def __init__(self) -> None:
        self._seen: dict[str, float] = {}  # nonce -> when it may be forgotten

    def admit(self, nonce: str, forget_after: float, now: float) -> None:
        """Record ``nonce``; raise ``AuthenticationError`` if it was seen before."""
        if len(self._seen) > 1024:
            self._seen = {n: t for n, t in self._seen.items() if t > now}
        expiry = self._seen.get(nonce)
        if expiry is not None and expiry > now:
            raise AuthenticationError(f"command nonce {nonce} was already used (replay)")
        self._seen[nonce] = forget_after


def verify_command(
    ca_certificate: x509.Certificate,
    command: SignedCommand,
    *,
    replay_guard: ReplayGuard | None = None,
    trusted: TrustedParticipants | None = None,
    max_age: float = DEFAULT_MAX_AGE_S,
    max_skew: float = DEFAULT_MAX_SKEW_S,
    now: float | None = None,
) -> VerifiedCommand:
    """Check that an admin of the project signed ``command`` recently, and return it.

    Parameters
    ----------
    ca_certificate:
        The project CA certificate (``StartupKit.ca_certificate``).
    command:
        The command as received.
    replay_guard:
        Refuses a nonce seen before (keep one per verifier; ``None``: no replay check).
    trusted:
        The server's trust folder: the admin must still be in it (removed from ``project.yml``
        and re-provisioned means refused). ``None``: the CA signature suffices.
    max_age, max_skew:
        Seconds a command stays valid after ``issued_at``, and how far in the future
        ``issued_at`` may be (clock skew).
    now:
        The current time (seconds since the epoch; default: the clock).

    Raises
    ------
    AuthenticationError
        If the certificate is not an admin's of this project (another CA, tampered, expired),
        the signature does not verify (altered body), the body is malformed, the command is
        expired or from the future, its nonce was used before, or the admin is no longer trusted.
    """
    now = time.time() if now is None else now
    admin = verify_participant(load_certificate(command.certificate, "admin certificate"),
                               ca_certificate)  # fmt: skip
    if admin.role not in ADMIN_ROLES:
        raise AuthenticationError(f"{admin.name!r} is a {admin.role}, not an admin")
    if trusted is not None and trusted(admin.curve_key) != admin.name:
        raise AuthenticationError(f"admin {admin.name!r} is no longer trusted (removed)")
    public_key = admin.certificate.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        raise AuthenticationError(f"the certificate of {admin.name!r} has no EC key")
    try:
        public_key.verify(command.signature, command.body, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature as exc:
        raise AuthenticationError(
            f"the signature of a command from {admin.name!r} does not verify: the command was "
            "altered or signed by another key"
        ) from exc
    try:
        body = json.loads(command.body)
    except ValueError as exc:
        raise AuthenticationError(f"a signed command body is not JSON: {exc}") from exc
    if not isinstance(body, dict) or set(body) != _BODY_KEYS:
        raise AuthenticationError(f"a signed command body lacks {sorted(_BODY_KEYS)}")
    if body["admin"] != admin.name or body["project"] != admin.project:
        raise AuthenticationError(
            f"the command names {body['admin']!r} of {body['project']!r}, but is signed by "
            f"{admin.name!r} of {admin.project!r}"
        )
    issued_at, nonce = body["issued_at"], body["nonce"]
    if not isinstance(issued_at, int | float) or not isinstance(nonce, str):
        raise AuthenticationError("a signed command has a malformed issued_at or nonce")
    if issued_at < now - max_age:
        raise AuthenticationError(
            f"the command from {admin.name!r} expired ({now - issued_at:.0f} s old, at most "
            f"{max_age:.0f} s)"
        )
    if issued_at > now + max_skew:
        raise AuthenticationError(
            f"the command from {admin.name!r} is dated {issued_at - now:.0f} s in the future"
        )
    if replay_guard is not None:
        replay_guard.admit(nonce, issued_at + max_age + max_skew, now)
    return VerifiedCommand(
        admin.name, admin.role, admin.organization, body["payload"], float(issued_at), nonce
    )
