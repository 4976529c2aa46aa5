"""Progress of running DAG nodes: what controllers report, and the live display.

A controller reports with ``ctx.report(step, total, metrics)`` (see
:class:`~fedcell.engine.dispatcher.ControllerContext`); the job runner stamps the node name and
hands a :class:`ProgressEvent` to whoever listens. :class:`ProgressSink` is the listener the
simulator and CLI use: a rich progress bar per node (rounds done / total, latest metrics), or
nothing when disabled (tests, ``--quiet``), so reporting costs a function call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

__all__ = ["ProgressEvent", "ProgressSink"]


@dataclass(frozen=True)
class ProgressEvent:
    """``node`` completed ``step`` of ``total`` (``None``: unknown), with its latest metrics."""

    node: str
    step: int
    total: int | None = None
    metrics: dict[str, Any] = field(default_factory=dict)


class ProgressSink:
    """A live display of :class:`ProgressEvent`s (a no-op when ``enabled`` is false); each event
    is also handed to ``forward`` when given."""

    def __init__(
        self, *, enabled: bool = True, forward: Callable[[ProgressEvent], None] | None = None
    ) -> None:
        self.enabled = enabled
        self._forward = forward
        self._progress: Any = None
        self._bars: dict[str, Any] = {}

    def __enter__(self) -> ProgressSink:
        if self.enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
            )

            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("{task.fields[metrics]}"),
            )
            self._progress.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def report(self, event: ProgressEvent) -> None:
        """Forward ``event`` and update the node's bar."""
        if self._forward is not None:
            self._forward(event)
        if self._progress is None:
            return
        shown = "  ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in event.metrics.items()
        )
        bar = self._bars.get(event.node)
        if bar is None:
            bar = self._progress.add_task(event.node, total=event.total, metrics=shown)
            self._bars[event.node] = bar
        self._progress.update(bar, completed=event.step, total=event.total, metrics=shown)
