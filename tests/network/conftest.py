"""Fixtures of the network tests: a namespace lab, removed after each test whatever happened."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from netns import Lab, netns_unavailable


@pytest.fixture
def lab() -> Iterator[Lab]:
    """A fresh :class:`~netns.Lab`; skips the test where namespaces cannot be made."""
    reason = netns_unavailable()
    if reason is not None:
        pytest.skip(reason)
    with Lab() as network:
        yield network
