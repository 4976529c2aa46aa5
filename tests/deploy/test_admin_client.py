"""The admin client against a server daemon over loopback: connecting, errors as their classes,
downloads, following logs."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from daemon_helpers import (
    CONFIG,
    FakeSite,
    admin,
    job_folder,
    running_daemon,
    until,
)

from fedcell.deploy.admin import AdminClient
from fedcell.deploy.job_store import read_log_chunk
from fedcell.deploy.protocol import MAX_LOG_CHUNK_BYTES
from fedcell.errors import ConfigError, ConnectError, JobError

pytestmark = pytest.mark.integration


def test_the_client_says_when_the_server_is_not_there_or_the_kit_is_not_an_admins(
    kits: Path,
) -> None:
    async def main() -> None:
        with pytest.raises(ConnectError, match="did not answer"):
            async with admin(kits):
                pass
        with pytest.raises(ConfigError, match="not of an admin"):
            async with AdminClient(kits / "site-1", config=CONFIG):
                pass

    asyncio.run(main())


def test_unknown_jobs_and_bad_folders_raise_their_error_classes(kits: Path, tmp_path: Path) -> None:
    async def main() -> None:
        empty = tmp_path / "empty"
        empty.mkdir()
        twice = job_folder(tmp_path, "twice")
        (twice / "job.yaml").write_text("job: {name: twice}\n")
        async with running_daemon(kits, tmp_path / "ws"), FakeSite(kits / "site-1"), admin(
            kits
        ) as session:
            with pytest.raises(JobError, match="no job 'abcdef0123'"):
                await session.status("abcdef0123")
            with pytest.raises(JobError, match="not a job id"):
                await session.logs("../../etc")
            with pytest.raises(ConfigError, match="exactly one of"):
                await session.submit(empty)
            with pytest.raises(ConfigError, match=r"found \['job.json', 'job.yaml'\]"):
                await session.submit(twice)
            with pytest.raises(ConfigError, match="does not exist"):
                await session.submit(tmp_path / "nowhere")
            assert await session.list_jobs() == []

    asyncio.run(main())


def test_download_brings_the_results_and_the_server_log(kits: Path, tmp_path: Path) -> None:
    async def main() -> None:
        async with running_daemon(kits, tmp_path / "ws"), FakeSite(kits / "site-1"), admin(
            kits
        ) as session:
            # Prepare
            info = await session.submit(job_folder(tmp_path, "quick"))
            await until(lambda: _ended(session, info.job_id))

            # Execute
            folder = await session.download(info.job_id, tmp_path / "downloads")

            # Assert
            assert folder == tmp_path / "downloads" / info.job_id
            result = json.loads((folder / "results" / "result.json").read_text())
            assert result["state"] == "finished" and result["job_id"] == info.job_id
            assert "stand-in job process" in (folder / "server.log").read_text()
            assert list(session._inbox.iterdir()) == []  # type: ignore[union-attr]

    asyncio.run(main())


async def _ended(session: AdminClient, job_id: str) -> bool:
    return (await session.status(job_id)).ended


def test_following_a_log_reads_it_whole_and_stops_once_the_job_ended(
    kits: Path, tmp_path: Path
) -> None:
    async def main() -> None:
        async with running_daemon(kits, tmp_path / "ws") as daemon, FakeSite(
            kits / "site-1"
        ), admin(kits) as session:
            info = await session.submit(job_folder(tmp_path, "sleepy"))
            text, offset, polls = "", 0, 0
            aborting = None
            while True:  # what `fedcell job logs --follow` does
                chunk = await session.logs(info.job_id, offset=offset)
                text, offset, polls = text + chunk.text, chunk.offset, polls + 1
                if chunk.done:
                    break
                if "stand-in" in text and aborting is None:
                    aborting = asyncio.create_task(session.abort(info.job_id))
                await asyncio.sleep(0.05)
            assert aborting is not None and (await aborting).state == "aborted"
            log = daemon.store.paths(info.job_id).server_log.read_text()
            assert text == log and polls >= 2

    asyncio.run(main())


def test_a_log_chunk_never_cuts_a_character_and_is_bounded(tmp_path: Path) -> None:
    # Prepare: a multi-byte character straddles the chunk limit
    log = tmp_path / "server.log"
    head = b"a" * (MAX_LOG_CHUNK_BYTES - 1)
    log.write_bytes(head + "é".encode() + b"end\n")

    # Execute
    first = read_log_chunk(log, 0, ended=True)
    second = read_log_chunk(log, first.offset, ended=True)

    # Assert
    assert first.offset == MAX_LOG_CHUNK_BYTES - 1 and not first.done
    assert second.text == "éend\n" and second.done
    assert read_log_chunk(tmp_path / "missing.log", 0, ended=False).done is False
