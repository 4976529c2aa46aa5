"""The server daemon over real loopback sockets: command verification, submission to (fake)
sites, archive attacks, the job lifecycle with a stand-in job process, abort, restart."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from daemon_helpers import (
    CONFIG,
    FakeSite,
    admin,
    job_folder,
    running_daemon,
    until,
)

from fedcell.deploy import protocol
from fedcell.deploy.admin import AdminClient
from fedcell.deploy.commands import SignedCommand, sign_command
from fedcell.deploy.job_archive import pack_job
from fedcell.deploy.job_store import JobStore
from fedcell.deploy.kit import StartupKit
from fedcell.deploy.protocol import ADMIN_CHANNEL, JobInfo, archive_payload
from fedcell.errors import JobError, PolicyError, RemoteError
from fedcell.transports.cell import Cell

pytestmark = pytest.mark.integration


async def raw_request(cell: Cell, signed: Any, data: Any = None) -> Any:
    return await cell.request("server", ADMIN_CHANNEL, {"signed": signed, "data": data}, timeout=10)


def test_commands_that_do_not_verify_are_refused_and_the_daemon_keeps_serving(
    kits: Path, tmp_path: Path
) -> None:
    async def main() -> None:
        alice = StartupKit.load(kits / "alice")
        site = StartupKit.load(kits / "site-1")
        async with running_daemon(kits, tmp_path / "ws"):
            client = alice.cell(name="alice.cli-raw", config=CONFIG)
            site_cell = site.cell(config=CONFIG)
            await client.start()
            await site_cell.start()
            try:
                # Prepare
                good = sign_command(alice, {"command": "list", "args": {}})
                altered = SignedCommand(good.body.replace(b"list", b"sits"), good.signature,
                                        good.certificate)  # fmt: skip
                body = good.body.replace(b'"alice"', b'"site-1"')
                forged = SignedCommand(
                    body,
                    site.private_key.sign(body, ec.ECDSA(hashes.SHA256())),
                    site.me.certificate.public_bytes(serialization.Encoding.PEM),
                )
                stolen = sign_command(alice, {"command": "list", "args": {}})

                # Execute / Assert
                with pytest.raises(RemoteError, match="does not verify") as bad_signature:
                    await raw_request(client, altered)
                assert bad_signature.value.remote_type == "AuthenticationError"
                assert await raw_request(client, good) == []
                with pytest.raises(RemoteError, match="replay"):
                    await raw_request(client, good)
                with pytest.raises(RemoteError, match="is a site, not an admin"):
                    await raw_request(client, forged)
                with pytest.raises(RemoteError, match="only the admin's own cells"):
                    await raw_request(site_cell, stolen)
                with pytest.raises(RemoteError, match="must be"):
                    await client.request("server", ADMIN_CHANNEL, {"junk": 1}, timeout=10)
                async with admin(kits) as session:
                    assert await session.list_jobs() == []
                    # an admin's top-level cell is no site
                    top_level = alice.cell(config=CONFIG)
                    await top_level.start()
                    try:
                        assert [s.name for s in await session.sites()] == ["site-1"]
                    finally:
                        await top_level.stop()
            finally:
                await site_cell.stop()
                await client.stop()

    asyncio.run(main())


def test_a_job_accepted_by_its_sites_runs_reports_progress_and_aborts(
    kits: Path, tmp_path: Path
) -> None:
    async def main() -> None:
        async with (
            running_daemon(kits, tmp_path / "ws") as daemon,
            FakeSite(kits / "site-1") as site_1,
            FakeSite(kits / "site-2") as site_2,
            admin(kits) as session,
        ):
            # Execute
            info = await session.submit(job_folder(tmp_path, "sleepy"))
            pid = int(daemon.store.paths(info.job_id).pid_file.read_text())
            await until(lambda: (daemon.store.paths(info.job_id).results / "progress.json").exists())
            status = await session.status(info.job_id)
            sites = await session.sites()
            listed = await session.list_jobs()
            log = await session.logs(info.job_id)
            site_log = await session.logs(info.job_id, site="site-2")
            aborted = await session.abort(info.job_id)

            # Assert
            assert info.state == "running" and info.submitter == "alice"
            assert info.sites == {"site-1": "running", "site-2": "running"}
            assert site_1.ops[:2] == [("deploy", info.job_id), ("start", info.job_id)]
            assert status.progress["step"] == 1 and status.progress["total"] == 3
            assert [(s.name, s.jobs) for s in sites] == [
                ("site-1", [info.job_id]), ("site-2", [info.job_id])
            ]  # fmt: skip
            assert [j.job_id for j in listed] == [info.job_id]
            assert "stand-in job process" in log.text and not log.done
            assert site_log.text == f"site-2 log of {info.job_id}\n"
            assert aborted.state == "aborted" and aborted.message == "aborted by alice"
            assert aborted.ended_at is not None
            assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"
            assert ("stop", info.job_id) in site_1.ops and ("stop", info.job_id) in site_2.ops
            with pytest.raises(JobError, match="not running"):
                await session.abort(info.job_id)
            rest = await session.logs(info.job_id, offset=log.offset)
            assert rest.done

    asyncio.run(main())


def test_a_refusing_site_refuses_the_whole_job_with_every_reason(
    kits: Path, tmp_path: Path
) -> None:
    async def main() -> None:
        async with (
            running_daemon(kits, tmp_path / "ws") as daemon,
            FakeSite(kits / "site-1") as site_1,
            FakeSite(kits / "site-2", refuse="rule submit: bob may not submit") as site_2,
            admin(kits) as session,
        ):
            # Execute
            with pytest.raises(PolicyError) as refused:
                await session.submit(job_folder(tmp_path, "sleepy"))
            with pytest.raises(PolicyError) as missing:
                await session.submit(job_folder(tmp_path, "later", sites=["site-1", "site-3"]))
            jobs = await session.list_jobs()

            # Assert
            assert "site-2: site-2 refuses job" in str(refused.value)
            assert "bob may not submit" in str(refused.value)
            assert "site-3: not connected" in str(missing.value)
            first = jobs[1]
            assert first.state == "refused" and "bob may not submit" in first.message
            assert first.sites == {"site-1": "discarded", "site-2": "refused"}
            assert ("stop", first.job_id) in site_1.ops  # the accepted deploy is discarded
            assert [op for op, _ in site_2.ops] == ["deploy"]
            assert not any(daemon.store.paths(j.job_id).pid_file.exists() for j in jobs)

    asyncio.run(main())


def _tar(entries: list[tarfile.TarInfo]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        config = json.dumps({"job": {"name": "evil"}}).encode()
        info = tarfile.TarInfo("job.json")
        info.size = len(config)
        tar.addfile(info, io.BytesIO(config))
        for entry in entries:
            tar.addfile(entry, io.BytesIO(b"x" * entry.size))
    return buffer.getvalue()


def _member(name: str, kind: bytes = tarfile.REGTYPE, target: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    info.size = 1 if kind == tarfile.REGTYPE else 0
    return info


def test_archive_attacks_are_refused_before_anything_reaches_a_site(
    kits: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    attacks = {
        "parent": (_tar([_member("../escape.py")]), "unsafe name '../escape.py'"),
        "absolute": (_tar([_member("/etc/evil")]), "unsafe name '/etc/evil'"),
        "symlink": (_tar([_member("custom/l", tarfile.SYMTYPE, "/etc/passwd")]), "a link"),
        "hardlink": (_tar([_member("custom/h", tarfile.LNKTYPE, "job.json")]), "a link"),
        "device": (_tar([_member("custom/d", tarfile.CHRTYPE)]), "special file"),
        "not a tar": (b"\x1f\x8b junk", "cannot be unpacked"),
    }

    async def main() -> None:
        alice = StartupKit.load(kits / "alice")
        async with (
            running_daemon(kits, tmp_path / "ws") as daemon,
            FakeSite(kits / "site-1") as site,
        ):
            client = alice.cell(name="alice.cli-raw", config=CONFIG)
            await client.start()
            try:
                for what, (archive, expected) in attacks.items():
                    signed = sign_command(alice, {"command": "submit", "args": {
                        "archive_sha256": hashlib.sha256(archive).hexdigest(), "sites": None}})  # fmt: skip
                    with pytest.raises(RemoteError, match=expected) as refused:
                        await raw_request(client, signed, archive_payload(archive))
                    assert refused.value.remote_type == "ConfigError", what
                # a sha256 the admin did not sign
                good = pack_job(job_folder(tmp_path, "quick"))
                signed = sign_command(alice, {"command": "submit", "args": {
                    "archive_sha256": hashlib.sha256(good).hexdigest(), "sites": None}})  # fmt: skip
                with pytest.raises(RemoteError, match="does not have the sha256") as altered:
                    await raw_request(client, signed, archive_payload(good + b"\0"))
                assert altered.value.remote_type == "AuthenticationError"
                # above the archive limit (lowered here: the check, not 256 MiB of traffic)
                monkeypatch.setattr(protocol, "MAX_ARCHIVE_BYTES", len(good) - 1)
                signed = sign_command(alice, {"command": "submit", "args": {
                    "archive_sha256": hashlib.sha256(good).hexdigest(), "sites": None}})  # fmt: skip
                with pytest.raises(RemoteError, match="above the") as oversized:
                    await raw_request(client, signed, archive_payload(good))
                assert oversized.value.remote_type == "OversizedError"

                # Assert: no site was asked, nothing was kept, the daemon still serves
                assert site.ops == []
                assert list(daemon.store.root.iterdir()) == []
                monkeypatch.undo()
                async with admin(kits) as session:
                    assert (await session.submit(job_folder(tmp_path, "fine"))).state == "running"
            finally:
                await client.stop()

    asyncio.run(main())


def test_job_end_states_come_from_the_result_or_the_exit_status(
    kits: Path, tmp_path: Path
) -> None:
    async def main() -> None:
        async with (
            running_daemon(kits, tmp_path / "ws", abort_grace=1.0),
            FakeSite(kits / "site-1"),
            admin(kits) as session,
        ):
            # Execute
            quick = await session.submit(job_folder(tmp_path, "quick"), sites=["site-1"])
            broken = await session.submit(job_folder(tmp_path, "broken"), sites=["site-1"])
            stubborn = await session.submit(job_folder(tmp_path, "stubborn"), sites=["site-1"])
            killed = await session.abort(stubborn.job_id)
            await until(lambda: _ended(session, quick.job_id))
            await until(lambda: _ended(session, broken.job_id))
            finished = await session.status(quick.job_id)
            failed = await session.status(broken.job_id)

            # Assert
            assert finished.state == "finished" and finished.sites == {"site-1": "finished"}
            assert finished.progress["step"] == 1
            assert failed.state == "failed" and "the job folder is broken" in failed.message
            assert killed.state == "aborted" and killed.message == "aborted by alice"

    asyncio.run(main())


async def _ended(session: AdminClient, job_id: str) -> bool:
    return (await session.status(job_id)).ended


def test_a_site_that_disconnects_is_recorded_lost_and_the_job_goes_on(
    kits: Path, tmp_path: Path
) -> None:
    async def main() -> None:
        async with (
            running_daemon(kits, tmp_path / "ws") as daemon,
            FakeSite(kits / "site-1"),
            admin(kits) as session,
        ):
            site_2 = FakeSite(kits / "site-2")
            async with site_2:
                info = await session.submit(job_folder(tmp_path, "sleepy"))
            # Execute: site-2 said goodbye (a dead one is declared gone after the peer timeout)
            await until(lambda: daemon.store.get(info.job_id).sites["site-2"] == "lost")
            status = await session.status(info.job_id)

            # Assert
            assert status.state == "running"
            assert status.sites == {"site-1": "running", "site-2": "lost"}
            assert [s.name for s in await session.sites()] == ["site-1"]
            ended = await session.abort(info.job_id)
            assert ended.sites == {"site-1": "aborted", "site-2": "lost"}

    asyncio.run(main())


def test_a_restarted_daemon_lists_old_jobs_and_marks_running_ones_crashed(
    kits: Path, tmp_path: Path
) -> None:
    # Prepare: records as a daemon that died left them, one job process still alive
    store = JobStore(tmp_path / "ws" / "jobs")
    done = JobInfo("00000000aa", "old", "finished", "alice", time.time() - 60, ended_at=1.0)
    running = JobInfo("00000000bb", "cut", "running", "alice", time.time() - 30,
                      sites={"site-1": "running"})  # fmt: skip
    store.save(done)
    store.save(running)
    leftover = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)", "--job-id", running.job_id],
        start_new_session=True,
    )
    store.paths(running.job_id).pid_file.write_text(str(leftover.pid))
    deadline = time.monotonic() + 30  # until exec: before it, the child shows pytest's cmdline
    while running.job_id not in psutil.Process(leftover.pid).cmdline():
        assert time.monotonic() < deadline, "the stand-in job process did not start"
        time.sleep(0.01)

    async def main() -> list[JobInfo]:
        async with running_daemon(kits, tmp_path / "ws"), admin(kits) as session:
            return await session.list_jobs()

    try:
        # Execute
        jobs = asyncio.run(main())

        # Assert
        assert [(j.job_id, j.state, j.message) for j in jobs] == [
            ("00000000bb", "crashed", "server restarted"), ("00000000aa", "finished", "")
        ]  # fmt: skip
        assert leftover.wait(timeout=5) == -9
    finally:
        if leftover.poll() is None:
            leftover.kill()
            leftover.wait()


def test_stopping_the_daemon_aborts_its_running_jobs(kits: Path, tmp_path: Path) -> None:
    async def main() -> tuple[int, Path]:
        async with (
            running_daemon(kits, tmp_path / "ws") as daemon,
            FakeSite(kits / "site-1"),
            admin(kits) as session,
        ):
            info = await session.submit(job_folder(tmp_path, "sleepy"))
            pid = int(daemon.store.paths(info.job_id).pid_file.read_text())
            record = daemon.store.paths(info.job_id).record
        return pid, record

    # Execute
    pid, record = asyncio.run(main())

    # Assert
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"
    saved = JobInfo.from_json(json.loads(record.read_text()))
    assert saved.state == "aborted" and saved.message == "the server daemon stopped"


def test_a_job_process_that_cannot_start_fails_the_job_and_releases_the_sites(
    kits: Path, tmp_path: Path
) -> None:
    async def main() -> None:
        missing = (str(tmp_path / "no-such-python"),)
        async with (
            running_daemon(kits, tmp_path / "ws", job_command=missing),
            FakeSite(kits / "site-1") as site,
            admin(kits) as session,
        ):
            # Execute
            with pytest.raises(JobError, match="could not be started"):
                await session.submit(job_folder(tmp_path, "quick"))
            (info,) = await session.list_jobs()

            # Assert
            assert info.state == "failed" and info.sites == {"site-1": "failed"}
            assert [op for op, _ in site.ops] == ["deploy", "stop"]

    asyncio.run(main())
