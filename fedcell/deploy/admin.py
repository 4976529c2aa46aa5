"""The admin client: an admin's kit talking to the server daemon (what ``fedcell job ...`` uses).

::

    async with AdminClient("kits/alice") as admin:
        info = await admin.submit(Path("my-job"))
        while not (info := await admin.status(info.job_id)).ended:
            await asyncio.sleep(1)
        folder = await admin.download(info.job_id, Path("results"))

The client is a cell ``<admin>.cli-<8 hex>`` (a sub-cell of the admin's name, so the server's
name binding admits it and several clients of one admin can run at once), connected to the
server with the admin's kit. Every command is signed with the admin's key
(:func:`~fedcell.deploy.commands.sign_command`) and sent as one :data:`ADMIN_CHANNEL` request
(the table is in :mod:`fedcell.deploy.protocol`). A refusal comes back as the error class the
server raised, with its message: :class:`~fedcell.errors.PolicyError` (a site or the server
refused), :class:`~fedcell.errors.JobError` (unknown job id, job not running),
:class:`~fedcell.errors.AuthenticationError` (the command did not verify),
:class:`~fedcell.errors.ConfigError` (a bad job folder or argument).

A submission packs the job folder (:func:`~fedcell.deploy.job_archive.pack_job`) and signs its
sha256 with the command, so neither the server nor a site can be handed another archive under
the admin's signature. A download arrives as a file streamed to the client's cell (into a private
temporary folder, removed on exit); the client checks the sha256 the server announced and
unpacks it with the same checks as a submission (no links, no names leaving the folder).
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from fedcell.deploy.commands import sign_command
from fedcell.deploy.job_archive import extract_archive, pack_job
from fedcell.deploy.kit import StartupKit
from fedcell.deploy.protocol import (
    ADMIN_CHANNEL,
    DOWNLOAD_CHANNEL,
    JobInfo,
    LogChunk,
    SiteStatus,
    archive_payload,
    local_error,
)
from fedcell.errors import (
    CellError,
    ConfigError,
    ConnectError,
    ProtocolError,
    RemoteError,
    StreamIntegrityError,
)
from fedcell.transports.cell import Cell, CellConfig
from fedcell.transports.message import Message
from fedcell.transports.stream import ReceivedFile, directory_sink

__all__ = ["AdminClient"]


class AdminClient:
    """An admin's connection to the server daemon (an async context manager).

    Parameters
    ----------
    kit:
        The admin's startup kit folder.
    timeout:
        Seconds to wait for each reply (a submission waits for every site's answer; an abort
        for the job processes to stop, up to about 25 s).
    config:
        Cell tunables (heartbeats, connect timeout); the kit adds the transport security.

    Raises
    ------
    ConfigError
        On entry, if the kit is incomplete or not an admin's.
    AuthenticationError
        On entry, if the kit does not verify.
    ConnectError
        On entry, if the server does not answer (not running, or it does not admit this kit:
        a CurveZMQ refusal is silent, so both look the same).
    """

    def __init__(
        self, kit: Path | str, *, timeout: float = 60.0, config: CellConfig | None = None
    ) -> None:
        self._kit_folder = Path(kit)
        self.timeout = timeout
        self._config = config
        self._kit: StartupKit | None = None
        self._cell: Cell | None = None
        self._inbox: Path | None = None
        self._received: dict[str, ReceivedFile] = {}
        self._arrived = asyncio.Condition()

    async def __aenter__(self) -> AdminClient:
        kit = StartupKit.load(self._kit_folder)
        if not kit.is_admin:
            raise ConfigError(f"{self._kit_folder} is the kit of a {kit.role}, not of an admin")
        self._kit = kit
        self._inbox = Path(tempfile.mkdtemp(prefix="fedcell-admin-"))
        cell = kit.cell(
            name=f"{kit.name}.cli-{secrets.token_hex(4)}",
            config=self._config,
            file_sink=directory_sink(self._inbox),
        )
        cell.register(DOWNLOAD_CHANNEL, self._on_file)
        try:
            await cell.start()
        except ConnectError as exc:
            shutil.rmtree(self._inbox, ignore_errors=True)
            raise ConnectError(
                f"the server {kit.server.url} did not answer: it is not running, or it does not "
                f"admit the kit of {kit.name!r} ({exc})"
            ) from exc
        except BaseException:
            shutil.rmtree(self._inbox, ignore_errors=True)
            raise
        self._cell = cell
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._cell is not None:
            await self._cell.stop()
            self._cell = None
        if self._inbox is not None:
            shutil.rmtree(self._inbox, ignore_errors=True)
            self._inbox = None

    # ------------------------------------------------------------------------------------------
    # commands

    async def submit(self, job_dir: Path, *, sites: Sequence[str] | None = None) -> JobInfo:
        """Submit the exported job folder ``job_dir`` to run at ``sites`` (default: the sites
        its config names, else every connected site); return it once running.

        Raises
        ------
        ConfigError
            If the folder is not a valid job folder (or packs to more than 256 MiB).
        PolicyError
            If a site (or several: every reason is listed) refused the job.
        """
        archive = await asyncio.to_thread(pack_job, Path(job_dir))
        args = {
            "archive_sha256": hashlib.sha256(archive).hexdigest(),
            "sites": None if sites is None else list(sites),
        }
        return _job_info(await self._command("submit", args, archive_payload(archive)))

    async def list_jobs(self) -> list[JobInfo]:
        """Every job the server knows, newest first."""
        reply = await self._command("list", {})
        if not isinstance(reply, list):
            raise ProtocolError(f"the server answered list with {type(reply).__name__}")
        return [_job_info(item) for item in reply]

    async def status(self, job_id: str) -> JobInfo:
        """The job ``job_id`` now (state, sites, progress).

        Raises
        ------
        JobError
            If the server knows no such job.
        """
        return _job_info(await self._command("status", {"job_id": job_id}))

    async def abort(self, job_id: str) -> JobInfo:
        """Abort the running job ``job_id``; return it once its processes stopped.

        Raises
        ------
        JobError
            If the server knows no such job, or it is not running.
        """
        return _job_info(await self._command("abort", {"job_id": job_id}))

    async def download(self, job_id: str, dest: Path) -> Path:
        """Download the job's results and server log into ``dest/<job_id>/`` and return it.

        Raises
        ------
        JobError
            If the server knows no such job.
        StreamIntegrityError
            If the file that arrived does not have the sha256 the server announced.
        ConfigError
            If the archive holds a link or a name leaving the folder.
        """
        reply = await self._command("download", {"job_id": job_id})
        if not (
            isinstance(reply, dict)
            and isinstance(reply.get("file"), str)
            and isinstance(reply.get("sha256"), str)
        ):
            raise ProtocolError(f"the server answered download with {reply!r:.200}")
        received = await self._wait_for_file(reply["file"])
        archive = Path(received.path)
        try:
            digest = await asyncio.to_thread(_sha256_of, archive)
            if digest != reply["sha256"]:
                raise StreamIntegrityError(
                    f"the download of job {job_id} has sha256 {digest}, the server announced "
                    f"{reply['sha256']}"
                )
            target = Path(dest) / job_id
            await asyncio.to_thread(extract_archive, archive, target)
        finally:
            archive.unlink(missing_ok=True)
        return target

    async def logs(self, job_id: str, *, site: str | None = None, offset: int = 0) -> LogChunk:
        """The job's server log (or ``site``'s log of the job) from byte ``offset`` on, at
        most 1 MiB; poll again from the returned offset until ``done``.

        Raises
        ------
        JobError
            If the server knows no such job or the job has no such site.
        UnreachableError
            If ``site`` is not connected.
        """
        reply = await self._command("logs", {"job_id": job_id, "site": site, "offset": offset})
        if not isinstance(reply, LogChunk):
            raise ProtocolError(f"the server answered logs with {type(reply).__name__}")
        return reply

    async def sites(self) -> list[SiteStatus]:
        """The sites connected to the server, with the running jobs each takes part in."""
        reply = await self._command("sites", {})
        if not isinstance(reply, list) or not all(isinstance(s, SiteStatus) for s in reply):
            raise ProtocolError(f"the server answered sites with {reply!r:.200}")
        return list(reply)

    # ------------------------------------------------------------------------------------------

    async def _command(self, name: str, args: Mapping[str, Any], data: Any = None) -> Any:
        if self._cell is None or self._kit is None:
            raise CellError("AdminClient is not connected: use it as 'async with AdminClient(...)'")
        signed = sign_command(self._kit, {"command": name, "args": dict(args)})
        try:
            return await self._cell.request(
                self._kit.server.name,
                ADMIN_CHANNEL,
                {"signed": signed, "data": data},
                timeout=self.timeout,
            )
        except RemoteError as exc:
            raise local_error(exc) from exc

    async def _on_file(self, message: Message) -> None:
        if isinstance(message.payload, ReceivedFile):
            async with self._arrived:
                self._received[message.payload.name] = message.payload
                self._arrived.notify_all()

    async def _wait_for_file(self, name: str) -> ReceivedFile:
        # send_file returns at the server once this cell verified the file; the handler that
        # records it runs as its own task, so the reply can overtake it by a moment.
        async with self._arrived:
            try:
                await asyncio.wait_for(
                    self._arrived.wait_for(lambda: name in self._received), self.timeout
                )
            except TimeoutError as exc:
                raise ProtocolError(f"the server announced {name!r} but it never arrived") from exc
            return self._received.pop(name)


def _job_info(reply: object) -> JobInfo:
    if not isinstance(reply, JobInfo):
        raise ProtocolError(f"the server answered with {type(reply).__name__}, not a JobInfo")
    return reply


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
