"""``project.yml``: who takes part in a deployment, their organizations, and where the server is.

Schema (``project``, ``server.host``, ``server.port``, ``sites`` and each admin's ``name`` are
required; the rest is optional)::

    project: hospital-net          # the project name; the CA is "<project> CA"
    server:
      name: server                 # the server's participant and cell name (default: server)
      host: fl.example.org         # what sites and admins connect to (a name or an IP)
      port: 8002
      listen_host: "*"             # the address the server binds (default: every interface)
      org: nvidia                  # the server's organization (default: none)
    sites:
      - site-1                     # a name: a site without an organization
      - {name: site-2, org: hospital-b}
    admins:
      - name: alice
        role: project_admin        # project_admin | lead | member (default: member)
        org: hospital-a            # the admin's organization (default: none)
    certificate_days: 365          # participant certificate lifetime (default: 365)

Every name is a participant name and a cell name: one label of letters, digits, ``_`` and ``-``
(no dots: dotted names are a participant's own sub-cells, such as ``site-1.job-7``). Names are
unique across the server, sites and admins. An organization is a label of the same form; it goes
into the participant's certificate (:mod:`fedcell.deploy.certificates`), so a site policy can
restrict submitters by organization (``submit.organizations``) on an identity the CA vouches for.
Several participants may share an organization. Unknown keys are refused, so a misspelt key is an
error rather than a silently ignored setting.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fedcell.deploy.certificates import ADMIN_ROLES
from fedcell.errors import ConfigError

__all__ = ["Admin", "Project", "ServerAddress", "Site", "load_project", "parse_project"]

_LABEL = re.compile(r"[A-Za-z0-9_-]{1,63}")


@dataclass(frozen=True, slots=True)
class ServerAddress:
    """Where the server listens and where the others reach it.

    Attributes
    ----------
    name:
        The server's participant (and cell) name.
    host, port:
        The address sites and admins connect to.
    listen_host:
        The address the server binds (``*``: every interface).
    """

    name: str
    host: str
    port: int
    listen_host: str = "*"

    @property
    def url(self) -> str:
        """``tcp://host:port`` (an IPv6 host in brackets)."""
        return f"tcp://{_bracketed(self.host)}:{self.port}"

    @property
    def listen_url(self) -> str:
        """``tcp://listen_host:port``."""
        return f"tcp://{_bracketed(self.listen_host)}:{self.port}"


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


@dataclass(frozen=True, slots=True)
class Site:
    """A site: trains, under the policy of its own ``org`` (``None``: no organization)."""

    name: str
    org: str | None = None


@dataclass(frozen=True, slots=True)
class Admin:
    """An admin: signs job commands with the certificate of ``role`` (and ``org``, if any)."""

    name: str
    role: str = "member"
    org: str | None = None


@dataclass(frozen=True, slots=True)
class Project:
    """A parsed ``project.yml`` (see the module docstring for the schema).

    ``server_org`` is the server's organization (``server.org`` in the file).
    """

    name: str
    server: ServerAddress
    sites: tuple[Site, ...]
    admins: tuple[Admin, ...] = ()
    certificate_days: int = 365
    server_org: str | None = None

    def __post_init__(self) -> None:
        names = [self.server.name, *(s.name for s in self.sites), *(a.name for a in self.admins)]
        for name in [self.name, *names]:
            _check_label(name)
        for name, org in self.organizations().items():
            if org is not None and (not isinstance(org, str) or not _LABEL.fullmatch(org)):
                raise ConfigError(
                    f"{name!r} has an invalid organization {org!r}: expected 1-63 letters, "
                    "digits, '_' or '-'"
                )
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ConfigError(f"participant names must be unique; repeated: {duplicates}")
        for admin in self.admins:
            if admin.role not in ADMIN_ROLES:
                raise ConfigError(
                    f"admin {admin.name!r} has role {admin.role!r}; expected one of {ADMIN_ROLES}"
                )
        if not 1 <= self.server.port <= 65535:
            raise ConfigError(f"server port {self.server.port} is not in 1..65535")
        if not self.server.host or not self.server.listen_host:
            raise ConfigError("server host and listen_host must not be empty")
        if self.certificate_days < 1:
            raise ConfigError(f"certificate_days must be >= 1, got {self.certificate_days}")

    def roles(self) -> dict[str, str]:
        """Participant name → role, server first, then sites, then admins."""
        return {
            self.server.name: "server",
            **{site.name: "site" for site in self.sites},
            **{admin.name: admin.role for admin in self.admins},
        }

    def organizations(self) -> dict[str, str | None]:
        """Participant name → organization (``None``: none), in the order of :meth:`roles`."""
        return {
            self.server.name: self.server_org,
            **{site.name: site.org for site in self.sites},
            **{admin.name: admin.org for admin in self.admins},
        }


