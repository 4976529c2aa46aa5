"""The site daemon: a site's long-running process in a deployment, and the jobs it runs.

``python -m fedcell.deploy.participant SITE_KIT`` (what the site kit's ``start.sh`` runs) starts
:class:`SiteDaemon`: the cell ``site-1`` connected to the server with the site's kit, answering the
server daemon's requests on :data:`~fedcell.deploy.protocol.SITE_CHANNEL` (``{"op": ..., ...}``).
The daemon never imports job code; each job runs in a process of its own (``python -m
fedcell.deploy.job_launch site``, cell ``site-1.job-<id>``), spawned only after the site decided,
by its own rules, to run it.

Operations
----------
``deploy`` (``job_id``, ``signed``, ``archive``)
    The site trusts neither the server nor the archive. It verifies the admin's signed submit
    command itself (:func:`~fedcell.deploy.commands.verify_command` against the site kit's CA,
    with the daemon's own :class:`~fedcell.deploy.commands.ReplayGuard`), checks that the signed
    ``archive_sha256`` is the archive's and, when the admin chose sites, that this site is one of
    them. It unpacks the archive safely (:func:`~fedcell.deploy.job_archive.unpack_job`) into
    ``jobs/<id>/job/``, reads the job's :class:`~fedcell.engine.policy.JobMeta` from its config
    without importing anything (:func:`~fedcell.deploy.job_archive.job_meta`), and asks the site
    policy (:meth:`~fedcell.engine.policy.SitePolicy.check_submission`) with the submitter the
    verified certificate names (name, role, organization; authenticated), so ``submit.roles``,
    ``names`` and ``organizations`` all rest on what the project CA signed, and the number of jobs
    deployed or running here. A refusal is a :class:`~fedcell.errors.PolicyError` naming the site, the job and
    the rule; its message is what the submitter reads. A refused or unreadable job leaves nothing
    on disk. Reply ``{"accepted": True}``.
``start`` (``job_id``)
    Spawns the job process in its own process group (stdout and stderr → ``jobs/<id>/site.log``),
    with the address-space limit of the policy's :meth:`~fedcell.engine.policy.SitePolicy.job_limits`
    (``RLIMIT_AS``, set in the child before it executes Python) and a wall-time watch: past the
    limit the process is stopped and the job's state is ``killed: wall time``. Reply ``{"pid"}``.
``stop`` (``job_id``)
    SIGTERM to the job's process group, :data:`STOP_GRACE` seconds, then SIGKILL; a deployed job
    that never started is discarded (its folder removed). Reply ``{"state"}``.
``status``
    ``{"jobs": {id: {"state", "pid", "returncode"}}}``; states: ``deployed``, ``running``,
    ``finished`` (exit 0), ``failed`` (``failed: exit status N``), ``stopped``,
    ``killed: wall time``, ``discarded``.
``logs`` (``job_id``, ``offset``)
    ``{"text", "offset", "done"}``: at most :data:`~fedcell.deploy.protocol.MAX_LOG_CHUNK_BYTES`
    of ``site.log`` from ``offset`` (cut at a character boundary); ``done`` once the job process
    ended and everything was read.

Anything malformed or unknown (a missing field, an unknown op or job) is answered with a
:mod:`fedcell.errors` error naming the problem, and the daemon keeps serving.

Policy
------
The policy file is ``policy`` when given (``--policy``), else the first of
``<kit>/policy.yml|yaml|json|toml`` (``fedcell provision`` writes a default ``policy.yml``). It is
read at every ``deploy``, so an edit takes effect without a restart; a policy that is missing or
does not load refuses every job with a message saying where the policy is expected (or why it
does not load): a site never runs jobs by default. A file that does not name its site gets the
kit's name, so refusals always name the site.

Workspace (default ``<kit>/workspace``): ``jobs/<id>/job/`` (the unpacked folder) and
``jobs/<id>/site.log``. Stopping the daemon stops its job processes.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import dataclasses
import hashlib
import logging
import os
import re
import resource
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Final

from fedcell.deploy.commands import ReplayGuard, SignedCommand, verify_command
from fedcell.deploy.job_archive import job_meta, unpack_job
from fedcell.deploy.job_launch import site_job_command
from fedcell.deploy.kit import StartupKit
from fedcell.deploy.protocol import MAX_LOG_CHUNK_BYTES, SITE_CHANNEL, archive_bytes
from fedcell.engine.policy import JobLimits, SitePolicy, Submitter
from fedcell.errors import (
    AuthenticationError,
    ConfigError,
    JobError,
    PolicyError,
    ProtocolError,
)
from fedcell.transports.cell import CellConfig
from fedcell.transports.message import Message

__all__ = ["POLICY_NAMES", "STOP_GRACE", "SiteDaemon"]

logger = logging.getLogger(__name__)

#: Where a site kit's policy file is looked for, in this order.
POLICY_NAMES: Final = ("policy.yml", "policy.yaml", "policy.json", "policy.toml")
#: Seconds between SIGTERM and SIGKILL when a job process is stopped.
STOP_GRACE: Final = 10.0
#: How often the daemon looks whether a job process ended.
_POLL_INTERVAL: Final = 0.2
_JOB_ID: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")
_ACTIVE: Final = frozenset({"deployed", "running"})


@dataclass(eq=False)
class _SiteJob:
    """One job at this site: its folder, limits, and the process once started."""

    job_id: str
    name: str
    folder: Path
    limits: JobLimits
    state: str = "deployed"
    process: subprocess.Popen[bytes] | None = None
    log: IO[bytes] | None = None
    watcher: asyncio.Task[None] | None = None
    stopping: str | None = None  # the state to record once the process is gone
    kill_at: float | None = None  # when SIGKILL follows the SIGTERM sent to stop it

    @property
    def job_dir(self) -> Path:
        return self.folder / "job"

    @property
    def log_path(self) -> Path:
        return self.folder / "site.log"

    @property
    def active(self) -> bool:
        return self.state in _ACTIVE


class SiteDaemon:
    """A site's daemon: serves the server daemon's ``fc.site`` requests (see the module docstring).

    Parameters
    ----------
    kit:
        The site's startup kit (loaded and verified).
    workspace:
        Where jobs are unpacked and logged (``jobs/<id>/``).
    policy:
        The site policy file (default: ``<kit>/policy.yml|yaml|json|toml``).
    config:
        Cell tunables (timeouts, heartbeats); the kit adds the transport security.

    Raises
    ------
    ConfigError
        If ``kit`` is not a site's.
    """

    def __init__(
        self,
        kit: StartupKit,
        workspace: Path,
        policy: Path | None = None,
        *,
        config: CellConfig | None = None,
    ) -> None:
        if kit.role != "site":
            raise ConfigError(f"{kit.name!r} is a {kit.role}: a site daemon needs a site's kit")
        self.kit = kit
        self.workspace = Path(workspace).resolve()
        self._policy_path = policy
        self._config = config
        self._guard = ReplayGuard()
        self._jobs: dict[str, _SiteJob] = {}
        self._deploying = asyncio.Lock()
        self._handlers: dict[str, Callable[[Mapping[str, Any]], Any]] = {
            "deploy": self._deploy,
            "start": self._start,
            "stop": self._stop,
            "status": self._status,
            "logs": self._logs,
        }
        #: Set once the daemon's cell is connected to the server.
        self.ready = asyncio.Event()

    async def run(self, stop: asyncio.Event) -> None:
        """Connect to the server and serve until ``stop`` is set; then stop every job process.

        Raises
        ------
        ConnectError
            If the server does not answer the handshake.
        CellError
            If the server refuses this site.
        """
        cell = self.kit.cell(config=self._config)
        cell.register(SITE_CHANNEL, self._on_request)
        try:
            await cell.start()
            logger.info("site daemon %s is up, linked to %s", self.kit.name, cell.parent)
            self.ready.set()
            await stop.wait()
        finally:
            self.ready.clear()
            await asyncio.gather(*(self._terminate(job, "stopped") for job in self._jobs.values()))
            await cell.stop()

    # ------------------------------------------------------------------------------------------
    # requests

    async def _on_request(self, message: Message) -> Any:
        payload = message.payload
        if not isinstance(payload, dict) or not isinstance(payload.get("op"), str):
            raise ProtocolError(f"a site request must be a mapping with an 'op', not {payload!r:.100}")
        handler = self._handlers.get(payload["op"])
        if handler is None:
            raise ProtocolError(
                f"unknown site op {payload['op']!r} (known: {', '.join(self._handlers)})"
            )
        return await handler(payload)

    async def _deploy(self, request: Mapping[str, Any]) -> dict[str, Any]:
        job_id = _job_id(request)
        signed = request.get("signed")
        if not isinstance(signed, SignedCommand):
            raise ProtocolError(f"deploy of job {job_id}: 'signed' is not a signed command")
        archive = archive_bytes(request.get("archive"))
        command = verify_command(self.kit.ca_certificate, signed, replay_guard=self._guard)
        args = _submit_args(command.payload, job_id)
        # Hashing and unpacking up to 256 MiB run on a thread: the loop keeps the heartbeats.
        digest = await asyncio.to_thread(lambda: hashlib.sha256(archive).hexdigest())
        if digest != args["archive_sha256"]:
            raise AuthenticationError(
                f"deploy of job {job_id}: the archive's sha256 is {digest}, the admin "
                f"{command.admin!r} signed {args['archive_sha256']}: the archive was altered"
            )
        chosen = args.get("sites")
        if isinstance(chosen, list) and self.kit.name not in chosen:
            raise PolicyError(
                f"{self.kit.name} refuses job {job_id}: the submitter {command.admin!r} chose "
                f"the sites {chosen}, not this one"
            )
        submitter = Submitter(
            command.admin,
            frozenset({command.role}),
            organization=command.organization,
            authenticated=True,
        )
        async with self._deploying:  # one at a time: each counts the jobs admitted before it
            if job_id in self._jobs:
                raise JobError(f"job {job_id} is already deployed at {self.kit.name}")
            folder = self.workspace / "jobs" / job_id
            if folder.exists():
                raise JobError(f"job {job_id}: {folder} exists already at {self.kit.name}")
            running = sum(job.active for job in self._jobs.values())
            job = await asyncio.to_thread(self._admit, archive, folder, submitter, running)
            self._jobs[job_id] = job
        logger.info("job %s (%s) of %s deployed", job_id, job.name, command.admin)
        return {"accepted": True}

    def _admit(self, archive: bytes, folder: Path, submitter: Submitter, running: int) -> _SiteJob:
        """Unpack, read the job's metadata, ask the policy (on a thread); nothing left if refused."""
        try:
            unpack_job(archive, folder / "job")
            meta = job_meta(folder / "job")
            policy = self._policy()
            policy.check_submission(submitter, meta, running_jobs=running)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return _SiteJob(folder.name, meta.name, folder, policy.job_limits(meta))

    async def _start(self, request: Mapping[str, Any]) -> dict[str, Any]:
        job = self._job(request)
        if job.state != "deployed":
            raise JobError(f"job {job.job_id} at {self.kit.name} is {job.state}, not deployed")
        memory = job.limits.memory
        job.log = job.log_path.open("ab")
        try:
            job.process = subprocess.Popen(
                site_job_command(self.kit.folder, job.job_dir, job.job_id),
                stdout=job.log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own process group: stop reaches its children too
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
                preexec_fn=None if memory is None else _address_space_limit(memory),
            )
        except OSError as exc:
            job.log.close()
            job.log = None
            raise JobError(f"job {job.job_id}: cannot start its process: {exc}") from exc
        job.state = "running"
        job.watcher = asyncio.ensure_future(self._watch(job))
        logger.info("job %s started (pid %d, limits %s)", job.job_id, job.process.pid, job.limits)
        return {"pid": job.process.pid}

    async def _stop(self, request: Mapping[str, Any]) -> dict[str, Any]:
        job = self._job(request)
        if job.process is not None:
            await self._terminate(job, "stopped")
        elif job.state == "deployed":
            shutil.rmtree(job.folder, ignore_errors=True)
            job.state = "discarded"
        return {"state": job.state}

    async def _status(self, request: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "jobs": {
                job.job_id: {
                    "state": job.state,
                    "pid": None if job.process is None else job.process.pid,
                    "returncode": None if job.process is None else job.process.returncode,
                }
                for job in self._jobs.values()
            }
        }

    async def _logs(self, request: Mapping[str, Any]) -> dict[str, Any]:
        job = self._job(request)
        offset = request.get("offset", 0)
        if type(offset) is not int or offset < 0:
            raise ProtocolError(f"logs of job {job.job_id}: offset must be an int >= 0")
        ended = not job.active  # before reading: what the process wrote last is in the read
        data, size = await asyncio.to_thread(_read_log, job.log_path, offset)
        at_end = offset + len(data) >= size
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        # a character cut at the chunk's end is left for the next call (unless nothing follows)
        text = decoder.decode(data, final=ended and at_end)
        end = offset + len(data) - len(decoder.getstate()[0])
        return {"text": text, "offset": end, "done": ended and end >= size}

    # ------------------------------------------------------------------------------------------
    # job processes

    def _job(self, request: Mapping[str, Any]) -> _SiteJob:
        job_id = _job_id(request)
        job = self._jobs.get(job_id)
        if job is None:
            raise JobError(f"no job {job_id} at {self.kit.name}")
        return job

    def _policy(self) -> SitePolicy:
        """The site policy, read now (refusing with a PolicyError when there is none usable)."""
        path = self._policy_path
        if path is None:
            found = [self.kit.folder / name for name in POLICY_NAMES]
            path = next((p for p in found if p.is_file()), None)
            if path is None:
                raise PolicyError(
                    f"{self.kit.name} refuses every job: it has no site policy (expected "
                    f"{self.kit.folder / POLICY_NAMES[0]}, or .yaml/.json/.toml, or --policy)"
                )
        try:
            policy = SitePolicy.load(path)
        except ConfigError as exc:
            raise PolicyError(f"{self.kit.name} refuses every job: {exc}") from exc
        if policy.site == SitePolicy().site:  # the file does not name its site: use the kit's
            policy = dataclasses.replace(policy, site=self.kit.name)
        return policy

    async def _watch(self, job: _SiteJob) -> None:
        """Wait for the job process to end, stopping it at its wall time and escalating a stop to
        SIGKILL after :data:`STOP_GRACE`; record its state."""
        process = job.process
        assert process is not None
        wall_time = job.limits.wall_time
        deadline = None if wall_time is None else time.monotonic() + wall_time
        while process.poll() is None:
            now = time.monotonic()
            if deadline is not None and now > deadline and job.stopping is None:
                logger.warning("job %s ran past its wall time (%g s)", job.job_id, wall_time)
                _request_stop(job, "killed: wall time")
            if job.kill_at is not None and now > job.kill_at:
                logger.warning("job %s did not stop within %g s: killing it", job.job_id,
                               STOP_GRACE)  # fmt: skip
                _signal_group(process, signal.SIGKILL)
                job.kill_at = None
            await asyncio.sleep(_POLL_INTERVAL)
        _signal_group(process, signal.SIGKILL)  # whatever the job left behind in its group
        if job.log is not None:
            job.log.close()
            job.log = None
        code = process.returncode
        job.state = job.stopping or ("finished" if code == 0 else f"failed: exit status {code}")
        logger.info("job %s %s", job.job_id, job.state)

    async def _terminate(self, job: _SiteJob, state: str) -> None:
        """Stop the job's process (SIGTERM, SIGKILL after :data:`STOP_GRACE`) and wait until its
        watcher recorded ``state`` (or how it ended, if it ended by itself first)."""
        if job.process is None or job.watcher is None:
            return
        if job.process.poll() is None:
            _request_stop(job, state)
        await asyncio.shield(job.watcher)


