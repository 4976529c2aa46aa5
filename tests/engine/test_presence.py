"""Site presence for a job's server cell (neighbours or remote cells pinged through the tree) and
the job process's throttled progress file, over in-process cells."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path

import pytest

from fedcell.engine.job_process import ProgressFile
from fedcell.engine.presence import NeighbourPresence, RemotePresence
from fedcell.engine.progress import ProgressEvent
from fedcell.engine.site_runtime import SiteRuntime
from fedcell.errors import ConfigError
from fedcell.transports.cell import Cell, CellConfig

FAST = CellConfig(heartbeat_interval=0.05, peer_timeout=0.5)


def test_remote_presence_sees_a_site_cell_join_leave_and_come_back_through_a_relay() -> None:
    async def main() -> None:
        # Prepare: the job's server and the site's job cell are both children of "server"
        url = f"inproc://presence-{uuid.uuid4().hex[:6]}"
        root = Cell("server", listen=url, config=FAST)
        job = Cell("server.job-1", parent=url, config=FAST)
        await root.start()
        await job.start()
        events: list[tuple[str, str]] = []
        presence = RemotePresence(
            job, ["site-1"], {"site-1": "site-1.job-1"}, interval=0.05, timeout=1.0
        )
        presence.add_listener(lambda site, event: events.append((site, event)))
        await presence.start()
        try:
            # Execute
            early = await presence.wait_until(everyone=True, timeout=0.3)
            site = Cell("site-1.job-1", parent=url, config=FAST)
            SiteRuntime(site, site_name="site-1")
            await site.start()
            joined = await presence.wait_until(everyone=True, timeout=5)
            started = time.monotonic()
            await site.stop()
            left = await presence.wait_until(everyone=False, timeout=5)
            noticed_after = time.monotonic() - started
            again = Cell("site-1.job-1", parent=url, config=FAST)
            SiteRuntime(again, site_name="site-1")
            await again.start()
            back = await presence.wait_until(everyone=True, timeout=5)
            await again.stop()
        finally:
            await presence.stop()
            await job.stop()
            await root.stop()

        # Assert: plain site names, each change once, a loss noticed within the peer timeout
        assert not early and joined and left and back
        assert events == [("site-1", "joined"), ("site-1", "left"), ("site-1", "joined")]
        assert noticed_after < 1.0

    asyncio.run(main())


def test_neighbour_presence_follows_peer_events_under_cell_names() -> None:
    async def main() -> None:
        # Prepare
        url = f"inproc://presence-{uuid.uuid4().hex[:6]}"
        server = Cell("server", listen=url, config=FAST)
        presence = NeighbourPresence(server, ["a", "b"], {"a": "a.job-1"})
        events: list[tuple[str, str]] = []
        presence.add_listener(lambda site, event: events.append((site, event)))
        await server.start()
        await presence.start()
        cells = [Cell("a.job-1", parent=url, config=FAST), Cell("b", parent=url, config=FAST)]
        try:
            # Execute
            for cell in cells:
                await cell.start()
            everyone = await presence.wait_until(everyone=True, timeout=5)
            await cells[0].stop()
            all_gone = await presence.wait_until(everyone=False, timeout=0.3)
            remaining = set(presence.present)
        finally:
            for cell in cells:
                await cell.stop()
            await presence.stop()
            await server.stop()

        # Assert
        assert everyone and not all_gone and remaining == {"b"}
        assert events[:3] == [("a", "joined"), ("b", "joined"), ("a", "left")]

    asyncio.run(main())


def test_remote_presence_refuses_nonsense_settings() -> None:
    cell = Cell("server.job-1")
    with pytest.raises(ConfigError, match="interval and timeout must be > 0"):
        RemotePresence(cell, ["site-1"], interval=0)
    with pytest.raises(ConfigError, match="needs at least one site"):
        RemotePresence(cell, [])


def test_progress_file_writes_at_most_twice_a_second_and_always_the_last_report(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        # Prepare
        path = tmp_path / "progress.json"
        progress = ProgressFile(path, interval=0.3)

        def read() -> dict[str, object]:
            return json.loads(path.read_text())  # type: ignore[no-any-return]

        # Execute / Assert: the first report is written at once, the next ones are held ...
        progress(ProgressEvent("train", 1, 5, {"loss": 0.5}))
        first = read()
        progress(ProgressEvent("train", 2, 5, {"loss": 0.4}))
        progress(ProgressEvent("train", 3, 5, {"loss": 0.3}))
        held = read()
        # ... and the newest one is written when the interval is over
        await asyncio.sleep(0.45)
        later = read()
        progress(ProgressEvent("train", 4, 5, {}))
        progress(ProgressEvent("train", 5, 5, {"loss": 0.1}))
        progress.close()
        last = read()

        assert first["step"] == 1 and first["total"] == 5 and first["metrics"] == {"loss": 0.5}
        assert set(first) == {"node", "step", "total", "metrics", "time"}
        assert held["step"] == 1
        assert later["step"] == 3
        assert last["step"] == 5 and last["metrics"] == {"loss": 0.1}
        assert [p.name for p in tmp_path.iterdir()] == ["progress.json"]  # no temp file left

    asyncio.run(main())
