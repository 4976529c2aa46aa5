"""The job protocol of a deployment: admin → server daemon → site daemons, and its wire types.

Three kinds of process talk here (``docs/deployment.md`` section 5 has the whole picture):

- an **admin client** (:class:`~fedcell.deploy.admin.AdminClient`, cell ``<admin>.cli-<8 hex>``)
  sends :data:`ADMIN_CHANNEL` requests ``{"signed": SignedCommand, "data": archive or None}`` to
  the server daemon. The signed payload is ``{"command": NAME, "args": {...}}``; the server
  verifies every command before anything else. The commands and their replies:

  ============  ==============================================  ===================================
  command       args                                            reply
  ============  ==============================================  ===================================
  ``submit``    ``archive_sha256`` (hex), ``sites`` (list|None)   :class:`JobInfo` (``running``)
  ``list``      –                                               ``list[JobInfo]``, newest first
  ``status``    ``job_id``                                      :class:`JobInfo`
  ``abort``     ``job_id``                                      :class:`JobInfo` (``aborted``)
  ``download``  ``job_id``                                      ``{"file", "sha256", "size"}``
                                                                after the file was sent
  ``logs``      ``job_id``, ``site`` (str|None), ``offset``     :class:`LogChunk`
  ``sites``     –                                               ``list[SiteStatus]``
  ============  ==============================================  ===================================

  A refusal or error is raised in the server's handler as a :mod:`fedcell.errors` class; the
  cell carries its type name and message back and the admin client raises the same class.

- the **server daemon** sends :data:`SITE_CHANNEL` requests ``{"op": OP, ...}`` to site daemons:
  ``deploy`` (``job_id``, ``signed``: the submit command as the admin signed it, ``archive``),
  ``start`` (``job_id``), ``stop`` (``job_id``), ``status``, ``logs`` (``job_id``, ``offset``).
  A site verifies the submit command itself (its own CA and replay guard), so the server cannot
  run a job at a site that no admin signed.

- the server daemon sends a requested download with ``Cell.send_file`` on
  :data:`DOWNLOAD_CHANNEL` to the requesting admin cell, then replies.

Archives (a job folder as tar.gz, at most :data:`MAX_ARCHIVE_BYTES`) travel as a one-dimensional
``uint8`` array (:func:`archive_payload`), not as ``bytes``: the codec keeps ``bytes`` inside the
payload tree (capped at 16 MiB), while an array is a raw buffer frame the cell streams with bounded
memory. :func:`archive_bytes` accepts either form back.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Final, Literal, get_args

import numpy as np

from fedcell import errors
from fedcell.errors import FedcellError, OversizedError, ProtocolError, RemoteError
from fedcell.transports.codec import wire_type

__all__ = [
    "ADMIN_CHANNEL",
    "ADMIN_COMMANDS",
    "DOWNLOAD_CHANNEL",
    "ENDED_STATES",
    "JOB_STATES",
    "MAX_ARCHIVE_BYTES",
    "MAX_LOG_CHUNK_BYTES",
    "SITE_CHANNEL",
    "SITE_OPS",
    "AdminCommand",
    "JobInfo",
    "JobState",
    "LogChunk",
    "SiteOp",
    "SiteStatus",
    "archive_bytes",
    "archive_payload",
    "local_error",
    "remote_reason",
]

#: Admin client → server daemon.
ADMIN_CHANNEL: Final = "fc.admin"
#: Server daemon → site daemon.
SITE_CHANNEL: Final = "fc.site"
#: Server daemon → admin client: the tar.gz of a download.
DOWNLOAD_CHANNEL: Final = "fc.download"

AdminCommand = Literal["submit", "list", "status", "abort", "download", "logs", "sites"]
ADMIN_COMMANDS: Final[tuple[str, ...]] = get_args(AdminCommand)

SiteOp = Literal["deploy", "start", "stop", "status", "logs"]
SITE_OPS: Final[tuple[str, ...]] = get_args(SiteOp)

#: ``deploying`` while the sites are asked, ``running`` once the job process runs, then one of
#: the ended states; ``refused`` when a site (or the server) refused the submission.
JobState = Literal["deploying", "running", "finished", "failed", "crashed", "aborted", "refused"]
JOB_STATES: Final[tuple[str, ...]] = get_args(JobState)
ENDED_STATES: Final = frozenset({"finished", "failed", "crashed", "aborted", "refused"})

#: Largest job archive a server or site accepts.
MAX_ARCHIVE_BYTES: Final = 256 * 1024 * 1024
#: Largest piece of a log sent in one ``logs`` reply.
MAX_LOG_CHUNK_BYTES: Final = 1024 * 1024


@wire_type("fedcell.deploy.JobInfo")
@dataclass(frozen=True, slots=True)
class JobInfo:
    """One job as the server daemon records it (also the record on disk).

    Attributes
    ----------
    job_id:
        The server-assigned id (10 hex digits).
    name:
        The job's name, from its config.
    state:
        One of :data:`JOB_STATES`.
    submitter:
        The admin who submitted it.
    submitted_at, started_at, ended_at:
        Seconds since the epoch; ``started_at`` once the job process runs, ``ended_at`` once
        the job ended (``None`` before).
    sites:
        Site → its state in this job (``deploying``, ``deployed``, ``refused``, ``running``,
        ``lost``, or the job's ended state).
    message:
        Why the job failed, crashed, was aborted or refused (empty otherwise).
    progress:
        The job process's last ``progress.json`` (``node``, ``step``, ``total``, ``metrics``,
        ``time``); ``{}`` before the first report.
    """

    job_id: str
    name: str
    state: str
    submitter: str
    submitted_at: float
    started_at: float | None = None
    ended_at: float | None = None
    sites: dict[str, str] = field(default_factory=dict)
    message: str = ""
    progress: dict[str, Any] = field(default_factory=dict)

    @property
    def ended(self) -> bool:
        """Whether the job reached an ended state."""
        return self.state in ENDED_STATES

    def to_json(self) -> dict[str, Any]:
        """The record as JSON data (what ``record.json`` holds)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, raw: object) -> JobInfo:
        """Rebuild a record written by :meth:`to_json`.

        Raises
        ------
        ProtocolError
            If ``raw`` is not such a record.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(raw, dict) or not {"job_id", "name", "state"} <= set(raw) <= names:
            raise ProtocolError(f"not a job record: {raw!r:.200}")
        try:
            info = cls(**raw)
        except TypeError as exc:
            raise ProtocolError(f"not a job record: {exc}") from exc
        if info.state not in JOB_STATES or not isinstance(info.sites, dict):
            raise ProtocolError(f"job record {info.job_id!r} has state {info.state!r}")
        return info


@wire_type("fedcell.deploy.LogChunk")
@dataclass(frozen=True, slots=True)
class LogChunk:
    """A piece of a log: ``text`` read from byte ``offset`` on; ``offset`` is where to go on.

    ``done`` is true once the job ended and the whole log was read: a follower stops polling.
    """

    text: str
    offset: int
    done: bool


@wire_type("fedcell.deploy.SiteStatus")
@dataclass(frozen=True, slots=True)
class SiteStatus:
    """A site connected to the server: since when, and the running jobs it takes part in."""

    name: str
    connected_since: float
    jobs: list[str] = field(default_factory=list)


def archive_payload(archive: bytes) -> np.ndarray[Any, np.dtype[np.uint8]]:
    """``archive`` as the ``uint8`` array it travels as (no copy)."""
    return np.frombuffer(archive, dtype=np.uint8)


def archive_bytes(value: object) -> bytes:
    """The archive bytes of a received payload field (a ``uint8`` array or ``bytes``).

    Raises
    ------
    ProtocolError
        If ``value`` is neither.
    OversizedError
        If it holds more than :data:`MAX_ARCHIVE_BYTES`.
    """
    if isinstance(value, np.ndarray) and value.dtype == np.uint8 and value.ndim == 1:
        size = value.nbytes
    elif isinstance(value, bytes):
        size = len(value)
    else:
        raise ProtocolError(f"a job archive must be bytes or a uint8 array, not {type(value)}")
    if size > MAX_ARCHIVE_BYTES:
        raise OversizedError(
            f"the job archive is {size} bytes, above the {MAX_ARCHIVE_BYTES >> 20} MiB limit"
        )
    return value.tobytes() if isinstance(value, np.ndarray) else value


def remote_reason(error: RemoteError) -> str:
    """What the remote handler said, without the cell's ``handler for channel ... raised T:``
    prefix (the text a person reads)."""
    text = str(error)
    marker = f" raised {error.remote_type}: "
    return text.split(marker, 1)[1] if marker in text else text


def local_error(error: RemoteError) -> FedcellError:
    """The :mod:`fedcell.errors` class the remote handler raised, rebuilt with its message
    (``PolicyError``, ``JobError``, ``AuthenticationError`` ...); ``error`` itself for any
    other type."""
    cls = getattr(errors, error.remote_type, None)
    if not (isinstance(cls, type) and issubclass(cls, FedcellError)) or issubclass(
        cls, RemoteError
    ):
        return error
    try:
        rebuilt = cls(remote_reason(error))
    except TypeError:
        return error
    return rebuilt
