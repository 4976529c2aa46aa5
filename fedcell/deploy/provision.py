"""``fedcell provision``: from ``project.yml`` to one startup kit per participant.

Output (``<workspace>`` defaults to the folder of ``project.yml``)::

    <workspace>/
      state/                      private to whoever provisions; never distributed
        project.json              which project this state belongs to
        ca.key  ca.pem            the project CA
        participants/<name>/      participant.key  participant.pem  curve.key
      kits/<name>/                one startup kit per participant (layout: fedcell.deploy.kit)

Re-provisioning is incremental
------------------------------
Keys are made once and kept in ``state/``: provisioning again after editing ``project.yml``
reuses the CA, every participant's keys and its certificate. A certificate is re-issued only when
the participant's role or organization changed or it expires within :data:`RENEW_WITHIN` (or half
its lifetime, if shorter) - with the same keys. The server's address is not in any certificate, only in each
kit's ``kit.json``. Kit files are compared byte by byte and only changed files are written, so:

- editing the server's address rewrites every ``kit.json`` and nothing else;
- adding a site writes the new site's kit and adds its certificate to the server kit's
  ``trusted/`` folder (a running server reads it when the new site first connects); the other
  kits do not change at all;
- removing a site removes its certificate from the server's ``trusted/`` folder, so the server
  stops admitting it (its kit folder is left in place and reported as stale);
- changing a site's or an admin's role or organization re-issues its certificate: its kit's
  ``participant.pem`` and the server's ``trusted/`` copy are rewritten, nothing else (the
  server's own certificate also travels as ``server.pem`` in every other kit, so a change of the
  server's organization rewrites that file everywhere; the old copies keep working, as the keys
  are the same).

Each site kit also gets a default site policy, ``policy.yml`` (:data:`POLICY_FILE`), written
once when the kit has none and never touched again: it is the site's own file, to edit (its
daemon reads it at every job submission), so re-provisioning neither rewrites nor reports it. The
default lets the project's ``project_admin`` and ``lead`` admins submit jobs, with source code,
at most 4 at a time (see :mod:`fedcell.engine.policy` for the format); a commented-out
``organizations`` line shows how to restrict submitters to the organizations ``project.yml``
gives admins.

A state folder refuses a ``project.yml`` of another project (:class:`~fedcell.errors.ConfigError`):
one CA per project. Files holding secrets are written with mode 0600, atomically (temporary file
and rename), so an interrupted run never leaves a torn key.
"""

from __future__ import annotations

import datetime
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedcell.deploy.certificates import (
    certificate_pem,
    issue_ca,
    issue_participant,
    load_certificate,
    new_signing_key,
    verify_participant,
)
from fedcell.deploy.kit import (
    CA_CERT,
    CURVE_SECRET,
    PARTICIPANT_CERT,
    PARTICIPANT_KEY,
    SERVER_CERT,
    START_SCRIPT,
    TRUSTED_DIR,
    kit_config,
)
from fedcell.deploy.project import Project
from fedcell.errors import AuthenticationError, ConfigError
from fedcell.transports.zmq_security import curve_keypair, curve_public_key

__all__ = ["POLICY_FILE", "RENEW_WITHIN", "ProvisionReport", "default_site_policy", "provision"]

#: Certificates closer than this to their end are re-issued (with the same keys).
RENEW_WITHIN: Final = datetime.timedelta(days=30)
_STATE_FORMAT: Final = 1
_SECRET: Final = 0o600
_PUBLIC: Final = 0o644
_SCRIPT: Final = 0o755
#: The site policy file provisioning writes into a site kit that has none.
POLICY_FILE: Final = "policy.yml"
_DEFAULT_POLICY: Final = """\
# Site policy of {site} (project {project}): who may run jobs here, with what code, how many.
# `fedcell provision` wrote this file once and never overwrites it: edit it for this site. The
# site daemon reads it at every job submission; the format is in docs/deployment.md.
site: {site}
submit:
  roles: [project_admin, lead]        # admin roles that may submit jobs (names: [...] for people)
  # organizations: [hospital-a]       # only admins of these orgs (their org in project.yml)
custom_code:
  allow: [source]                     # job code shipped in the job folder's custom/
  roles: [project_admin, lead]
resources:
  max_concurrent_jobs: 4
  # max_job_wall_time: 24h
  # max_memory_per_job: 16GiB
"""
_START_SCRIPT: Final = """#!/bin/sh
# Starts {name} ({role}) of project {project}. Set FEDCELL_PYTHON to choose the interpreter.
cd "$(dirname "$0")" && exec "${{FEDCELL_PYTHON:-python3}}" -m fedcell.deploy.participant . "$@"
"""