def _request_stop(job: _SiteJob, state: str) -> None:
    if job.stopping is None and job.process is not None:
        job.stopping = state
        job.kill_at = time.monotonic() + STOP_GRACE
        _signal_group(job.process, signal.SIGTERM)


def _job_id(request: Mapping[str, Any]) -> str:
    job_id = request.get("job_id")
    if not isinstance(job_id, str) or not _JOB_ID.fullmatch(job_id):
        raise ProtocolError(f"a job id must be 1-64 letters, digits, '_' or '-', not {job_id!r}")
    return job_id


def _submit_args(payload: Any, job_id: str) -> Mapping[str, Any]:
    """The arguments of a signed submit command (its body's shape is checked here)."""
    if not (isinstance(payload, dict) and payload.get("command") == "submit"):
        raise AuthenticationError(f"deploy of job {job_id}: the signed command is not a submit")
    args = payload.get("args")
    if not (isinstance(args, dict) and isinstance(args.get("archive_sha256"), str)):
        raise AuthenticationError(f"deploy of job {job_id}: the signed submit names no archive")
    return args


def _read_log(path: Path, offset: int) -> tuple[bytes, int]:
    """At most MAX_LOG_CHUNK_BYTES of ``path`` from ``offset``, and the file's size."""
    try:
        with path.open("rb") as log:
            size = os.fstat(log.fileno()).st_size
            log.seek(offset)
            return log.read(MAX_LOG_CHUNK_BYTES), size
    except FileNotFoundError:
        return b"", 0


def _address_space_limit(limit: int) -> Callable[[], None]:
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    return apply


def _signal_group(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, sig)
