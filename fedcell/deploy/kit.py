"""Startup kits: what one participant needs to join a deployment, and how it is loaded.

Layout (written by :func:`fedcell.deploy.provision.provision`)::

    <name>/
      kit.json            project, this participant's name and role, the server's address
      ca.pem              the project CA certificate (the trust anchor)
      participant.pem     this participant's certificate (name, role, curve key; signed by the CA)
      participant.key     its EC P-256 private key (mode 0600)
      curve.key           its Curve25519 secret key, Z85 (mode 0600)
      server.pem          the server's certificate (sites and admins: the server's curve key)
      trusted/<name>.pem  (server only) the certificates of everyone it admits
      start.sh            (server and sites) runs ``python -m fedcell.deploy.participant <kit>``

:meth:`StartupKit.load` checks everything before a socket is opened: the certificates chain to
``ca.pem``, the private key and the curve secret belong to the certificate, ``server.pem`` is the
project's server. A broken or tampered kit raises :class:`~fedcell.errors.AuthenticationError`.

How a kit secures a cell
------------------------
:meth:`StartupKit.cell` builds the participant's :class:`~fedcell.transports.cell.Cell`:
the transport options carry :class:`~fedcell.transports.zmq_security.CurveSecurity` (the curve
key pair; to connect, the server's curve key from ``server.pem``; to listen, a
:class:`TrustedParticipants` authorizer), and a listening cell gets :func:`bind_cell_name` as its
``authenticate`` hook. Together: the ZAP handler admits only curve keys that a CA-signed
certificate in ``trusted/`` names, and maps the key to that name; the hello's claimed cell name
must be that name or one of its sub-cells (``site-1.job-7`` for ``site-1``), so site-1's key can
never speak as site-2.

The server's own processes
--------------------------
A deployed job runs its server side in a process of its own, cell ``server.job-<id>``, which
connects to the server daemon like a site does, with the server's kit (``kit.cell(name=
"server.job-7")``: a sub-cell of the server connects to the server's own address instead of
listening). So the server's :class:`TrustedParticipants` admits the server's own curve key besides
the certificates of ``trusted/`` (which does not hold the server's), and :func:`bind_cell_name`
admits its sub-cells ``server.*`` as it admits ``site-1.*`` for site-1. A sub-cell connects to
the listen address (loopback when the server listens on every interface): the job process runs
on the server's machine, which may not reach its own public name.

Adding or removing a site rewrites the server kit's ``trusted/`` folder only. A running server
follows it without a restart: each lookup (one per connection handshake) lists the folder and
re-reads it if a file was added, removed or changed since the last read. Each certificate is
verified when read and its validity period is checked again on every lookup.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedcell.deploy.certificates import (
    ADMIN_ROLES,
    Participant,
    load_certificate,
    verify_participant,
)
from fedcell.deploy.project import ServerAddress
from fedcell.errors import AuthenticationError, ConfigError, FedcellError
from fedcell.transports.cell import Cell, CellConfig, Hello
from fedcell.transports.stream import FileSinkPolicy
from fedcell.transports.zmq_security import CurveSecurity, curve_public_key

__all__ = [
    "CA_CERT",
    "CURVE_SECRET",
    "KIT_CONFIG",
    "KIT_FORMAT",
    "PARTICIPANT_CERT",
    "PARTICIPANT_KEY",
    "SERVER_CERT",
    "START_SCRIPT",
    "TRUSTED_DIR",
    "StartupKit",
    "TrustedParticipants",
    "bind_cell_name",
    "kit_config",
]

logger = logging.getLogger(__name__)

KIT_FORMAT: Final = 1
KIT_CONFIG: Final = "kit.json"
CA_CERT: Final = "ca.pem"
PARTICIPANT_CERT: Final = "participant.pem"
PARTICIPANT_KEY: Final = "participant.key"
CURVE_SECRET: Final = "curve.key"
SERVER_CERT: Final = "server.pem"
TRUSTED_DIR: Final = "trusted"
START_SCRIPT: Final = "start.sh"


def bind_cell_name(hello: Hello) -> str:
    """The ``authenticate`` hook of a secured listening cell: the claimed name, if it is the
    authenticated participant's own name or one of its sub-cells.

    Raises
    ------
    AuthenticationError
        If the transport did not authenticate the peer, or the claimed name belongs to someone
        else (impersonation).
    """
    identity = hello.identity
    if identity is None:
        raise AuthenticationError(
            f"{hello.connection} is not authenticated by its transport (no CurveZMQ?)"
        )
    if hello.name != identity and not hello.name.startswith(identity + "."):
        raise AuthenticationError(
            f"{identity!r} (authenticated by its key) may not speak as {hello.name!r}"
        )
    return hello.name


class TrustedParticipants:
    """The server's ZAP authorizer: curve key → participant name, from CA-signed certificates.

    Reads ``folder/*.pem``, again whenever the folder's listing (names, sizes, mtimes) changed;
    a certificate that fails :func:`verify_participant` is skipped and logged (never admitted).
    Two certificates with the same curve key and different names admit neither. ``own`` (the
    server itself, whose certificate is not in ``trusted/``) is always admitted, and a
    certificate in the folder claiming its key for another name is not. Called from the ZAP
    handler's thread, so lookups read a table that a reload replaces whole.

    Parameters
    ----------
    ca_cert:
        The project CA certificate.
    folder:
        The folder of participant certificates (``trusted/`` in the server kit).
    own:
        The listening participant itself, admitted so that its own sub-cells (job processes)
        can connect with its key.
    """

    def __init__(
        self, ca_cert: x509.Certificate, folder: Path, *, own: Participant | None = None
    ) -> None:
        self._ca_cert = ca_cert
        self._folder = folder
        self._own = own
        self._lock = threading.Lock()
        self._by_key: dict[bytes, Participant] = {}
        self._snapshot: tuple[tuple[str, int, int], ...] | None = None
        self.reload()

    def _listing(self) -> tuple[tuple[str, int, int], ...]:
        try:
            entries = sorted(self._folder.glob("*.pem"))
            return tuple((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in entries)
        except OSError as exc:
            logger.error("cannot list trusted certificates in %s: %s", self._folder, exc)
            return ()

    def reload(self) -> None:
        """Re-read the folder (done by itself when a lookup finds the folder changed)."""
        snapshot = self._listing()
        by_key: dict[bytes, Participant] = {}
        clashes: set[bytes] = set()
        for file_name, _, _ in snapshot:
            path = self._folder / file_name
            try:
                participant = verify_participant(
                    load_certificate(path.read_bytes(), str(path)), self._ca_cert
                )
            except (OSError, FedcellError) as exc:
                logger.error("not trusting %s: %s", path, exc)
                continue
            other = by_key.get(participant.curve_key)
            if other is not None and other.name != participant.name:
                logger.error(
                    "%r and %r share a curve key: admitting neither", other.name, participant.name
                )
                clashes.add(participant.curve_key)
            by_key[participant.curve_key] = participant
        for key in clashes:
            del by_key[key]
        own = self._own
        if own is not None:
            other = by_key.get(own.curve_key)
            if other is not None and other.name != own.name:
                logger.error("%r claims the curve key of %r: not admitting it", other.name, own.name)
            by_key[own.curve_key] = own
        with self._lock:
            self._by_key = by_key
            self._snapshot = snapshot

    def names(self) -> tuple[str, ...]:
        """The participants currently admitted."""
        return tuple(sorted(p.name for p in self._by_key.values()))

    def __call__(self, curve_key: bytes) -> str | None:
        """The name of the participant whose certificate carries ``curve_key``, or ``None``."""
        if self._listing() != self._snapshot:
            self.reload()
        participant = self._by_key.get(curve_key)
        if participant is None:
            return None
        cert = participant.certificate
        now = time.time()
        if not cert.not_valid_before_utc.timestamp() <= now <= cert.not_valid_after_utc.timestamp():
            logger.error("the certificate of %r is expired or not yet valid", participant.name)
            return None
        return participant.name


def _read(folder: Path, name: str) -> bytes:
    try:
        return (folder / name).read_bytes()
    except OSError as exc:
        raise ConfigError(f"startup kit {folder} is incomplete: cannot read {name}: {exc}") from exc


@dataclass(frozen=True, slots=True)
class StartupKit:
    """A loaded, verified startup kit (see the module docstring).

    Attributes
    ----------
    folder:
        Where the kit was loaded from.
    project:
        The project name.
    me:
        This participant, as its certificate says (name, role, curve key, certificate).
    ca_certificate:
        The project CA certificate.
    private_key:
        This participant's EC P-256 key (signs admin commands, opens sealed messages).
    server:
        The server's address.
    server_certificate:
        The server, as its certificate says (sites and admins only; ``None`` in the server's kit).
    """

    folder: Path
    project: str
    me: Participant
    ca_certificate: x509.Certificate
    private_key: ec.EllipticCurvePrivateKey
    curve_secret: bytes = dataclasses.field(repr=False)
    server: ServerAddress
    server_certificate: Participant | None

    @property
    def name(self) -> str:
        """This participant's name (its cell name)."""
        return self.me.name

    @property
    def role(self) -> str:
        """``server``, ``site`` or an admin role."""
        return self.me.role

    @property
    def is_admin(self) -> bool:
        """Whether this is an admin's kit (it may sign commands)."""
        return self.me.role in ADMIN_ROLES

    @classmethod
    def load(cls, folder: Path | str) -> StartupKit:
        """Read and verify the kit in ``folder``.

        Raises
        ------
        ConfigError
            If a file is missing or ``kit.json`` is malformed.
        AuthenticationError
            If a certificate does not chain to the kit's CA (another project's, or tampered),
            a key does not belong to the certificate, or ``server.pem`` is not the server's.
        """
        folder = Path(folder)
        config = _parse_config(_read(folder, KIT_CONFIG), folder)
        ca_cert = load_certificate(_read(folder, CA_CERT), f"{folder}/{CA_CERT}")
        me = verify_participant(
            load_certificate(_read(folder, PARTICIPANT_CERT), f"{folder}/{PARTICIPANT_CERT}"),
            ca_cert,
        )
        if me.name != config["name"] or me.project != config["project"]:
            raise AuthenticationError(
                f"{folder}: the certificate names {me.name!r} of {me.project!r}, kit.json names "
                f"{config['name']!r} of {config['project']!r}"
            )
        try:
            key = serialization.load_pem_private_key(_read(folder, PARTICIPANT_KEY), None)
        except (ValueError, TypeError) as exc:
            raise AuthenticationError(f"{folder}/{PARTICIPANT_KEY} is not a key: {exc}") from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey) or (
            key.public_key() != me.certificate.public_key()
        ):
            raise AuthenticationError(f"{folder}/{PARTICIPANT_KEY} does not belong to {me.name!r}")
        curve_secret = _read(folder, CURVE_SECRET).strip()
        if curve_public_key(curve_secret) != me.curve_key:
            raise AuthenticationError(f"{folder}/{CURVE_SECRET} does not belong to {me.name!r}")
        server = ServerAddress(**config["server"])
        server_cert: Participant | None = None
        if me.role != "server":
            server_cert = verify_participant(
                load_certificate(_read(folder, SERVER_CERT), f"{folder}/{SERVER_CERT}"), ca_cert
            )
            if server_cert.role != "server" or server_cert.name != server.name:
                raise AuthenticationError(
                    f"{folder}/{SERVER_CERT} is {server_cert.name!r} ({server_cert.role}), "
                    f"not the server {server.name!r}"
                )
        return cls(folder, me.project, me, ca_cert, key, curve_secret, server, server_cert)

    def transport_security(self) -> CurveSecurity:
        """The CurveZMQ credentials of this participant's own cell.

        The server's authorize the keys of ``trusted/`` and its own; everyone else's connect to
        the server.
        """
        if self.server_certificate is None:
            authorizer = TrustedParticipants(
                self.ca_certificate, self.folder / TRUSTED_DIR, own=self.me
            )
            return CurveSecurity(self.me.curve_key, self.curve_secret, authorizer=authorizer)
        return self._connecting_security()

    def _connecting_security(self) -> CurveSecurity:
        server = self.server_certificate or self.me
        return CurveSecurity(self.me.curve_key, self.curve_secret, server_key=server.curve_key)

    def cell_config(self, base: CellConfig | None = None) -> CellConfig:
        """``base`` (default: :class:`CellConfig()`) with this kit's transport security."""
        return _secured(base, self.transport_security())

    def cell(
        self,
        *,
        name: str | None = None,
        config: CellConfig | None = None,
        file_sink: FileSinkPolicy | None = None,
    ) -> Cell:
        """This participant's secured cell (not started).

        The server's listens on the project's listen address and binds peer names to their
        keys; the others' connect to the server, and so do the server's sub-cells (see the module
        docstring).

        Parameters
        ----------
        name:
            The cell name: this participant's name (default) or one of its sub-cells
            (``site-1.job-7``, ``server.job-7``).
        config:
            Timeouts and tunables; the kit adds the transport security.
        file_sink:
            Where files sent to the cell land (``None`` refuses files).

        Raises
        ------
        ConfigError
            If ``name`` is neither this participant's name nor one of its sub-cells.
        """
        name = name or self.name
        if name != self.name and not name.startswith(self.name + "."):
            raise ConfigError(f"kit of {self.name!r} cannot start a cell named {name!r}")
        if self.server_certificate is None and name == self.name:
            return Cell(
                name,
                listen=self.server.listen_url,
                config=self.cell_config(config),
                authenticate=bind_cell_name,
                file_sink=file_sink,
            )
        parent = self.server.url if self.server_certificate is not None else _local_url(self.server)
        secured = _secured(config, self._connecting_security())
        return Cell(name, parent=parent, config=secured, file_sink=file_sink)


def _secured(base: CellConfig | None, security: CurveSecurity) -> CellConfig:
    base = base or CellConfig()
    return dataclasses.replace(base, transport=dataclasses.replace(base.transport, security=security))


def _local_url(server: ServerAddress) -> str:
    """Where the server's own processes reach it: its listen address, loopback for a wildcard."""
    host = server.listen_host
    if host in ("*", "0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return ServerAddress(server.name, host, server.port, server.listen_host).url


def _parse_config(data: bytes, folder: Path) -> Mapping[str, Any]:
    try:
        config = json.loads(data)
    except ValueError as exc:
        raise ConfigError(f"{folder}/{KIT_CONFIG} is not JSON: {exc}") from exc
    if not isinstance(config, dict) or config.get("format") != KIT_FORMAT:
        raise ConfigError(f"{folder}/{KIT_CONFIG} is not a format-{KIT_FORMAT} fedcell kit")
    server = config.get("server")
    if not (
        isinstance(config.get("name"), str)
        and isinstance(config.get("project"), str)
        and isinstance(server, dict)
        and set(server) == {"name", "host", "port", "listen_host"}
    ):
        raise ConfigError(f"{folder}/{KIT_CONFIG} lacks name, project or server address")
    return config


def kit_config(project: str, name: str, role: str, server: ServerAddress) -> bytes:
    """The ``kit.json`` of a participant (what :meth:`StartupKit.load` reads back)."""
    tree = {
        "format": KIT_FORMAT,
        "project": project,
        "name": name,
        "role": role,
        "server": {
            "name": server.name,
            "host": server.host,
            "port": server.port,
            "listen_host": server.listen_host,
        },
    }
    return (json.dumps(tree, indent=2) + "\n").encode()