def _check_label(name: object) -> None:
    if not isinstance(name, str) or not _LABEL.fullmatch(name):
        raise ConfigError(
            f"invalid name {name!r}: expected 1-63 letters, digits, '_' or '-' (no dots)"
        )


def _take(tree: Mapping[str, Any], where: str, required: set[str], optional: set[str]) -> None:
    unknown = set(tree) - required - optional
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)}")
    missing = required - set(tree)
    if missing:
        raise ConfigError(f"{where}: missing keys {sorted(missing)}")


def _typed(value: Any, kind: type, where: str) -> Any:
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{where} must be a {kind.__name__}, got {value!r}")
    return value


def parse_project(tree: Any, source: str = "project.yml") -> Project:
    """Build a :class:`Project` from the parsed YAML ``tree``.

    Raises
    ------
    ConfigError
        If a key is missing, unknown or of the wrong type, or a name is invalid or repeated.
    """
    _typed(tree, dict, source)
    _take(tree, source, {"project", "server", "sites"}, {"admins", "certificate_days"})
    server = _typed(tree["server"], dict, f"{source}: server")
    _take(server, f"{source}: server", {"host", "port"}, {"name", "listen_host", "org"})
    sites = [
        _site(entry, f"{source}: sites[{i}]")
        for i, entry in enumerate(_typed(tree["sites"], list, f"{source}: sites"))
    ]
    admins = []
    for i, entry in enumerate(_typed(tree.get("admins", []), list, f"{source}: admins")):
        where = f"{source}: admins[{i}]"
        _take(_typed(entry, dict, where), where, {"name"}, {"role", "org"})
        admins.append(
            Admin(
                entry["name"],
                _typed(entry.get("role", "member"), str, f"{where}.role"),
                _org(entry, f"{where}.org"),
            )
        )
    return Project(
        name=_typed(tree["project"], str, f"{source}: project"),
        server=ServerAddress(
            name=_typed(server.get("name", "server"), str, f"{source}: server.name"),
            host=str(_typed(server["host"], str, f"{source}: server.host")),
            port=_typed(server["port"], int, f"{source}: server.port"),
            listen_host=_typed(server.get("listen_host", "*"), str, f"{source}: listen_host"),
        ),
        sites=tuple(sites),
        admins=tuple(admins),
        certificate_days=_typed(tree.get("certificate_days", 365), int, f"{source}: days"),
        server_org=_org(server, f"{source}: server.org"),
    )


def _site(entry: Any, where: str) -> Site:
    """A ``sites`` entry: a name, or a ``{name, org}`` mapping."""
    if isinstance(entry, dict):
        _take(entry, where, {"name"}, {"org"})
        return Site(_typed(entry["name"], str, f"{where}.name"), _org(entry, f"{where}.org"))
    if not isinstance(entry, str):
        raise ConfigError(f"{where} must be a name or a {{name, org}} mapping, got {entry!r}")
    return Site(entry)


def _org(entry: Mapping[str, Any], where: str) -> str | None:
    """The optional ``org`` of ``entry`` (a string; its form is checked by :class:`Project`)."""
    org = entry.get("org")
    return None if org is None else str(_typed(org, str, where))


def load_project(path: Path) -> Project:
    """Read and validate ``project.yml``.

    Raises
    ------
    ConfigError
        If the file cannot be read, is not YAML, or does not follow the schema.
    """
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read project file {path}: {exc}") from exc
    return parse_project(tree, str(path))
