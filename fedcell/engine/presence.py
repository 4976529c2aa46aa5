"""Which of a job's sites are there: the job's server waits for them all, and tells its runner
when one is lost or comes back.

Two sources behind one interface (:class:`SitePresence`), chosen by how the sites reach the
job's server cell:

:class:`NeighbourPresence`
    The site cells connect to the job's server cell itself (the simulator, ``job_process
    --listen``): the cell's peer listener says who joined and left, within the cell's peer
    timeout or at once when a link closes.
:class:`RemotePresence`
    The sites are cells elsewhere in the tree (a deployment: the job process ``server.job-<id>``
    and each ``site-1.job-<id>`` are children of the server daemon, which relays between them),
    so no peer event ever names them here. Each site cell is pinged through the tree on
    :data:`~fedcell.engine.cell_dispatcher.PRESENCE_CHANNEL` (its
    :class:`~fedcell.engine.site_runtime.SiteRuntime` answers) every ``interval`` seconds. Join =
    the first answer; loss = an :class:`~fedcell.errors.UnreachableError` (the relay that no
    longer routes to the cell answers so at once, and the server daemon's heartbeats declare a
    silent cell gone within its peer timeout) or no answer within ``timeout``. One ping per
    site per interval costs a few hundred microseconds of two event loops: noise next to
    training.

Listeners get plain site names (``site-1``) whatever the cells are called, and are called on
the event loop. Tasks already in flight to a lost site fail by themselves (the cell answers the
pending request with ``UnreachableError``); presence is what lets the runner's k-of-n rule
decide whether the job goes on (:meth:`~fedcell.engine.job_runner.JobRunner.site_lost`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence

from fedcell.engine.cell_dispatcher import PRESENCE_CHANNEL
from fedcell.errors import CellError, ConfigError, RemoteError
from fedcell.transports.cell import Cell, PeerEvent

__all__ = [
    "NeighbourPresence",
    "PresenceListener",
    "RemotePresence",
    "SitePresence",
    "reachable",
]

logger = logging.getLogger(__name__)

#: ``listener(site, "joined" | "left")``.
PresenceListener = Callable[[str, PeerEvent], None]


class SitePresence(ABC):
    """Which of ``sites`` are present now; listeners hear every change.

    Parameters
    ----------
    sites:
        The job's sites.
    cell_names:
        Site → the cell that serves the job there (default: the site's own name).
    """

    def __init__(self, sites: Sequence[str], cell_names: Mapping[str, str] | None = None) -> None:
        if not sites:
            raise ConfigError("presence of no sites: a job needs at least one site")
        self.sites = tuple(sites)
        self.cell_names = {site: (cell_names or {}).get(site, site) for site in self.sites}
        self.present: set[str] = set()
        self._listeners: list[PresenceListener] = []
        self._changed = asyncio.Event()

    def add_listener(self, listener: PresenceListener) -> None:
        """Call ``listener(site, "joined" | "left")`` on every change from now on."""
        self._listeners.append(listener)

    def remove_listener(self, listener: PresenceListener) -> None:
        """Stop calling ``listener`` (no error if it was not added)."""
        with contextlib.suppress(ValueError):
            self._listeners.remove(listener)

    def _record(self, site: str, event: PeerEvent) -> None:
        if (event == "joined") == (site in self.present):
            return
        if event == "joined":
            self.present.add(site)
        else:
            self.present.discard(site)
        logger.info("site %s %s", site, event)
        self._changed.set()
        for listener in list(self._listeners):
            listener(site, event)

    async def wait_until(self, *, everyone: bool, timeout: float) -> bool:
        """Wait until every site is present (``everyone``) or none is; ``False`` on timeout."""
        target = set(self.sites) if everyone else set()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.present != target:
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), max(deadline - loop.time(), 0))
            except TimeoutError:
                return False
        return True

    @abstractmethod
    async def start(self) -> None:
        """Begin watching."""

    @abstractmethod
    async def stop(self) -> None:
        """Stop watching (idempotent)."""


class NeighbourPresence(SitePresence):
    """Presence from the peer events of ``cell``, whose neighbours the site cells are.

    Created before the cell starts, it sees sites that were already waiting join at once.
    """

    def __init__(
        self, cell: Cell, sites: Sequence[str], cell_names: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(sites, cell_names)
        self._cell = cell
        self._site_of = {name: site for site, name in self.cell_names.items()}
        cell.add_peer_listener(self._on_peer)

    def _on_peer(self, name: str, event: PeerEvent) -> None:
        site = self._site_of.get(name)
        if site is not None:
            self._record(site, event)

    async def start(self) -> None:
        for site, name in self.cell_names.items():
            if name in self._cell.peers:
                self._record(site, "joined")

    async def stop(self) -> None:
        self._cell.remove_peer_listener(self._on_peer)


class RemotePresence(SitePresence):
    """Presence by pinging each site cell through the cell tree (see the module docstring).

    Parameters
    ----------
    cell:
        The job's server cell (started before :meth:`start`).
    sites, cell_names:
        As for :class:`SitePresence`.
    interval:
        Seconds between the pings of one site.
    timeout:
        Seconds without an answer after which a present site is lost.
    """

    def __init__(
        self,
        cell: Cell,
        sites: Sequence[str],
        cell_names: Mapping[str, str] | None = None,
        *,
        interval: float = 1.0,
        timeout: float = 5.0,
    ) -> None:
        if not (interval > 0 and timeout > 0):
            raise ConfigError(f"presence interval and timeout must be > 0, not {interval}, {timeout}")
        super().__init__(sites, cell_names)
        self._cell = cell
        self._interval = interval
        self._timeout = timeout
        self._watchers: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._watchers = [loop.create_task(self._watch(site)) for site in self.sites]

    async def stop(self) -> None:
        watchers, self._watchers = self._watchers, []
        for watcher in watchers:
            watcher.cancel()
        await asyncio.gather(*watchers, return_exceptions=True)

    async def _watch(self, site: str) -> None:
        name = self.cell_names[site]
        while True:
            there = await reachable(self._cell, name, timeout=self._timeout)
            self._record(site, "joined" if there else "left")
            await asyncio.sleep(self._interval)


async def reachable(cell: Cell, name: str, *, timeout: float) -> bool:
    """Whether the cell ``name`` answers a presence ping from ``cell`` within ``timeout``.

    Any answer counts, an error reply too (the cell is there, even if it serves no presence
    handler); no route, a relay saying the cell is gone, or silence does not.
    """
    try:
        await cell.request(name, PRESENCE_CHANNEL, timeout=timeout)
    except RemoteError:
        return True
    except CellError as exc:
        logger.debug("%s does not answer: %s", name, exc)
        return False
    return True
