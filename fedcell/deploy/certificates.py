"""The project PKI: one CA per project, one certificate per participant, made with ``cryptography``.

Keys and certificates
---------------------
- The **CA** is an EC P-256 key and a self-signed certificate (``CN=<project> CA``,
  ``O=<project>``, CA basic constraint with path length 0: it signs participants, nothing else).
- Each **participant** (the server, each site, each admin) has an EC P-256 key (ECDSA signatures
  on admin commands, ECDH for messages sealed to it) and a certificate signed by the CA:
  ``CN=<name>``, ``O=<project>``, ``OU=<role>``, and ``organizationIdentifier=<org>`` (OID
  2.5.4.97, :data:`ORGANIZATION_OID`) when ``project.yml`` gives the participant an organization.
  The role is ``server``, ``site`` or an admin role (:data:`ADMIN_ROLES`).
- Why a separate attribute for the organization: ``O`` already names the project, and every
  consumer checks it against the CA's ``O`` to keep projects apart; reusing it (or ``OU``, the
  role) would change what those checks mean. organizationIdentifier is the standard X.520
  attribute for "the organization this subject belongs to", it is signed by the CA like the rest
  of the subject, and a certificate without it (one issued before organizations existed, or for
  a participant without one) simply has no organization.
- Each participant also has a **Curve25519 key pair** for CurveZMQ. Its public key is bound to the
  participant's name by the CA: it travels in the participant's certificate as the non-critical
  extension :data:`CURVE_KEY_OID` (a DER OCTET STRING of the 32 raw key bytes), so "the CA signed a
  certificate naming site-1 with this curve key" is the one statement the server's ZAP handler
  needs (see :mod:`fedcell.transports.zmq_security`).

No address is in any certificate: the server's host and port live in each kit's ``kit.json``, so
moving the server re-issues nothing.

:func:`verify_participant` is the one check every consumer uses (the trust folder of the server,
kit loading, admin command verification): issued by this CA (issuer name and signature), within
its validity period, same project, not a CA, carrying a curve key; it returns the name, role,
project, organization (or ``None``) and curve key. Failures raise
:class:`~fedcell.errors.AuthenticationError` saying which check failed.
"""

from __future__ import annotations

import datetime
import warnings
from dataclasses import dataclass
from typing import Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.x509.oid import NameOID
from zmq.utils import z85

from fedcell.errors import AuthenticationError, ConfigError

__all__ = [
    "ADMIN_ROLES",
    "CURVE_KEY_OID",
    "ORGANIZATION_OID",
    "ROLES",
    "Participant",
    "certificate_pem",
    "issue_ca",
    "issue_participant",
    "load_certificate",
    "new_signing_key",
    "verify_participant",
]

#: The extension that carries a participant's Curve25519 public key (an OID in the UUID arc
#: 2.25, which needs no registration).
CURVE_KEY_OID: Final = x509.ObjectIdentifier("2.25.14824484955215475285724735326144630528")
#: The subject attribute naming a participant's organization (organizationIdentifier).
ORGANIZATION_OID: Final = NameOID.ORGANIZATION_IDENTIFIER
ADMIN_ROLES: Final = ("project_admin", "lead", "member")
ROLES: Final = ("server", "site", *ADMIN_ROLES)
_CA_DAYS: Final = 3650
_BACKDATE: Final = datetime.timedelta(minutes=5)  # tolerate clocks slightly behind ours


@dataclass(frozen=True, slots=True)
class Participant:
    """What a verified certificate says.

    Attributes
    ----------
    name:
        The participant's name (its cell name).
    role:
        ``server``, ``site`` or an admin role.
    project:
        The project the certificate belongs to.
    organization:
        The participant's organization (``None``: the certificate names none).
    curve_key:
        The participant's Curve25519 public key (Z85, 40 bytes).
    certificate:
        The certificate itself.
    """

    name: str
    role: str
    project: str
    organization: str | None
    curve_key: bytes
    certificate: x509.Certificate


def new_signing_key() -> ec.EllipticCurvePrivateKey:
    """A fresh EC P-256 private key."""
    return ec.generate_private_key(ec.SECP256R1())


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def issue_ca(project: str, key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    """The self-signed CA certificate of ``project`` for ``key`` (valid ten years)."""
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, f"{project} CA"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, project),
        ]
    )
    now = _now()
    public = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + datetime.timedelta(days=_CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )


