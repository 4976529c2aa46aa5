"""Experiment tracking from a Client-API script: ``from fedcell.client.tracking import
SummaryWriter`` in place of TensorBoard's (or NVIDIA FLARE's) ``SummaryWriter``.

Each call becomes one :func:`fedcell.client.log` record, which the site writes to its log; the
script needs no tracking server of its own. ``flare.init()`` must have been called.
"""

from __future__ import annotations

from typing import Any

from fedcell.client import log
from fedcell.client.api import AnalyticsDataType

__all__ = ["SummaryWriter"]


class SummaryWriter:
    """The scalar calls of TensorBoard's ``SummaryWriter``, sent to the site."""

    def add_scalar(self, tag: str, scalar: Any, global_step: int | None = None, **kwargs: Any) -> None:
        """Record one scalar under ``tag``.

        Raises
        ------
        ConfigError
            If ``flare.init()`` was not called.
        """
        log(tag, scalar, AnalyticsDataType.SCALAR, global_step=global_step, **kwargs)

    def add_scalars(
        self, main_tag: str, tag_scalar_dict: dict[str, Any], global_step: int | None = None, **kwargs: Any
    ) -> None:
        """Record several scalars under ``main_tag``.

        Raises
        ------
        ConfigError
            If ``flare.init()`` was not called.
        """
        log(main_tag, dict(tag_scalar_dict), AnalyticsDataType.SCALARS, global_step=global_step, **kwargs)

    def flush(self) -> None:
        """Records leave at each call; there is nothing to flush."""
