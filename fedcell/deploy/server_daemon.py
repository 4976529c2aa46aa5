"""The server daemon: the long-running server of a deployment, which runs jobs for admins.

``python -m fedcell.deploy.participant SERVER_KIT`` runs ``ServerDaemon(kit, workspace).run(stop)``.
The daemon is the cell ``server`` (the kit's name), listening on the project's address; site
daemons, admin clients and job processes all connect to it, and it relays between them.

Commands
--------
Admins send signed commands on :data:`~fedcell.deploy.protocol.ADMIN_CHANNEL` (the table is in
:mod:`fedcell.deploy.protocol`). Each is verified first with
:func:`~fedcell.deploy.commands.verify_command` against the project CA, the server's trust folder
(an admin removed from the project is refused at once) and one
:class:`~fedcell.deploy.commands.ReplayGuard`; the cell that sent it must be the signing admin or
one of its sub-cells, so a site holding a copy of a command cannot play it back as its own. A
command that does not verify is answered with ``AuthenticationError``; like every other bad
request it fails alone (each request runs in its own task) and the daemon keeps serving.

Job lifecycle
-------------
::

    submit ──▶ deploying ──▶ running ──▶ finished | failed | crashed | aborted
                   │
                   └──▶ refused   (a site refused, or is not connected)

``submit``: the archive (≤ 256 MiB) must have the sha256 the admin signed; it is unpacked
safely into ``jobs/<id>/job/`` and its config read without importing anything
(:mod:`fedcell.deploy.job_archive`). The sites are the command's ``sites``, else those the
job's executors name, else every connected site. Every site gets ``deploy`` at once (each site
verifies the admin's signature and applies its own policy); if any refuses, the sites that
accepted are told to ``stop`` (discard), the record says ``refused`` with every site's reason,
and the submitter gets a ``PolicyError`` listing them. Otherwise the daemon spawns the job
process (``python -m fedcell.deploy.job_launch server --kit <server kit> ...``, see
:mod:`fedcell.deploy.job_launch`) in its own process group, output to ``server.log``, sends
``start`` to every site and replies ``running``.

A watcher task per job waits for the job process to exit and records the end state: the
``state`` and ``reason`` of ``results/result.json``, else from the exit status (2: the job could
not run, ``failed`` with the log's last lines; a signal or another status: ``crashed``). Then
every site is told to ``stop`` (a no-op where the site job already ended).

``abort`` sends SIGTERM (the job process aborts the run, tells the sites, writes its results),
waits up to ``abort_grace`` (15 s) and then kills the process group; the reply comes once the
process is gone and the record says ``aborted``. A site daemon that disconnects is recorded as
``lost`` in every running job it takes part in; the job process sees its site job cell go too
and decides (k-of-n or ``crashed``) by itself, so the daemon never kills a job for it.

Stopping the daemon aborts every running job first. A restarted daemon reads the records back
(:class:`~fedcell.deploy.job_store.JobStore`); a job that was deploying or running when the
daemon died is recorded ``crashed`` ("server restarted") and its job process, if it outlived the
daemon, is killed: nothing would watch or abort it any more.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import secrets
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, NoReturn

import psutil

from fedcell.deploy.certificates import load_certificate, verify_participant
from fedcell.deploy.commands import ReplayGuard, SignedCommand, VerifiedCommand, verify_command
from fedcell.deploy.job_archive import pack_paths, read_job_config, unpack_job
from fedcell.deploy.job_store import JobPaths, JobStore, read_log_chunk, read_progress
from fedcell.deploy.kit import TRUSTED_DIR, StartupKit, TrustedParticipants
from fedcell.deploy.protocol import (
    ADMIN_CHANNEL,
    ADMIN_COMMANDS,
    DOWNLOAD_CHANNEL,
    ENDED_STATES,
    SITE_CHANNEL,
    JobInfo,
    LogChunk,
    SiteStatus,
    archive_bytes,
    archive_payload,
    remote_reason,
)
from fedcell.errors import (
    AuthenticationError,
    ConfigError,
    FedcellError,
    JobError,
    PolicyError,
    ProtocolError,
    RemoteError,
)
from fedcell.transports.cell import Cell, CellConfig, PeerEvent
from fedcell.transports.message import Message

__all__ = ["JOB_PROCESS_COMMAND", "ServerDaemon"]

logger = logging.getLogger(__name__)

#: How the daemon starts a job process; it appends ``--kit --job-dir --workspace --job-id --sites``.
JOB_PROCESS_COMMAND: Final = (sys.executable, "-m", "fedcell.deploy.job_launch", "server")
#: Lines of ``server.log`` quoted in the message of a job that could not run.
LOG_TAIL_LINES: Final = 12


@dataclass(frozen=True, slots=True)
class _AdminRequest:
    """A verified admin command: who, what, and from which cell."""

    command: VerifiedCommand
    signed: SignedCommand
    args: Mapping[str, Any]
    data: Any
    sender: str


Handler = Callable[[_AdminRequest], Awaitable[Any]]


@dataclass(eq=False)
class _RunningJob:
    """A job whose process runs: what the watcher and an abort share."""

    process: asyncio.subprocess.Process
    sites: tuple[str, ...]
    watcher: asyncio.Task[None] | None = None
    #: Set by an abort (or a failed start): the state and message the job ends with unless
    #: it finished anyway.
    forced_end: tuple[str, str] | None = None


class ServerDaemon:
    """The server of a deployment: admin commands in, job processes out.

    Parameters
    ----------
    kit:
        The server's startup kit.
    workspace:
        Where jobs live (``jobs/<id>/``; see :mod:`fedcell.deploy.job_store`).
    config:
        Cell tunables (heartbeats, peer timeout); the kit adds the transport security.
    job_command:
        The command that runs a job process (the daemon appends its arguments).
    site_timeout:
        Seconds to wait for a site daemon's answer to one request.
    abort_grace:
        Seconds a job process gets to abort cleanly after SIGTERM before it is killed.
    """

    def __init__(
        self,
        kit: StartupKit,
        workspace: Path,
        *,
        config: CellConfig | None = None,
        job_command: Sequence[str] = JOB_PROCESS_COMMAND,
        site_timeout: float = 60.0,
        abort_grace: float = 15.0,
    ) -> None:
        if kit.role != "server":
            raise ConfigError(f"{kit.name!r} is a {kit.role}: a server daemon needs the server kit")
        self.kit = kit
        self.workspace = Path(workspace).resolve()
        self.store = JobStore(self.workspace / "jobs")
        self._config = config
        self._job_command = tuple(job_command)
        self._site_timeout = site_timeout
        self._abort_grace = abort_grace
        self._trusted = TrustedParticipants(kit.ca_certificate, kit.folder / TRUSTED_DIR)
        self._replay_guard = ReplayGuard()
        self._sites: dict[str, float] = {}  # connected site → since when
        self._running: dict[str, _RunningJob] = {}
        self._stopping = False
        self._cell: Cell | None = None
        #: Set once the daemon listens (and cleared when it stopped).
        self.ready = asyncio.Event()
        self._handlers: dict[str, Handler] = {
            "submit": self._submit,
            "list": self._list,
            "status": self._status,
            "abort": self._abort,
            "download": self._download,
            "logs": self._logs,
            "sites": self._site_list,
        }
        assert set(self._handlers) == set(ADMIN_COMMANDS)

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set, then abort every running job and close.

        Raises
        ------
        ConnectError
            If the listen address cannot be bound.
        """
        self._recover()
        cell = self.kit.cell(config=self._config)
        cell.register(ADMIN_CHANNEL, self._on_admin)
        cell.add_peer_listener(self._on_peer)
        await cell.start()
        self._cell = cell
        logger.info(
            "server daemon %s listening on %s, jobs in %s", cell.name, cell.url, self.store.root
        )
        self.ready.set()
        try:
            await stop.wait()
        finally:
            self.ready.clear()
            self._stopping = True
            try:
                while self._running:  # a submission may have spawned one meanwhile
                    await asyncio.gather(
                        *(
                            self._abort_job(job_id, "the server daemon stopped")
                            for job_id in list(self._running)
                        )
                    )
            finally:
                await cell.stop()
                self._cell = None

    # ------------------------------------------------------------------------------------------
    # commands

    async def _on_admin(self, message: Message) -> Any:
        payload = message.payload
        if not isinstance(payload, dict) or not isinstance(payload.get("signed"), SignedCommand):
            raise ProtocolError("an admin request must be {'signed': SignedCommand, 'data': ...}")
        verified = verify_command(
            self.kit.ca_certificate,
            payload["signed"],
            replay_guard=self._replay_guard,
            trusted=self._trusted,
        )
        sender = message.envelope.sender
        if sender != verified.admin and not sender.startswith(verified.admin + "."):
            raise AuthenticationError(
                f"{sender!r} sent a command signed by {verified.admin!r}: only the admin's own "
                "cells may send its commands"
            )
        body = verified.payload
        name = body.get("command") if isinstance(body, dict) else None
        args = body.get("args") if isinstance(body, dict) else None
        if name not in self._handlers or not isinstance(args, dict):
            raise ProtocolError(
                f"a signed command must be {{'command': one of {list(ADMIN_COMMANDS)}, "
                f"'args': {{...}}}}, got {body!r:.200}"
            )
        logger.info("%s: %s %s", verified.admin, name, _brief(args))
        request = _AdminRequest(verified, payload["signed"], args, payload.get("data"), sender)
        return await self._handlers[name](request)

    async def _submit(self, request: _AdminRequest) -> JobInfo:
        signed_sha256, requested = request.args.get("archive_sha256"), request.args.get("sites")
        if not isinstance(signed_sha256, str):
            raise ProtocolError("submit needs archive_sha256 (hex)")
        if requested is not None and not (
            isinstance(requested, list) and requested and all(isinstance(s, str) for s in requested)
        ):
            raise ConfigError(f"submit: sites must be a non-empty list of names, got {requested!r}")
        archive = archive_bytes(request.data)
        if hashlib.sha256(archive).hexdigest() != signed_sha256:
            raise AuthenticationError(
                "the job archive does not have the sha256 the admin signed: it was altered"
            )
        job_id = self.store.new_id()
        paths = self.store.paths(job_id)
        try:
            await asyncio.to_thread(unpack_job, archive, paths.job_dir)
            config = await asyncio.to_thread(read_job_config, paths.job_dir)
        except BaseException:
            self.store.discard(job_id)
            raise
        sites = list(dict.fromkeys(requested or _config_sites(config) or sorted(self._sites)))
        name = str(config["job"]["name"])
        if not sites:
            self.store.discard(job_id)
            raise ConfigError(f"job {name!r} has no site to run at: no site is connected")
        info = JobInfo(
            job_id,
            name,
            "deploying",
            request.command.admin,
            time.time(),
            sites=dict.fromkeys(sites, "deploying"),
        )
        self.store.save(info)
        refusals = await self._deploy(info, sites, config, request.signed, archive)
        if refusals:
            await self._refuse(info, refusals)
        return await self._launch(info, paths)

    async def _deploy(
        self,
        info: JobInfo,
        sites: Sequence[str],
        config: Mapping[str, Any],
        signed: SignedCommand,
        archive: bytes,
    ) -> dict[str, str]:
        """Ask every site to take the job; return the refusals, site → reason."""
        refusals: dict[str, str] = {}
        min_sites = config["job"].get("min_sites", 1)
        if isinstance(min_sites, int) and len(sites) < min_sites:
            refusals["server"] = f"the job needs at least {min_sites} sites, it was given {sites}"
        for site in sites:
            if site not in self._sites:
                refusals[site] = "not connected to the server"
        reachable = [s for s in sites if s in self._sites]
        deploy = {
            "op": "deploy",
            "job_id": info.job_id,
            "signed": signed,
            "archive": archive_payload(archive),
        }
        replies = await self._ask_sites(reachable, deploy)
        for site, reply in replies.items():
            if isinstance(reply, BaseException):
                refusals[site] = _reason(reply)
            elif not (isinstance(reply, dict) and reply.get("accepted") is True):
                refusals[site] = f"unexpected answer to deploy: {reply!r:.200}"
        return refusals

    async def _refuse(self, info: JobInfo, refusals: Mapping[str, str]) -> NoReturn:
        accepted = [s for s in info.sites if s not in refusals]
        await self._ask_sites(accepted, {"op": "stop", "job_id": info.job_id})
        sites = {s: ("refused" if s in refusals else "discarded") for s in info.sites}
        message = "; ".join(f"{site}: {reason}" for site, reason in refusals.items())
        self.store.save(
            dataclasses.replace(
                info, state="refused", ended_at=time.time(), sites=sites, message=message
            )
        )
        logger.info("job %s refused: %s", info.job_id, message)
        raise PolicyError(f"job {info.job_id} ({info.name}) was refused: {message}")

    async def _launch(self, info: JobInfo, paths: JobPaths) -> JobInfo:
        sites = tuple(info.sites)
        if self._stopping:
            await self._ask_sites(sites, {"op": "stop", "job_id": info.job_id})
            self.store.save(dataclasses.replace(
                info, state="aborted", ended_at=time.time(),
                message="the server daemon stopped", sites=dict.fromkeys(sites, "aborted"),
            ))  # fmt: skip
            raise JobError(f"job {info.job_id} ({info.name}): the server daemon is stopping")
        paths.results.mkdir(parents=True, exist_ok=True)
        command = [
            *self._job_command,
            "--kit",
            str(self.kit.folder.resolve()),
            "--job-dir",
            str(paths.job_dir),
            "--workspace",
            str(paths.results),
            "--job-id",
            info.job_id,
            "--sites",
            ",".join(sites),
        ]
        try:
            with paths.server_log.open("ab") as log:
                process = await asyncio.create_subprocess_exec(
                    *command,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=log,
                    stderr=asyncio.subprocess.STDOUT,
                    start_new_session=True,
                )
        except OSError as exc:
            await self._ask_sites(sites, {"op": "stop", "job_id": info.job_id})
            message = f"the job process could not be started: {exc}"
            self.store.save(dataclasses.replace(
                info, state="failed", ended_at=time.time(), message=message,
                sites=dict.fromkeys(sites, "failed"),
            ))  # fmt: skip
            raise JobError(f"job {info.job_id} ({info.name}): {message}") from exc
        paths.pid_file.write_text(str(process.pid))
        job = _RunningJob(process, sites)
        self._running[info.job_id] = job
        info = dataclasses.replace(
            info, state="running", started_at=time.time(), sites=dict.fromkeys(sites, "running")
        )
        self.store.save(info)
        job.watcher = asyncio.create_task(self._watch(info.job_id, job))
        logger.info(
            "job %s (%s) running: pid %d, sites %s",
            info.job_id,
            info.name,
            process.pid,
            list(sites),
        )
        replies = await self._ask_sites(sites, {"op": "start", "job_id": info.job_id})
        failed = {s: _reason(r) for s, r in replies.items() if isinstance(r, BaseException)}
        if failed:
            message = "; ".join(f"{site} could not start it: {why}" for site, why in failed.items())
            await self._abort_job(info.job_id, message, state="failed")
            raise JobError(f"job {info.job_id} ({info.name}) failed to start: {message}")
        return self.store.get(info.job_id)

    async def _list(self, request: _AdminRequest) -> list[JobInfo]:
        return [self._current(info) for info in self.store.all()]

    async def _status(self, request: _AdminRequest) -> JobInfo:
        return self._current(self.store.get(request.args.get("job_id")))

    async def _abort(self, request: _AdminRequest) -> JobInfo:
        info = self.store.get(request.args.get("job_id"))
        if info.job_id not in self._running:
            raise JobError(f"job {info.job_id} is {info.state}, not running: nothing to abort")
        await self._abort_job(info.job_id, f"aborted by {request.command.admin}")
        return self._current(self.store.get(info.job_id))

    async def _download(self, request: _AdminRequest) -> dict[str, Any]:
        info = self.store.get(request.args.get("job_id"))
        paths = self.store.paths(info.job_id)
        name = f"{info.job_id}-{secrets.token_hex(4)}.tar.gz"
        archive = paths.folder / name
        assert self._cell is not None
        try:
            entries = {"results": paths.results, "server.log": paths.server_log}
            await asyncio.to_thread(pack_paths, entries, archive)
            digest, size = await asyncio.to_thread(_sha256_and_size, archive)
            await self._cell.send_file(
                request.sender, archive, channel=DOWNLOAD_CHANNEL, meta={"job_id": info.job_id}
            )
        finally:
            archive.unlink(missing_ok=True)
        return {"file": name, "sha256": digest, "size": size}

    async def _logs(self, request: _AdminRequest) -> LogChunk:
        info = self.store.get(request.args.get("job_id"))
        site, offset = request.args.get("site"), request.args.get("offset", 0)
        if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
            raise ConfigError(f"logs: offset must be a byte offset >= 0, got {offset!r}")
        if site is None:
            ended = info.job_id not in self._running and info.ended  # before reading: see below
            path = self.store.paths(info.job_id).server_log
            return await asyncio.to_thread(read_log_chunk, path, offset, ended)
        if site not in info.sites:
            raise JobError(
                f"job {info.job_id} has no site {site!r} (its sites: {list(info.sites)})"
            )
        assert self._cell is not None
        reply = await self._cell.request(
            site,
            SITE_CHANNEL,
            {"op": "logs", "job_id": info.job_id, "offset": offset},
            timeout=self._site_timeout,
        )
        if not (
            isinstance(reply, dict)
            and isinstance(reply.get("text"), str)
            and isinstance(reply.get("offset"), int)
            and isinstance(reply.get("done"), bool)
        ):
            raise ProtocolError(f"{site} answered logs with {reply!r:.200}")
        return LogChunk(reply["text"], reply["offset"], reply["done"])

    async def _site_list(self, request: _AdminRequest) -> list[SiteStatus]:
        return [
            SiteStatus(
                site, since, sorted(j for j, job in self._running.items() if site in job.sites)
            )
            for site, since in sorted(self._sites.items())
        ]

    # ------------------------------------------------------------------------------------------
    # job processes

    async def _watch(self, job_id: str, job: _RunningJob) -> None:
        """Wait for the job process to exit, tell the sites, record the end state."""
        try:
            returncode = await job.process.wait()
            paths = self.store.paths(job_id)
            state, message = _outcome(paths, job_id, returncode, job.forced_end)
            try:
                await self._ask_sites(job.sites, {"op": "stop", "job_id": job_id})
            except FedcellError as exc:  # the cell is stopping: the sites' orphan timeout applies
                logger.warning("job %s: could not tell the sites to stop: %s", job_id, exc)
            info = self.store.get(job_id)
            sites = {s: ("lost" if st == "lost" else state) for s, st in info.sites.items()}
            self.store.save(dataclasses.replace(
                info, state=state, ended_at=time.time(), sites=sites, message=message,
                progress=read_progress(paths.results),
            ))  # fmt: skip
            paths.pid_file.unlink(missing_ok=True)
            logger.info("job %s %s (exit status %s) %s", job_id, state, returncode, message)
        except OSError as exc:
            logger.error("job %s ended but its record cannot be written: %s", job_id, exc)
        finally:
            self._running.pop(job_id, None)

    async def _abort_job(self, job_id: str, message: str, *, state: str = "aborted") -> None:
        """SIGTERM the job process, SIGKILL its group after the grace; return once recorded."""
        job = self._running.get(job_id)
        if job is None or job.watcher is None:
            return
        if job.forced_end is None:
            job.forced_end = (state, message)
        with contextlib.suppress(ProcessLookupError):
            job.process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.shield(job.process.wait()), self._abort_grace)
        except TimeoutError:
            logger.warning(
                "job %s: the job process ignored SIGTERM for %g s: killing it",
                job_id,
                self._abort_grace,
            )
            with contextlib.suppress(ProcessLookupError):
                os.killpg(job.process.pid, signal.SIGKILL)
        await asyncio.shield(job.watcher)

    async def _ask_sites(self, sites: Sequence[str], request: Mapping[str, Any]) -> dict[str, Any]:
        """Send ``request`` to the connected ``sites`` at once: site → reply or exception."""
        targets = [s for s in sites if s in self._sites]
        if not targets or self._cell is None:
            return {}
        replies = await self._cell.broadcast(
            targets, SITE_CHANNEL, dict(request), timeout=self._site_timeout
        )
        for site, reply in replies.items():
            if isinstance(reply, BaseException) and request["op"] == "stop":
                logger.warning("%s: stop of job %s: %s", site, request.get("job_id"), reply)
        return replies

    def _on_peer(self, name: str, event: PeerEvent) -> None:
        logger.info("%s: %s %s", self.kit.name, name, event)
        if event == "joined":
            if self._is_site(name):
                self._sites[name] = time.time()
            return
        if name not in self._sites:
            return
        self._sites.pop(name, None)
        for job_id, job in self._running.items():
            info = self.store.get(job_id)
            if name in job.sites and info.sites.get(name) == "running":
                self.store.save(dataclasses.replace(info, sites={**info.sites, name: "lost"}))

    def _is_site(self, name: str) -> bool:
        """Whether the cell ``name`` is a site daemon: a participant (no sub-cell such as a job
        process or an admin client) whose certificate in the trust folder says ``site``."""
        if "." in name:
            return False
        try:
            pem = (self.kit.folder / TRUSTED_DIR / f"{name}.pem").read_bytes()
            participant = verify_participant(load_certificate(pem, name), self.kit.ca_certificate)
        except (OSError, FedcellError):
            return False
        return participant.role == "site" and participant.name == name

    def _current(self, info: JobInfo) -> JobInfo:
        """``info`` with the job process's latest progress while it runs."""
        if info.job_id not in self._running:
            return info
        return dataclasses.replace(
            info, progress=read_progress(self.store.paths(info.job_id).results)
        )

    def _recover(self) -> None:
        """Read the records back; jobs caught running by a restart are crashed."""
        for info in self.store.load():
            if info.ended:
                continue
            paths = self.store.paths(info.job_id)
            _kill_leftover(paths, info.job_id)
            self.store.save(
                dataclasses.replace(
                    info,
                    state="crashed",
                    ended_at=time.time(),
                    message="server restarted",
                    progress=read_progress(paths.results),
                )
            )
            logger.warning(
                "job %s was %s when the server stopped: crashed", info.job_id, info.state
            )


