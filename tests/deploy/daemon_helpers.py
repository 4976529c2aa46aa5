"""Helpers of the server daemon and admin client tests: a daemon in the test's event loop, a
fake site daemon answering ``fc.site`` ops, small job folders."""

from __future__ import annotations

import asyncio
import hashlib
import json
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fedcell.deploy.admin import AdminClient
from fedcell.deploy.commands import ReplayGuard, verify_command
from fedcell.deploy.kit import StartupKit
from fedcell.deploy.protocol import SITE_CHANNEL, archive_bytes
from fedcell.deploy.server_daemon import ServerDaemon
from fedcell.errors import JobError, PolicyError
from fedcell.transports.cell import CellConfig
from fedcell.transports.message import Message

# connect_timeout bounds how long a refused client waits: CurveZMQ refusals are silent.
CONFIG = CellConfig(heartbeat_interval=0.2, peer_timeout=2.0, connect_timeout=3.0)
STAND_IN = (sys.executable, str(Path(__file__).with_name("stand_in_job_process.py")))


def admin(kits: Path) -> AdminClient:
    """alice's admin client, with the tests' timeouts."""
    return AdminClient(kits / "alice", timeout=30, config=CONFIG)


@asynccontextmanager
async def running_daemon(kits: Path, workspace: Path, **options: Any) -> AsyncIterator[ServerDaemon]:
    """A server daemon (the stand-in job process unless ``job_command`` is given) until exit."""
    options.setdefault("job_command", STAND_IN)
    daemon = ServerDaemon(StartupKit.load(kits / "server"), workspace, config=CONFIG, **options)
    stop = asyncio.Event()
    task = asyncio.create_task(daemon.run(stop))
    ready = asyncio.create_task(daemon.ready.wait())
    await asyncio.wait({task, ready}, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        ready.cancel()
        task.result()  # raises why it did not start
    try:
        yield daemon
    finally:
        stop.set()
        await task


class FakeSite:
    """A site daemon's ``fc.site`` side, in the test: verifies deploys like a site, accepts or
    refuses them, and records every op it got."""

    def __init__(self, kit: Path, refuse: str | None = None) -> None:
        self.kit = StartupKit.load(kit)
        self.refuse = refuse
        self.ops: list[tuple[str, str | None]] = []
        self.guard = ReplayGuard()
        self.cell = self.kit.cell(config=CONFIG)
        self.cell.register(SITE_CHANNEL, self.handle)

    async def handle(self, message: Message) -> Any:
        op, job_id = message.payload["op"], message.payload.get("job_id")
        self.ops.append((op, job_id))
        if op == "deploy":
            command = verify_command(self.kit.ca_certificate, message.payload["signed"],
                                     replay_guard=self.guard)  # fmt: skip
            archive = archive_bytes(message.payload["archive"])
            signed_sha256 = command.payload["args"]["archive_sha256"]
            assert signed_sha256 == hashlib.sha256(archive).hexdigest()
            if self.refuse is not None:
                raise PolicyError(f"{self.kit.name} refuses job {job_id}: {self.refuse}")
            return {"accepted": True}
        if op == "start":
            return {"pid": 1}
        if op == "stop":
            return {"state": "stopped"}
        if op == "logs":
            text = f"{self.kit.name} log of {job_id}\n"
            offset = message.payload["offset"]
            return {"text": text[offset:], "offset": len(text), "done": True}
        raise JobError(f"unknown op {op!r}")

    async def __aenter__(self) -> FakeSite:
        await self.cell.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.cell.stop()


def job_folder(root: Path, name: str, sites: list[str] | None = None) -> Path:
    """A job folder with a config the daemon reads (the stand-in never imports it)."""
    folder = root / f"job-{name}"
    folder.mkdir(parents=True)
    executors = [] if sites is None else [{"executor": {"type": "x:Y", "args": {}},
                                           "tasks": ["train"], "sites": sites}]  # fmt: skip
    config = {"format_version": 1, "job": {"name": name}, "nodes": [], "executors": executors}
    (folder / "job.json").write_text(json.dumps(config))
    return folder


async def until(predicate: Callable[[], Any], timeout: float = 20.0) -> None:
    """Wait until ``predicate()`` (sync or returning an awaitable) is true."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)
