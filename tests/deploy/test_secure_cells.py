"""Cells secured by startup kits, over real loopback sockets: who is admitted, under which name."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from deploy_helpers import free_port, project_tree, provision_tree, tampered

from fedcell.deploy.kit import StartupKit
from fedcell.deploy.participant import main as participant_main
from fedcell.errors import CellError, ConfigError, ConnectError
from fedcell.transports.cell import Cell, CellConfig
from fedcell.transports.message import Message

pytestmark = pytest.mark.integration

# connect_timeout bounds how long a refused client waits: CurveZMQ refusals are silent.
CONFIG = CellConfig(heartbeat_interval=0.2, peer_timeout=3.0, connect_timeout=1.5)


async def echo(message: Message) -> Any:
    return {"from": message.envelope.sender, "payload": message.payload}


@asynccontextmanager
async def running_server(kit_folder: Path) -> AsyncIterator[Cell]:
    server = StartupKit.load(kit_folder).cell(config=CONFIG)
    server.register("echo", echo)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    provision_tree(project_tree(port=free_port()), tmp_path)
    return tmp_path


def test_a_site_with_a_valid_kit_is_served_and_sub_cells_join_under_it(workspace: Path) -> None:
    async def main() -> None:
        kits = workspace / "kits"
        async with running_server(kits / "server") as server:
            # Prepare
            site_kit = StartupKit.load(kits / "site-1")
            site = site_kit.cell(config=CONFIG)
            job_cell = site_kit.cell(name="site-1.job-7", config=CONFIG)
            admin = StartupKit.load(kits / "alice").cell(config=CONFIG)
            try:
                # Execute
                await site.start()
                await job_cell.start()
                await admin.start()
                reply = await site.request("server", "echo", {"x": 1}, timeout=5)
                job_reply = await job_cell.request("server", "echo", "job", timeout=5)

                # Assert
                assert reply == {"from": "site-1", "payload": {"x": 1}}
                assert job_reply == {"from": "site-1.job-7", "payload": "job"}
                assert sorted(server.peers) == ["alice", "site-1", "site-1.job-7"]
                assert site.parent == "server"
            finally:
                for cell in (admin, job_cell, site):
                    await cell.stop()

    asyncio.run(main())


def test_a_process_without_a_kit_or_with_another_projects_kit_is_refused(
    workspace: Path, tmp_path: Path
) -> None:
    async def main() -> None:
        kits = workspace / "kits"
        provision_tree(project_tree("other"), tmp_path / "other")
        async with running_server(kits / "server") as server:
            # Prepare
            url = StartupKit.load(kits / "site-1").server.url
            plain = Cell("site-1", parent=url, config=CONFIG)
            foreign_kit = StartupKit.load(tmp_path / "other" / "kits" / "site-1")
            foreign = Cell("site-1", parent=url, config=foreign_kit.cell_config(CONFIG))

            # Execute / Assert: the handshake never completes; the server keeps serving
            with pytest.raises(ConnectError, match="handshake"):
                await plain.start()
            with pytest.raises(ConnectError, match="handshake"):
                await foreign.start()
            assert server.peers == ()
            site = StartupKit.load(kits / "site-1").cell(config=CONFIG)
            try:
                await site.start()
                assert await site.request("server", "echo", 1, timeout=5) == {
                    "from": "site-1", "payload": 1
                }  # fmt: skip
            finally:
                await site.stop()

    asyncio.run(main())


def test_a_site_cannot_speak_under_another_sites_name(workspace: Path) -> None:
    async def main() -> None:
        kits = workspace / "kits"
        async with running_server(kits / "server") as server:
            # Prepare: site-1's credentials, site-2's name (and a sub-cell of site-2)
            site_1 = StartupKit.load(kits / "site-1")
            impostor = Cell("site-2", parent=site_1.server.url, config=site_1.cell_config(CONFIG))
            sub_impostor = Cell(
                "site-2.job-1", parent=site_1.server.url, config=site_1.cell_config(CONFIG)
            )
            sneaky = Cell("site-1x", parent=site_1.server.url, config=site_1.cell_config(CONFIG))

            # Execute / Assert
            for cell, name in ((impostor, "site-2"), (sub_impostor, "site-2.job-1"),
                               (sneaky, "site-1x")):  # fmt: skip
                with pytest.raises(CellError, match=f"'site-1' .* may not speak as '{name}'"):
                    await cell.start()
            assert server.peers == ()
            with pytest.raises(ConfigError, match="cannot start a cell named 'site-2'"):
                site_1.cell(name="site-2")

    asyncio.run(main())


def test_a_tampered_certificate_at_the_server_is_not_admitted(workspace: Path) -> None:
    async def main() -> None:
        # Prepare: someone edits site-2's certificate in the server's trust folder
        kits = workspace / "kits"
        trusted = kits / "server" / "trusted" / "site-2.pem"
        trusted.write_bytes(tampered(trusted.read_bytes()))
        async with running_server(kits / "server") as server:
            site_2 = StartupKit.load(kits / "site-2").cell(config=CONFIG)
            site_1 = StartupKit.load(kits / "site-1").cell(config=CONFIG)
            try:
                # Execute / Assert
                with pytest.raises(ConnectError):
                    await site_2.start()
                await site_1.start()
                assert server.peers == ("site-1",)
            finally:
                await site_1.stop()

    asyncio.run(main())


def test_a_site_added_while_the_server_runs_is_admitted_without_a_restart(
    workspace: Path,
) -> None:
    async def main() -> None:
        kits = workspace / "kits"
        tree = project_tree(port=StartupKit.load(kits / "server").server.port)
        async with running_server(kits / "server") as server:
            # Prepare
            tree["sites"].append("site-3")
            report = provision_tree(tree, workspace)
            assert report.created == ["site-3"]
            site_3 = StartupKit.load(kits / "site-3").cell(config=CONFIG)
            try:
                # Execute
                await site_3.start()

                # Assert
                assert await site_3.request("server", "echo", 3, timeout=5) == {
                    "from": "site-3", "payload": 3
                }  # fmt: skip
                assert server.peers == ("site-3",)
            finally:
                await site_3.stop()

    asyncio.run(main())


def test_start_scripts_run_a_server_and_a_site_process(workspace: Path) -> None:
    # Prepare
    kits = workspace / "kits"
    env = {**os.environ, "FEDCELL_PYTHON": sys.executable}
    repo = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [repo, env.get("PYTHONPATH")]))

    def start(name: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [str(kits / name / "start.sh"), "--connect-timeout", "20"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip

    server = start("server")
    site = None
    try:
        site = start("site-1")
        site_log = ""
        assert site.stdout is not None
        deadline = time.monotonic() + 60
        while "is up, linked to server" not in site_log and time.monotonic() < deadline:
            line = site.stdout.readline()
            if not line:
                break
            site_log += line

        # Execute
        site.send_signal(signal.SIGTERM)
        server.send_signal(signal.SIGTERM)
        site_rest, _ = site.communicate(timeout=30)
        server_log, _ = server.communicate(timeout=30)

        # Assert
        assert "is up, linked to server" in site_log, site_log + site_rest
        assert site.returncode == 0 and server.returncode == 0, site_log + site_rest + server_log
        assert "server: site-1 joined" in server_log, server_log
    finally:
        for process in (server, site):
            if process is not None and process.poll() is None:
                process.kill()
                process.communicate()


def test_the_participant_process_exits_2_on_an_admin_kit_or_a_silent_server(
    workspace: Path,
) -> None:
    # Prepare: nothing listens on the project's port
    kits = workspace / "kits"

    # Execute
    admin_status = participant_main([str(kits / "alice")])
    site_status = participant_main([str(kits / "site-1"), "--connect-timeout", "0.3"])

    # Assert
    assert admin_status == 2 and site_status == 2


def test_a_site_removed_while_the_server_runs_is_refused_from_then_on(workspace: Path) -> None:
    async def main() -> None:
        kits = workspace / "kits"
        tree = project_tree(port=StartupKit.load(kits / "server").server.port)
        async with running_server(kits / "server") as server:
            # Prepare: site-2 is admitted, then leaves
            site_2_kit = StartupKit.load(kits / "site-2")
            first = site_2_kit.cell(config=CONFIG)
            await first.start()
            await first.stop()
            await until(lambda: server.peers == ())

            # Execute: site-2 is removed from the project and provisioned away
            tree["sites"].remove("site-2")
            assert provision_tree(tree, workspace).stale == ["site-2"]
            again = site_2_kit.cell(config=CONFIG)

            # Assert
            with pytest.raises(ConnectError):
                await again.start()
            assert server.peers == ()

    asyncio.run(main())
