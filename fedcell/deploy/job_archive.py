"""Job folders as archives, unpacked safely, and read without running any of their code.

A submitted job travels as a gzip-compressed tar of its folder (see
:mod:`fedcell.engine.job_folder` for the layout): :func:`pack_job` at the admin's side. The server
daemon and every site daemon unpack what an admin sent (:func:`unpack_job`), so unpacking treats
the archive as hostile:

- the archive may be at most :data:`~fedcell.deploy.protocol.MAX_ARCHIVE_BYTES`;
- only regular files and folders are accepted; a symbolic or hard link, a device, a FIFO, an
  absolute name, a name with a ``..`` part, or a name seen twice refuses the whole archive
  (:class:`~fedcell.errors.ConfigError` naming the member) before anything is written;
- the announced sizes are summed first: more than :data:`MAX_UNPACKED_BYTES` (a gzip bomb) or
  more than :data:`MAX_MEMBERS` entries refuses it;
- extraction then runs with tarfile's ``data`` filter as a second guard (no set-uid bits,
  nothing outside the destination).

:func:`read_job_config` and :func:`job_meta` read what the daemons need from the job's config
(``job.json``, ``job.yaml`` or ``job.toml``, exactly one) with ``json``/``yaml.safe_load``/
``tomllib`` only. Importing the job (``Job.load``) is left to the job processes, after the site's
policy admitted the job.

Downloads reuse the same pieces: :func:`pack_paths` writes a results archive to a file and
:func:`extract_archive` unpacks it at the admin's side with the same member checks.
"""

from __future__ import annotations

import io
import json
import tarfile
import zlib
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import IO, Any, Final

import tomllib
import yaml

from fedcell.deploy.protocol import MAX_ARCHIVE_BYTES
from fedcell.engine.job_folder import CONFIG_NAMES, CUSTOM_DIR
from fedcell.engine.policy import JobMeta
from fedcell.errors import ConfigError

__all__ = [
    "MAX_MEMBERS",
    "MAX_UNPACKED_BYTES",
    "extract_archive",
    "job_meta",
    "pack_job",
    "pack_paths",
    "read_job_config",
    "unpack_job",
]

#: Most bytes a submitted job folder may unpack to.
MAX_UNPACKED_BYTES: Final = 1024 * 1024 * 1024
#: Most entries (files and folders) an archive may hold.
MAX_MEMBERS: Final = 100_000


def pack_job(folder: Path) -> bytes:
    """The tar.gz of the job folder ``folder`` (names relative to it), for a submission.

    ``__pycache__`` folders are left out.

    Raises
    ------
    ConfigError
        If ``folder`` is not a folder, holds a link or special file, or packs to more than
        :data:`~fedcell.deploy.protocol.MAX_ARCHIVE_BYTES`.
    """
    if not folder.is_dir():
        raise ConfigError(f"job folder {folder} does not exist")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for path in sorted(folder.rglob("*")):
            relative = path.relative_to(folder)
            if "__pycache__" in relative.parts:
                continue
            _add(tar, path, relative.as_posix())
    data = buffer.getvalue()
    if len(data) > MAX_ARCHIVE_BYTES:
        raise ConfigError(
            f"job folder {folder} packs to {len(data)} bytes, above the "
            f"{MAX_ARCHIVE_BYTES >> 20} MiB limit of a submission"
        )
    return data


def unpack_job(data: bytes, destination: Path) -> Path:
    """Unpack the job archive ``data`` into ``destination`` (created) after checking every
    entry; return ``destination``.

    Raises
    ------
    ConfigError
        If the archive is above :data:`~fedcell.deploy.protocol.MAX_ARCHIVE_BYTES`, is not a
        tar.gz, holds a link, device, absolute name, ``..`` part or a duplicate name, or unpacks
        to more than :data:`MAX_UNPACKED_BYTES`.
    """
    if len(data) > MAX_ARCHIVE_BYTES:
        raise ConfigError(
            f"the job archive is {len(data)} bytes, above the {MAX_ARCHIVE_BYTES >> 20} MiB limit"
        )
    _extract(io.BytesIO(data), destination, MAX_UNPACKED_BYTES, "the job archive")
    return destination


def pack_paths(entries: Mapping[str, Path], target: Path) -> None:
    """Write a tar.gz to ``target`` holding each path of ``entries`` under its name (folders
    recursively); paths that do not exist are left out.

    Raises
    ------
    ConfigError
        If a path holds a link or a special file.
    OSError
        If a file cannot be read or ``target`` written.
    """
    with tarfile.open(target, mode="w:gz") as tar:
        for name, path in entries.items():
            if not path.exists():
                continue
            _add(tar, path, name)
            if path.is_dir():
                for inner in sorted(path.rglob("*")):
                    _add(tar, inner, f"{name}/{inner.relative_to(path).as_posix()}")


