"""The server daemon's job records on disk, and each job's folder layout.

::

    <workspace>/jobs/<job_id>/
        record.json        the JobInfo as JSON (atomic replace on every change)
        job/               the submitted folder, unpacked
        server.log         the job process's stdout and stderr
        job_process.pid    the job process's id while it runs
        results/           the job process's --workspace: result.json, metrics.csv, models,
                           checkpoint/, progress.json

Records are the daemon's memory across restarts: :meth:`JobStore.load` reads every
``record.json`` back (an unreadable one is logged and skipped, never fatal). Job ids come from
the network in admin commands, so :meth:`JobStore.get` accepts only ids of the form the server
assigns (10 hex digits) that it has a record of: no path is built from an unchecked string.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from fedcell.deploy.protocol import MAX_LOG_CHUNK_BYTES, JobInfo, LogChunk
from fedcell.errors import JobError, ProtocolError

__all__ = ["JobPaths", "JobStore", "read_log_chunk", "read_progress"]

logger = logging.getLogger(__name__)

_JOB_ID: Final = re.compile(r"[0-9a-f]{10}")


@dataclass(frozen=True, slots=True)
class JobPaths:
    """Where one job's files live (see the module docstring)."""

    folder: Path

    @property
    def record(self) -> Path:
        return self.folder / "record.json"

    @property
    def job_dir(self) -> Path:
        return self.folder / "job"

    @property
    def server_log(self) -> Path:
        return self.folder / "server.log"

    @property
    def pid_file(self) -> Path:
        return self.folder / "job_process.pid"

    @property
    def results(self) -> Path:
        return self.folder / "results"


class JobStore:
    """Job records under ``root`` (``<workspace>/jobs``), cached in memory.

    Parameters
    ----------
    root:
        The folder holding one sub-folder per job (created).
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self._records: dict[str, JobInfo] = {}

    def load(self) -> list[JobInfo]:
        """Read every record on disk (replacing the cache); return them newest first."""
        self._records = {}
        for path in sorted(self.root.glob("*/record.json")):
            try:
                info = JobInfo.from_json(json.loads(path.read_text()))
            except (OSError, ValueError, ProtocolError) as exc:
                logger.error("skipping the unreadable job record %s: %s", path, exc)
                continue
            if info.job_id != path.parent.name:
                logger.error("skipping %s: it is the record of job %s", path, info.job_id)
                continue
            self._records[info.job_id] = info
        return self.all()

    def new_id(self) -> str:
        """A fresh job id (10 hex digits) with no folder yet."""
        while True:
            job_id = uuid.uuid4().hex[:10]
            if job_id not in self._records and not (self.root / job_id).exists():
                return job_id

    def paths(self, job_id: str) -> JobPaths:
        """The layout of job ``job_id`` (ids are checked by :meth:`get` before use)."""
        return JobPaths(self.root / job_id)

    def save(self, info: JobInfo) -> None:
        """Write ``info`` as its job's record (atomically) and cache it.

        Raises
        ------
        OSError
            If the record cannot be written.
        """
        paths = self.paths(info.job_id)
        paths.folder.mkdir(parents=True, exist_ok=True)
        temporary = paths.record.with_suffix(".tmp")
        temporary.write_text(json.dumps(info.to_json(), indent=2))
        os.replace(temporary, paths.record)
        self._records[info.job_id] = info

    def discard(self, job_id: str) -> None:
        """Remove a job's folder and record (a submission that never became a job)."""
        self._records.pop(job_id, None)
        shutil.rmtree(self.paths(job_id).folder, ignore_errors=True)

    def get(self, job_id: object) -> JobInfo:
        """The record of ``job_id``.

        Raises
        ------
        JobError
            If ``job_id`` is not a job id this server assigned.
        """
        if not isinstance(job_id, str) or not _JOB_ID.fullmatch(job_id):
            raise JobError(f"{job_id!r:.40} is not a job id (10 hex digits)")
        info = self._records.get(job_id)
        if info is None:
            raise JobError(f"no job {job_id!r} on this server")
        return info

    def all(self) -> list[JobInfo]:
        """Every record, newest submission first."""
        return sorted(self._records.values(), key=lambda i: i.submitted_at, reverse=True)


def read_progress(results: Path) -> dict[str, Any]:
    """The job process's last ``progress.json`` in ``results`` (``{}`` if none or torn)."""
    try:
        progress = json.loads((results / "progress.json").read_text())
    except (OSError, ValueError):
        return {}
    return progress if isinstance(progress, dict) else {}


def read_log_chunk(path: Path, offset: int, ended: bool) -> LogChunk:
    """Up to :data:`~fedcell.deploy.protocol.MAX_LOG_CHUNK_BYTES` of the log at ``path`` from
    byte ``offset`` on. ``ended`` says the writer has exited (checked by the caller *before*
    reading, so no line written after the check is missed): the chunk is ``done`` once it
    reaches the end. A UTF-8 character cut by the chunk limit is left for the next chunk.
    """
    try:
        with path.open("rb") as fh:
            fh.seek(offset)
            data = fh.read(MAX_LOG_CHUNK_BYTES)
            at_end = not fh.read(1)
    except FileNotFoundError:
        return LogChunk("", offset, ended)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.reason == "unexpected end of data" and exc.end == len(data):
            data = data[: exc.start]
            at_end = False
        text = data.decode("utf-8", errors="replace")
    return LogChunk(text, offset + len(data), ended and at_end)
