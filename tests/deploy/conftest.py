"""Fixtures of the deployment tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from deploy_helpers import provisioned_kits


@pytest.fixture
def kits(tmp_path: Path) -> Path:
    """The test project's kits (server on a free port), provisioned under ``tmp_path``."""
    return provisioned_kits(tmp_path)
