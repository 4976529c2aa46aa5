"""Helpers of the site-daemon and deployed-job tests: a server cell that relays, site daemons in
this process, signed submissions of a numpy FedAvg job."""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from site_jobs import add_one  # type: ignore[import-not-found]

from fedcell.controllers import FedAvg
from fedcell.deploy.commands import SignedCommand, sign_command
from fedcell.deploy.job_archive import pack_job
from fedcell.deploy.kit import StartupKit
from fedcell.deploy.protocol import SITE_CHANNEL, archive_payload
from fedcell.deploy.site_daemon import SiteDaemon
from fedcell.engine.job import Job
from fedcell.executors.numpy_executor import NumpyExecutor
from fedcell.transports.cell import Cell, CellConfig

CONFIG = CellConfig(heartbeat_interval=0.5, peer_timeout=3.0, connect_timeout=5.0)
JOB_NAME = "deployed-fedavg"


def numpy_job(rounds: int, train: Callable[..., Any] = add_one) -> Job:
    job = Job(JOB_NAME)
    job.add(FedAvg(rounds=rounds, initial_params={"w": [0.0, 0.0]}), name="train")
    job.add_executor(NumpyExecutor(train=train), tasks=("train",))
    return job


def archive_of(job: Job, tmp_path: Path) -> bytes:
    folder = tmp_path / f"export-{uuid.uuid4().hex[:6]}"
    job.export(folder)
    return pack_job(folder)


def submit_command(
    kits: Path, archive: bytes, admin: str = "alice", sites: Sequence[str] | None = None
) -> SignedCommand:
    args = {"archive_sha256": hashlib.sha256(archive).hexdigest(), "sites": sites}
    return sign_command(StartupKit.load(kits / admin), {"command": "submit", "args": args})


def deploy_request(job_id: str, signed: Any, archive: bytes) -> dict[str, Any]:
    return {"op": "deploy", "job_id": job_id, "signed": signed, "archive": archive_payload(archive)}


async def ask(server: Cell, site: str, request: Any, timeout: float = 30.0) -> Any:
    return await server.request(site, SITE_CHANNEL, request, timeout=timeout)


async def until(predicate: Callable[[], bool], timeout: float = 30.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached within {timeout} s: {what}")
        await asyncio.sleep(0.05)


@asynccontextmanager
async def deployment(
    kits: Path,
    workspace: Path,
    sites: Sequence[str] = ("site-1",),
    policies: Mapping[str, Path] | None = None,
) -> AsyncIterator[tuple[Cell, dict[str, SiteDaemon]]]:
    """The server kit's cell (it relays between job cells) and a :class:`SiteDaemon` per site,
    all on this event loop; the daemons stop (and stop their job processes) on exit."""
    server = StartupKit.load(kits / "server").cell(config=CONFIG)
    await server.start()
    stop = asyncio.Event()
    daemons = {
        site: SiteDaemon(
            StartupKit.load(kits / site), workspace / site, (policies or {}).get(site),
            config=CONFIG,
        )
        for site in sites
    }  # fmt: skip
    runs = [asyncio.ensure_future(daemon.run(stop)) for daemon in daemons.values()]
    try:
        await until(lambda: all(d.ready.is_set() or r.done() for d, r in
                                zip(daemons.values(), runs, strict=True)), what="daemons up")  # fmt: skip
        for run in runs:
            if run.done():
                run.result()  # a daemon that failed to start: raise its error
        yield server, daemons
    finally:
        stop.set()
        await asyncio.gather(*runs, return_exceptions=True)
        await server.stop()