@dataclass(slots=True)
class ProvisionReport:
    """What a provisioning run did.

    Attributes
    ----------
    kits:
        The folder holding one kit per participant.
    created:
        Participants whose kit was written for the first time.
    updated:
        Participant → the kit files rewritten (or removed) because their content changed.
    unchanged:
        Participants whose kit is byte-for-byte as before.
    issued:
        Participants whose certificate was issued or re-issued in this run.
    stale:
        Kit folders of participants no longer in ``project.yml`` (left in place).
    """

    kits: Path
    created: list[str] = field(default_factory=list)
    updated: dict[str, list[str]] = field(default_factory=dict)
    unchanged: list[str] = field(default_factory=list)
    issued: list[str] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write ``path`` atomically with ``mode`` (a crash leaves the old file or the new one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), None)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"provisioning state is damaged: cannot load {path}: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"provisioning state is damaged: {path} is not an EC key")
    return key


@dataclass(frozen=True, slots=True)
class _Credentials:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate
    curve_secret: bytes


class _State:
    """The ``state/`` folder: the CA and every participant's keys, made once and kept."""

    def __init__(self, folder: Path, project: str) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        marker = folder / "project.json"
        if marker.exists():
            try:
                recorded = json.loads(marker.read_text(encoding="utf-8")).get("project")
            except (OSError, ValueError, AttributeError) as exc:
                raise ConfigError(f"provisioning state is damaged: {marker}: {exc}") from exc
            if recorded != project:
                raise ConfigError(
                    f"{folder} holds the CA of project {recorded!r}, not {project!r}: use another "
                    "workspace for another project"
                )
        else:
            _write(marker, json.dumps({"format": _STATE_FORMAT, "project": project}).encode(),
                   _PUBLIC)  # fmt: skip
        key_path, cert_path = folder / "ca.key", folder / "ca.pem"
        if key_path.exists() and cert_path.exists():
            self.ca_key = _load_key(key_path)
            self.ca_cert = load_certificate(cert_path.read_bytes(), str(cert_path))
        else:
            self.ca_key = new_signing_key()
            self.ca_cert = issue_ca(project, self.ca_key)
            _write(key_path, _key_pem(self.ca_key), _SECRET)
            _write(cert_path, certificate_pem(self.ca_cert), _PUBLIC)

    def credentials(
        self, name: str, role: str, organization: str | None, days: int
    ) -> tuple[_Credentials, bool]:
        """``name``'s keys (made if new) and a current certificate; whether it was issued now."""
        folder = self.folder / "participants" / name
        key_path, curve_path = folder / PARTICIPANT_KEY, folder / CURVE_SECRET
        cert_path = folder / PARTICIPANT_CERT
        if key_path.exists() and curve_path.exists():
            key = _load_key(key_path)
            curve_secret = curve_path.read_bytes().strip()
            curve_public = curve_public_key(curve_secret)
        else:
            key = new_signing_key()
            curve_public, curve_secret = curve_keypair()
            _write(key_path, _key_pem(key), _SECRET)
            _write(curve_path, curve_secret + b"\n", _SECRET)
        wanted = (name, role, organization, curve_public)
        if cert_path.exists() and self._current(cert_path, wanted, days):
            return _Credentials(
                key, load_certificate(cert_path.read_bytes(), name), curve_secret
            ), False
        cert = issue_participant(
            ca_key=self.ca_key,
            ca_cert=self.ca_cert,
            name=name,
            role=role,
            public_key=key.public_key(),
            curve_key=curve_public,
            days=days,
            organization=organization,
        )
        _write(cert_path, certificate_pem(cert), _PUBLIC)
        return _Credentials(key, cert, curve_secret), True

    def _current(
        self, cert_path: Path, wanted: tuple[str, str, str | None, bytes], days: int
    ) -> bool:
        """Whether the certificate at ``cert_path`` says ``(name, role, organization, curve
        key)`` and is not due for renewal."""
        try:
            known = verify_participant(
                load_certificate(cert_path.read_bytes(), wanted[0]), self.ca_cert
            )
        except AuthenticationError:
            return False
        cert = known.certificate
        lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
        renew_within = min(RENEW_WITHIN, lifetime / 2, datetime.timedelta(days=days) / 2)
        remaining = cert.not_valid_after_utc - datetime.datetime.now(datetime.timezone.utc)
        says = (known.name, known.role, known.organization, known.curve_key)
        return says == wanted and remaining > renew_within