def extract_archive(archive: Path, destination: Path) -> None:
    """Unpack the tar.gz file ``archive`` into ``destination`` with the member checks of
    :func:`unpack_job` (no size limit: a download holds what the admin asked for).

    Raises
    ------
    ConfigError
        If the archive is not a tar.gz or holds a link, device, absolute name, ``..`` part or
        a duplicate name.
    """
    with archive.open("rb") as fileobj:
        _extract(fileobj, destination, None, str(archive))


def _add(tar: tarfile.TarFile, path: Path, name: str) -> None:
    if path.is_symlink() or not (path.is_file() or path.is_dir()):
        raise ConfigError(f"{path} is a link or a special file: only files and folders travel")
    tar.add(path, arcname=name, recursive=False)


def _extract(fileobj: IO[bytes], destination: Path, max_bytes: int | None, what: str) -> None:
    try:
        with tarfile.open(fileobj=fileobj, mode="r:gz") as tar:
            members = _checked_members(tar, max_bytes, what)
            destination.mkdir(parents=True, exist_ok=True)
            tar.extractall(destination, members=members, filter="data")
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise ConfigError(f"{what} cannot be unpacked: {exc}") from exc


def _checked_members(
    tar: tarfile.TarFile, max_bytes: int | None, what: str
) -> list[tarfile.TarInfo]:
    members: list[tarfile.TarInfo] = []
    seen: set[str] = set()
    total = 0
    for member in tar:
        if len(members) >= MAX_MEMBERS:
            raise ConfigError(f"{what} holds more than {MAX_MEMBERS} entries")
        name = PurePosixPath(member.name)
        if name.is_absolute() or ".." in name.parts or not name.parts:
            raise ConfigError(f"{what} holds the unsafe name {member.name!r}")
        if not (member.isfile() or member.isdir()):
            raise ConfigError(
                f"{what} holds {member.name!r}, a link or a special file: only files and "
                "folders are accepted"
            )
        normal = name.as_posix()
        if normal in seen:
            raise ConfigError(f"{what} holds {member.name!r} twice")
        seen.add(normal)
        total += member.size
        if max_bytes is not None and total > max_bytes:
            raise ConfigError(
                f"{what} unpacks to more than {max_bytes >> 20} MiB (at {member.name!r})"
            )
        members.append(member)
    return members


def read_job_config(folder: Path) -> Mapping[str, Any]:
    """The parsed config of the job folder ``folder`` (json/yaml/toml parsers only: nothing of
    the job is imported).

    Raises
    ------
    ConfigError
        If the folder holds no or several configs, or the config does not parse or is not a
        mapping with a ``job`` section naming the job.
    """
    present = [folder / name for name in CONFIG_NAMES.values() if (folder / name).is_file()]
    if len(present) != 1:
        found = [p.name for p in present] or "none"
        raise ConfigError(
            f"a job folder must hold exactly one of {list(CONFIG_NAMES.values())}; found {found}"
        )
    path = present[0]
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".json":
            tree = json.loads(text)
        elif path.suffix == ".yaml":
            tree = yaml.safe_load(text)
        else:
            tree = tomllib.loads(text)
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path.name}: cannot parse the job config: {exc}") from exc
    if not isinstance(tree, dict):
        raise ConfigError(f"{path.name}: a job config must be a mapping")
    header = tree.get("job")
    if not isinstance(header, dict) or not isinstance(header.get("name"), str):
        raise ConfigError(f"{path.name}: the 'job' section must name the job")
    return tree


def job_meta(folder: Path) -> JobMeta:
    """What a site's policy checks about the job in ``folder``, read without importing it.

    Custom code is ``source`` when the config lists ``custom_code`` modules or ``custom/`` holds
    files; ``wall_time`` and ``memory`` come from the config's ``job`` section when present.

    Raises
    ------
    ConfigError
        As :func:`read_job_config`, or if ``wall_time``/``memory`` are malformed.
    """
    tree = read_job_config(folder)
    header = tree["job"]
    custom = folder / CUSTOM_DIR
    has_source = bool(tree.get("custom_code")) or (
        custom.is_dir() and any(p.is_file() for p in custom.rglob("*"))
    )
    raw: dict[str, Any] = {"name": header["name"]}
    if has_source:
        raw["custom_code"] = ["source"]
    for key in ("wall_time", "memory"):
        if header.get(key) is not None:
            raw[key] = header[key]
    return JobMeta.from_mapping(raw)
