"""The layering rule, checked in fresh interpreters: lower layers never import upper ones."""

from __future__ import annotations

import subprocess
import sys

import pytest

UPPER = {
    "fedcell.transports": (
        "fedcell.engine",
        "fedcell.controllers",
        "fedcell.executors",
        "fedcell.client",
        "fedcell.deploy",
    ),
    "fedcell.engine": (
        "fedcell.controllers",
        "fedcell.executors",
        "fedcell.client",
        "fedcell.deploy",
    ),
}


def imported_after(module: str) -> set[str]:
    code = (
        "import importlib, pkgutil, sys\n"
        f"package = importlib.import_module({module!r})\n"
        "for info in pkgutil.walk_packages(package.__path__, package.__name__ + '.'):\n"
        "    importlib.import_module(info.name)\n"
        "print('\\n'.join(sorted(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


@pytest.mark.parametrize("lower", sorted(UPPER))
def test_lower_layers_import_no_upper_layer(lower: str) -> None:
    loaded = imported_after(lower)
    offending = sorted(m for m in loaded if m.startswith(UPPER[lower]))
    assert not offending, f"{lower} (and its submodules) imported {offending}"