def _config_sites(config: Mapping[str, Any]) -> list[str]:
    """The sites a job's executors name, when every executor names its sites; else none."""
    executors = config.get("executors")
    if not isinstance(executors, list) or not executors:
        return []
    sites: dict[str, None] = {}
    for entry in executors:
        named = entry.get("sites") if isinstance(entry, dict) else None
        if not isinstance(named, list) or not all(isinstance(s, str) for s in named):
            return []
        sites.update(dict.fromkeys(named))
    return list(sites)


def _outcome(
    paths: JobPaths, job_id: str, returncode: int, forced_end: tuple[str, str] | None
) -> tuple[str, str]:
    """The end state and message of a job whose process exited with ``returncode``."""
    state, message = "", ""
    try:
        result = json.loads((paths.results / "result.json").read_text())
    except (OSError, ValueError):
        result = None
    if isinstance(result, dict) and result.get("job_id") == job_id:
        state = str(result.get("state"))
        message = str(result.get("reason") or "")
    if state not in ENDED_STATES - {"refused"}:
        if returncode == 2:
            state, message = "failed", f"the job could not run:\n{_log_tail(paths.server_log)}"
        elif returncode < 0:
            state = "crashed"
            message = f"the job process was killed by {signal.Signals(-returncode).name}"
        else:
            state = "crashed"
            message = (
                f"the job process exited with status {returncode} without results:\n"
                f"{_log_tail(paths.server_log)}"
            )
    if forced_end is not None and state != "finished":
        return forced_end
    return state, message


def _log_tail(path: Path) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(max(0, path.stat().st_size - 8192))
            lines = fh.read().decode("utf-8", errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(lines[-LOG_TAIL_LINES:])


def _kill_leftover(paths: JobPaths, job_id: str) -> None:
    """Kill the process group of a job process that outlived its daemon (checked to be it)."""
    try:
        pid = int(paths.pid_file.read_text())
        process = psutil.Process(pid)
        is_it = job_id in process.cmdline()
    except (OSError, ValueError, psutil.Error):
        return
    finally:
        paths.pid_file.unlink(missing_ok=True)
    if is_it:
        logger.warning("killing job %s's process %d, left from before the restart", job_id, pid)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)


def _reason(error: BaseException) -> str:
    """Why a site request failed, as the submitter reads it."""
    if isinstance(error, RemoteError):
        return remote_reason(error)
    if isinstance(error, FedcellError):
        return f"{type(error).__name__}: {error}"
    return repr(error)


def _brief(args: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v!r:.40}" for k, v in args.items())


def _sha256_and_size(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size