def _sync_kit(
    folder: Path, files: dict[str, tuple[bytes, int]], managed_dirs: list[str]
) -> list[str]:
    """Make ``folder`` hold ``files`` (relative path → content, mode); return what changed.

    Files in ``managed_dirs`` that are not in ``files`` are removed (a revoked trusted cert).
    """
    changed: list[str] = []
    for relative, (data, mode) in sorted(files.items()):
        path = folder / relative
        try:
            same = path.read_bytes() == data and (path.stat().st_mode & 0o777) == mode
        except FileNotFoundError:
            same = False
        if not same:
            _write(path, data, mode)
            changed.append(relative)
    for directory in managed_dirs:
        for path in sorted((folder / directory).glob("*.pem")):
            relative = f"{directory}/{path.name}"
            if relative not in files:
                path.unlink()
                changed.append(relative)
    return changed


def default_site_policy(site: str, project: str) -> str:
    """The ``policy.yml`` provisioning writes into the kit of ``site`` (see the module docstring)."""
    return _DEFAULT_POLICY.format(site=site, project=project)


def provision(project: Project, workspace: Path) -> ProvisionReport:
    """Write (or bring up to date) the startup kit of every participant of ``project``.

    Parameters
    ----------
    project:
        The parsed ``project.yml``.
    workspace:
        Holds ``state/`` (the CA and keys, kept across runs) and ``kits/``.

    Raises
    ------
    ConfigError
        If ``workspace/state`` belongs to another project or is damaged.
    OSError
        If the workspace cannot be written.
    """
    state = _State(workspace / "state", project.name)
    kits = workspace / "kits"
    report = ProvisionReport(kits)
    roles = project.roles()
    organizations = project.organizations()
    credentials: dict[str, _Credentials] = {}
    for name, role in roles.items():
        credentials[name], issued = state.credentials(
            name, role, organizations[name], project.certificate_days
        )
        if issued:
            report.issued.append(name)
    ca_pem = certificate_pem(state.ca_cert)
    server_pem = certificate_pem(credentials[project.server.name].cert)
    for name, role in roles.items():
        own = credentials[name]
        files: dict[str, tuple[bytes, int]] = {
            "kit.json": (kit_config(project.name, name, role, project.server), _PUBLIC),
            CA_CERT: (ca_pem, _PUBLIC),
            PARTICIPANT_CERT: (certificate_pem(own.cert), _PUBLIC),
            PARTICIPANT_KEY: (_key_pem(own.key), _SECRET),
            CURVE_SECRET: (own.curve_secret + b"\n", _SECRET),
        }
        if role == "server":
            for other, other_credentials in credentials.items():
                if other != name:
                    pem = certificate_pem(other_credentials.cert)
                    files[f"{TRUSTED_DIR}/{other}.pem"] = (pem, _PUBLIC)
        else:
            files[SERVER_CERT] = (server_pem, _PUBLIC)
        if role in ("server", "site"):
            script = _START_SCRIPT.format(name=name, role=role, project=project.name)
            files[START_SCRIPT] = (script.encode(), _SCRIPT)
        folder = kits / name
        existed = folder.exists()
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        changed = _sync_kit(folder, files, [TRUSTED_DIR] if role == "server" else [])
        policy = folder / POLICY_FILE
        if role == "site" and not policy.exists():
            _write(policy, default_site_policy(name, project.name).encode(), _PUBLIC)
            if existed:
                changed.append(POLICY_FILE)
        if not existed:
            report.created.append(name)
        elif changed:
            report.updated[name] = changed
        else:
            report.unchanged.append(name)
    if kits.exists():
        report.stale = sorted(p.name for p in kits.iterdir() if p.is_dir() and p.name not in roles)
    return report