def issue_participant(
    *,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    name: str,
    role: str,
    public_key: ec.EllipticCurvePublicKey,
    curve_key: bytes,
    days: int,
    organization: str | None = None,
) -> x509.Certificate:
    """A certificate for participant ``name`` signed by the CA, binding ``curve_key`` to it.

    ``organization``, when given, goes into the subject as organizationIdentifier.

    Raises
    ------
    ConfigError
        If ``role`` is unknown, ``organization`` is empty, or ``curve_key`` is not a Z85
        Curve25519 public key.
    """
    if role not in ROLES:
        raise ConfigError(f"unknown role {role!r} (known: {', '.join(ROLES)})")
    if organization == "":
        raise ConfigError(f"the organization of {name!r} is empty (give None for none)")
    try:
        raw_curve_key = z85.decode(curve_key)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"not a Z85 curve key: {curve_key!r}") from exc
    if len(raw_curve_key) != 32:
        raise ConfigError(f"a curve key has 32 bytes, got {len(raw_curve_key)}")
    project = _attribute(ca_cert.subject, NameOID.ORGANIZATION_NAME)
    subject = [
        x509.NameAttribute(NameOID.COMMON_NAME, name),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, project),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
    ]
    if organization is not None:
        subject.append(x509.NameAttribute(ORGANIZATION_OID, organization))
    now = _now()
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name(subject))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .add_extension(
            x509.UnrecognizedExtension(CURVE_KEY_OID, b"\x04\x20" + raw_curve_key), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )


def load_certificate(data: bytes, what: str) -> x509.Certificate:
    """Parse a PEM certificate.

    Raises
    ------
    AuthenticationError
        If ``data`` is not a PEM certificate (``what`` names it in the message).
    """
    try:
        with warnings.catch_warnings():  # an RFC 5280 violation cryptography only warns about
            warnings.simplefilter("error", CryptographyDeprecationWarning)
            return x509.load_pem_x509_certificate(data)
    except (ValueError, CryptographyDeprecationWarning) as exc:
        raise AuthenticationError(f"{what} is not a valid PEM certificate: {exc}") from exc


def _attribute(name: x509.Name, oid: x509.ObjectIdentifier) -> str:
    values = name.get_attributes_for_oid(oid)
    if len(values) != 1 or not isinstance(values[0].value, str):
        raise AuthenticationError(
            f"certificate subject {name.rfc4514_string()!r} lacks {oid._name}"
        )
    return values[0].value


def _optional_attribute(name: x509.Name, oid: x509.ObjectIdentifier, what: str) -> str | None:
    values = name.get_attributes_for_oid(oid)
    if not values:
        return None
    if len(values) != 1 or not isinstance(values[0].value, str) or not values[0].value:
        raise AuthenticationError(
            f"certificate subject {name.rfc4514_string()!r} has a malformed {what}"
        )
    return values[0].value


def verify_participant(
    cert: x509.Certificate, ca_cert: x509.Certificate, *, now: datetime.datetime | None = None
) -> Participant:
    """Check that the project CA issued ``cert`` and return what it says.

    Raises
    ------
    AuthenticationError
        If another CA issued it, its signature does not verify (tampered), it is outside its
        validity period, it belongs to another project, it is a CA, it lacks a role or a
        curve key, or its organization is malformed (repeated or empty).
    """
    subject = cert.subject.rfc4514_string()
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise AuthenticationError(
            f"certificate {subject!r} was not issued by the project CA "
            f"({ca_cert.subject.rfc4514_string()!r}) or was altered: {str(exc) or 'bad signature'}"
        ) from exc
    now = now or _now()
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise AuthenticationError(
            f"certificate {subject!r} is valid from {cert.not_valid_before_utc:%Y-%m-%d %H:%M} "
            f"to {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC, not now"
        )
    project = _attribute(ca_cert.subject, NameOID.ORGANIZATION_NAME)
    if _attribute(cert.subject, NameOID.ORGANIZATION_NAME) != project:
        raise AuthenticationError(f"certificate {subject!r} is not of project {project!r}")
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        curve_ext = cert.extensions.get_extension_for_oid(CURVE_KEY_OID).value
    except x509.ExtensionNotFound as exc:
        raise AuthenticationError(f"certificate {subject!r} lacks an extension: {exc}") from exc
    if constraints.ca:
        raise AuthenticationError(f"certificate {subject!r} is a CA, not a participant")
    raw = curve_ext.value if isinstance(curve_ext, x509.UnrecognizedExtension) else b""
    if len(raw) != 34 or raw[:2] != b"\x04\x20":
        raise AuthenticationError(f"certificate {subject!r} has a malformed curve key extension")
    role = _attribute(cert.subject, NameOID.ORGANIZATIONAL_UNIT_NAME)
    if role not in ROLES:
        raise AuthenticationError(f"certificate {subject!r} has an unknown role {role!r}")
    return Participant(
        name=_attribute(cert.subject, NameOID.COMMON_NAME),
        role=role,
        project=project,
        organization=_optional_attribute(cert.subject, ORGANIZATION_OID, "organization"),
        curve_key=z85.encode(raw[2:]),
        certificate=cert,
    )


def certificate_pem(cert: x509.Certificate) -> bytes:
    """``cert`` as PEM bytes."""
    return cert.public_bytes(serialization.Encoding.PEM)
