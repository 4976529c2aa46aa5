"""Site policy: each site decides who may run jobs on it, with what code and how many resources.

A site keeps its own policy file, written by the site's admin and never sent over the network.
Its daemon calls :meth:`SitePolicy.check_submission` with the authenticated submitter and the
job's metadata *before* it loads any of the job's code (loading custom code runs it); a refusal
raises :class:`~fedcell.errors.PolicyError` whose message names the site, the job and the rule,
and that message is what the submitter gets back.

File format (YAML shown; JSON and TOML hold the same tree; the suffix picks the parser)::

    site: site-1                        # optional; used in refusal messages
    submit:
      roles: [project_admin, lead]      # any of these roles may submit ...
      names: [alice@hospital-a.org]     # ... and these people, whatever their roles
      organizations: [hospital-a]       # optional: only submitters of these organizations
      require_authentication: true      # default true; false only for POC/simulation
    custom_code:
      allow: [source]                   # kinds a job may bring: source, cloudpickle (default none)
      roles: [project_admin]            # optional: who may bring it (default: whoever may submit)
      names: []
    resources:
      max_concurrent_jobs: 2
      max_job_wall_time: 6h             # seconds, or a number with s/m/h/d
      max_memory_per_job: 16GiB         # bytes, or a number with KB/MB/GB/TB/KiB/MiB/GiB/TiB
    authorizer: hospital-ldap           # optional: entry point in group ``fedcell.authorizers``

Rules are checked in the file's order: ``submit`` (authentication, organization, role or name),
``custom_code`` (kinds, then who; custom code always needs an authenticated submitter),
``resources`` (running jobs, then what the job asks for), then each authorizer hook. Everything
the file does not grant is refused: no ``submit`` section means nobody may submit, no
``custom_code`` section means no custom code. Unknown keys are errors (a misspelt rule must not
silently grant or drop anything), as are values of the wrong type; every such error is a
:class:`~fedcell.errors.ConfigError` naming the file and the key.

Authorizer hooks let a site plug in its own checks (a directory lookup, office hours, a
ticket system): a callable ``hook(submitter, job) -> None`` that raises
:class:`~fedcell.errors.PolicyError` to refuse. Hooks only add refusals: they run after the file's
rules, and a job the file refuses never reaches them. A hook that raises anything else, or
returns a value, refuses the job too (fail closed) with a message saying so. Hooks come from the
file (``authorizer:``, an entry point of group :data:`ENTRY_POINT_GROUP`, loaded when the policy
is) or from the caller (``SitePolicy.load(path, authorizers=[hook])``).

Resource limits are admission rules here: a job may ask for a wall time or memory (its
metadata) up to the site's maximum, and :meth:`SitePolicy.job_limits` gives the limits the site
runtime then enforces on the admitted job (the job's ask, else the site's maximum).
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Literal, get_args

import yaml

from fedcell.errors import ConfigError, PolicyError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = [
    "ENTRY_POINT_GROUP",
    "Authorizer",
    "CustomCodeKind",
    "Grant",
    "JobLimits",
    "JobMeta",
    "NamedAuthorizer",
    "SitePolicy",
    "Submitter",
    "parse_duration",
    "parse_size",
]

ENTRY_POINT_GROUP = "fedcell.authorizers"

CustomCodeKind = Literal["source", "cloudpickle"]
_CUSTOM_CODE_KINDS: frozenset[str] = frozenset(get_args(CustomCodeKind))


@dataclass(frozen=True, slots=True)
class Submitter:
    """Who submits a job, as the site's daemon established it.

    Attributes
    ----------
    name:
        The submitter's identity (an admin's e-mail, a participant name).
    roles:
        Project roles the submitter holds (``project_admin``, ``org_admin``, ``lead``, ...).
    organization:
        The submitter's organization, if known.
    authenticated:
        Whether the identity was verified (certificate issued by the project CA, signed
        submission); ``False`` for a claim nobody checked.
    """

    name: str
    roles: frozenset[str] = frozenset()
    organization: str | None = None
    authenticated: bool = False


@dataclass(frozen=True, slots=True)
class JobMeta:
    """What the policy needs to know about a job, readable without loading its code.

    Attributes
    ----------
    name:
        The job's name.
    custom_code:
        Kinds of custom code the job brings: ``source`` (files in its ``custom/`` folder),
        ``cloudpickle`` (pickled functions or objects).
    wall_time:
        Seconds the job asks to run at most (``None``: the site's maximum).
    memory:
        Bytes the job asks for per job process (``None``: the site's maximum).
    """

    name: str
    custom_code: frozenset[CustomCodeKind] = frozenset()
    wall_time: float | None = None
    memory: int | None = None

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any]) -> JobMeta:
        """Validate job metadata that arrived from the network.

        Keys: ``name`` (required), ``custom_code`` (list of kinds), ``wall_time`` (seconds or
        a duration string), ``memory`` (bytes or a size string).

        Raises
        ------
        ConfigError
            If a key is unknown or a value is missing or malformed.
        """
        if not isinstance(raw, Mapping):
            raise ConfigError(f"job metadata must be a mapping, not {type(raw).__name__}")
        where = "job metadata"
        _reject_unknown(raw, {"name", "custom_code", "wall_time", "memory"}, where)
        name = raw.get("name")
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{where}: 'name' must be a non-empty string")
        kinds = _strings(raw.get("custom_code", []), f"{where}: custom_code")
        unknown = sorted(set(kinds) - _CUSTOM_CODE_KINDS)
        if unknown:
            raise ConfigError(
                f"{where}: unknown custom_code kind(s) {unknown} "
                f"(known: {', '.join(sorted(_CUSTOM_CODE_KINDS))})"
            )
        wall_time = raw.get("wall_time")
        memory = raw.get("memory")
        return cls(
            name=name,
            custom_code=frozenset(kinds),  # type: ignore[arg-type]
            wall_time=None if wall_time is None else parse_duration(wall_time, f"{where}: wall_time"),
            memory=None if memory is None else parse_size(memory, f"{where}: memory"),
        )


@dataclass(frozen=True, slots=True)
class JobLimits:
    """Limits the site runtime enforces on an admitted job (``None``: unlimited).

    Attributes
    ----------
    wall_time:
        Seconds after which the job is aborted.
    memory:
        Bytes each of the job's processes may use.
    """

    wall_time: float | None
    memory: int | None


#: ``hook(submitter, job) -> None``; raises PolicyError to refuse.
Authorizer = Callable[[Submitter, JobMeta], None]


@dataclass(frozen=True, slots=True)
class Grant:
    """Who a rule lets through: anyone holding one of ``roles``, or named in ``names``."""

    roles: frozenset[str] = frozenset()
    names: frozenset[str] = frozenset()

    def allows(self, submitter: Submitter) -> bool:
        return submitter.name in self.names or bool(self.roles & submitter.roles)

    def describe(self) -> str:
        return f"roles: {_names(self.roles)}; names: {_names(self.names)}"


@dataclass(frozen=True, slots=True)
class NamedAuthorizer:
    """An authorizer hook and the name refusals cite (its entry point or qualified name)."""

    name: str
    hook: Callable[[Submitter, JobMeta], object]


@dataclass(frozen=True, slots=True)
class SitePolicy:
    """A site's rules for job submission; see the module docstring for the file format.

    Build with :meth:`load` (a file) or :meth:`from_mapping` (a parsed tree).

    Attributes
    ----------
    site, source:
        The site's name and where the rules came from (both quoted in refusals).
    submit, organizations, require_authentication:
        Who may submit (``organizations`` ``None``: any organization).
    custom_code_kinds, custom_code_grant:
        Custom code the site accepts, and who may bring it (``None``: whoever may submit).
    max_concurrent_jobs, max_job_wall_time, max_memory_per_job:
        Resource limits (``None``: unlimited); seconds and bytes.
    authorizers:
        Hooks run after the rules, in order (the file's first).
    """

    site: str = "this site"
    source: str = "<policy>"
    submit: Grant = field(default_factory=Grant)
    organizations: frozenset[str] | None = None
    require_authentication: bool = True
    custom_code_kinds: frozenset[str] = frozenset()
    custom_code_grant: Grant | None = None
    max_concurrent_jobs: int | None = None
    max_job_wall_time: float | None = None
    max_memory_per_job: int | None = None
    authorizers: tuple[NamedAuthorizer, ...] = ()

    # ------------------------------------------------------------------------------------------
    # loading

    @classmethod
    def load(cls, path: str | Path, *, authorizers: Sequence[Authorizer] = ()) -> SitePolicy:
        """Read a policy file (``.yaml``/``.yml``, ``.json`` or ``.toml``).

        ``authorizers`` are hooks added to the one the file names (all must allow a job).

        Raises
        ------
        ConfigError
            If the file cannot be read or parsed, has an unknown suffix, an unknown key, a
            value of the wrong type, or names an authorizer entry point that does not load.
        """
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix not in {".yaml", ".yml", ".json", ".toml"}:
            raise ConfigError(
                f"site policy {path}: unknown file type {suffix!r} (use .yaml, .json or .toml)"
            )
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"site policy {path}: cannot read it: {exc}") from exc
        try:
            if suffix == ".json":
                tree = json.loads(text)
            elif suffix == ".toml":
                tree = tomllib.loads(text)
            else:
                tree = yaml.safe_load(text)
        except (ValueError, yaml.YAMLError) as exc:
            raise ConfigError(f"site policy {path}: does not parse: {exc}") from exc
        return cls.from_mapping(tree, source=str(path), authorizers=authorizers)

    @classmethod
    def from_mapping(
        cls,
        tree: Any,
        *,
        source: str = "<policy>",
        authorizers: Sequence[Authorizer] = (),
    ) -> SitePolicy:
        """Build a policy from a parsed tree (the file's content).

        Raises
        ------
        ConfigError
            As :meth:`load`, naming ``source``.
        """
        if not isinstance(tree, Mapping):
            raise ConfigError(f"site policy {source}: the top level must be a mapping")
        _reject_unknown(
            tree, {"site", "submit", "custom_code", "resources", "authorizer"}, f"site policy {source}"
        )
        site = tree.get("site", "this site")
        if not isinstance(site, str) or not site:
            raise ConfigError(f"site policy {source}: 'site' must be a non-empty string")

        submit = _section(tree, "submit", source)
        _reject_unknown(
            submit, {"roles", "names", "organizations", "require_authentication"},
            f"site policy {source}: submit",
        )
        organizations = submit.get("organizations")
        require_authentication = submit.get("require_authentication", True)
        if not isinstance(require_authentication, bool):
            raise ConfigError(
                f"site policy {source}: submit.require_authentication must be true or false"
            )

        custom = _section(tree, "custom_code", source)
        _reject_unknown(custom, {"allow", "roles", "names"}, f"site policy {source}: custom_code")
        kinds = frozenset(_strings(custom.get("allow", []), f"site policy {source}: custom_code.allow"))
        unknown = sorted(kinds - _CUSTOM_CODE_KINDS)
        if unknown:
            raise ConfigError(
                f"site policy {source}: custom_code.allow names unknown kind(s) {unknown} "
                f"(known: {', '.join(sorted(_CUSTOM_CODE_KINDS))})"
            )

        resources = _section(tree, "resources", source)
        where = f"site policy {source}: resources"
        _reject_unknown(
            resources, {"max_concurrent_jobs", "max_job_wall_time", "max_memory_per_job"}, where
        )
        max_jobs = resources.get("max_concurrent_jobs")
        if max_jobs is not None and (type(max_jobs) is not int or max_jobs < 1):
            raise ConfigError(f"{where}.max_concurrent_jobs must be an integer >= 1")
        wall = resources.get("max_job_wall_time")
        memory = resources.get("max_memory_per_job")

        hooks = [NamedAuthorizer(_hook_name(hook), hook) for hook in authorizers]
        entry_point = tree.get("authorizer")
        if entry_point is not None:
            if not isinstance(entry_point, str):
                raise ConfigError(f"site policy {source}: 'authorizer' must be an entry-point name")
            hooks.insert(0, NamedAuthorizer(entry_point, _load_authorizer(entry_point, source)))

        return cls(
            site=site,
            source=source,
            submit=_grant(submit, f"site policy {source}: submit"),
            organizations=None
            if organizations is None
            else frozenset(_strings(organizations, f"site policy {source}: submit.organizations")),
            require_authentication=require_authentication,
            custom_code_kinds=kinds,
            custom_code_grant=_grant(custom, f"site policy {source}: custom_code")
            if "roles" in custom or "names" in custom
            else None,
            max_concurrent_jobs=max_jobs,
            max_job_wall_time=None if wall is None else parse_duration(wall, f"{where}.max_job_wall_time"),
            max_memory_per_job=None
            if memory is None
            else parse_size(memory, f"{where}.max_memory_per_job"),
            authorizers=tuple(hooks),
        )

    # ------------------------------------------------------------------------------------------
    # decisions

    def check_submission(
        self, submitter: Submitter, job: JobMeta, *, running_jobs: int = 0
    ) -> None:
        """Refuse the job unless this site's policy allows ``submitter`` to run it now.

        Call it before loading any of the job's code. ``running_jobs`` is how many jobs the
        site runs at the moment.

        Raises
        ------
        PolicyError
            Naming the site, the job and the rule that refuses it.
        """
        if self.require_authentication and not submitter.authenticated:
            raise self._refusal(job, "submit.require_authentication",
                         f"submitter {submitter.name!r} is not authenticated")
        if self.organizations is not None and submitter.organization not in self.organizations:
            raise self._refusal(
                job, "submit.organizations",
                f"submitter {submitter.name!r} of organization {submitter.organization!r} is not "
                f"in {sorted(self.organizations)}",
            )
        if not self.submit.allows(submitter):
            raise self._refusal(
                job, "submit",
                f"submitter {submitter.name!r} (roles: {_names(submitter.roles)}) "
                f"may not submit jobs (allowed {self.submit.describe()})",
            )
        if job.custom_code:
            self._check_custom_code(submitter, job)
        self._check_resources(job, running_jobs)
        for named in self.authorizers:
            self._run_authorizer(named, submitter, job)

    def job_limits(self, job: JobMeta) -> JobLimits:
        """The limits to enforce on an admitted job: its ask, else this site's maximum."""
        return JobLimits(
            wall_time=job.wall_time if job.wall_time is not None else self.max_job_wall_time,
            memory=job.memory if job.memory is not None else self.max_memory_per_job,
        )

    def _check_custom_code(self, submitter: Submitter, job: JobMeta) -> None:
        kinds = ", ".join(sorted(job.custom_code))
        if not submitter.authenticated:
            raise self._refusal(
                job, "custom_code",
                f"the job brings custom code ({kinds}) from an unauthenticated submitter "
                f"{submitter.name!r}",
            )
        refused = sorted(set(job.custom_code) - self.custom_code_kinds)
        if refused:
            allowed = _names(self.custom_code_kinds)
            raise self._refusal(
                job, "custom_code.allow",
                f"the job brings {', '.join(refused)} code; this site allows custom code: {allowed}",
            )
        grant = self.custom_code_grant
        if grant is not None and not grant.allows(submitter):
            raise self._refusal(
                job, "custom_code.roles",
                f"submitter {submitter.name!r} may not bring custom code (allowed "
                f"{grant.describe()})",
            )

    def _check_resources(self, job: JobMeta, running_jobs: int) -> None:
        if self.max_concurrent_jobs is not None and running_jobs >= self.max_concurrent_jobs:
            raise self._refusal(
                job, "resources.max_concurrent_jobs",
                f"{running_jobs} job(s) running; this site runs at most {self.max_concurrent_jobs}",
            )
        if (
            self.max_job_wall_time is not None
            and job.wall_time is not None
            and job.wall_time > self.max_job_wall_time
        ):
            raise self._refusal(
                job, "resources.max_job_wall_time",
                f"the job asks for {job.wall_time:g} s; this site allows {self.max_job_wall_time:g} s",
            )
        if (
            self.max_memory_per_job is not None
            and job.memory is not None
            and job.memory > self.max_memory_per_job
        ):
            raise self._refusal(
                job, "resources.max_memory_per_job",
                f"the job asks for {job.memory} bytes per process; this site allows "
                f"{self.max_memory_per_job}",
            )

    def _run_authorizer(self, named: NamedAuthorizer, submitter: Submitter, job: JobMeta) -> None:
        try:
            verdict: object = named.hook(submitter, job)
        except PolicyError as exc:
            raise self._refusal(job, f"authorizer {named.name!r}", str(exc)) from exc
        except Exception as exc:
            raise self._refusal(
                job, f"authorizer {named.name!r}",
                f"the hook failed ({type(exc).__name__}: {exc}); refusing to be safe",
            ) from exc
        if verdict is not None:
            raise self._refusal(
                job, f"authorizer {named.name!r}",
                f"the hook returned {verdict!r}; a hook returns None to allow and raises "
                "PolicyError to refuse",
            )

    def _refusal(self, job: JobMeta, rule: str, reason: str) -> PolicyError:
        return PolicyError(f"{self.site} refuses job {job.name!r}: rule {rule} ({self.source}): {reason}")


# ----------------------------------------------------------------------------------------------
# parsing helpers

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}


def parse_duration(value: object, where: str) -> float:
    """Seconds from a number of seconds or a string like ``90s``, ``30m``, ``6h``, ``2d``.

    Raises
    ------
    ConfigError
        If ``value`` is neither, or not positive; the message names ``where``.
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and (match := _DURATION.match(value)):
        seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    else:
        raise ConfigError(f"{where} must be seconds or a duration like '30m' or '6h', not {value!r}")
    if not (seconds > 0 and math.isfinite(seconds)):
        raise ConfigError(f"{where} must be positive and finite, not {value!r}")
    return seconds


def parse_size(value: object, where: str) -> int:
    """Bytes from an integer or a string like ``512MiB``, ``16GiB``, ``2GB``.

    Raises
    ------
    ConfigError
        If ``value`` is neither, or not positive; the message names ``where``.
    """
    if type(value) is int:
        size = value
    elif isinstance(value, str) and (match := _SIZE.match(value)):
        scaled = float(match.group(1)) * _SIZE_UNITS[(match.group(2) or "b").lower()]
        if not math.isfinite(scaled):
            raise ConfigError(f"{where} is too large: {value!r}")
        size = int(scaled)
    else:
        raise ConfigError(f"{where} must be bytes or a size like '512MiB' or '16GiB', not {value!r}")
    if size <= 0:
        raise ConfigError(f"{where} must be positive, not {value!r}")
    return size


def _reject_unknown(tree: Mapping[str, Any], known: set[str], where: str) -> None:
    unknown = sorted(str(key) for key in tree if key not in known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown} (known: {', '.join(sorted(known))})")


def _section(tree: Mapping[str, Any], key: str, source: str) -> Mapping[str, Any]:
    section = tree.get(key, {})
    if section is None:
        return {}
    if not isinstance(section, Mapping):
        raise ConfigError(f"site policy {source}: {key!r} must be a mapping")
    return section


def _strings(value: object, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ConfigError(f"{where} must be a list of strings, not {value!r}")
    return list(value)


def _grant(section: Mapping[str, Any], where: str) -> Grant:
    return Grant(
        roles=frozenset(_strings(section.get("roles", []), f"{where}.roles")),
        names=frozenset(_strings(section.get("names", []), f"{where}.names")),
    )


def _hook_name(hook: Authorizer) -> str:
    return getattr(hook, "__qualname__", None) or repr(hook)


def _load_authorizer(name: str, source: str) -> Authorizer:
    found = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
    if not found:
        known = sorted(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))
        raise ConfigError(
            f"site policy {source}: no authorizer {name!r} in entry-point group "
            f"{ENTRY_POINT_GROUP!r} (installed: {', '.join(known) or 'none'})"
        )
    try:
        hook = found[0].load()
    except Exception as exc:
        raise ConfigError(
            f"site policy {source}: authorizer {name!r} ({found[0].value}) does not load: {exc}"
        ) from exc
    if not callable(hook):
        raise ConfigError(f"site policy {source}: authorizer {name!r} is not callable")
    return hook  # type: ignore[no-any-return]


def _names(values: Iterable[str]) -> str:
    return ", ".join(sorted(values)) or "none"
