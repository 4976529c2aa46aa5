"""Fixtures of the executor tests: the folder of Client-API fixture scripts."""

from __future__ import annotations

from pathlib import Path

import pytest

SCRIPTS = Path(__file__).parent / "scripts"


@pytest.fixture
def scripts() -> Path:
    """The folder holding the fixture training scripts."""
    return SCRIPTS
