"""``python -m fedcell.cli``: the same as the ``fedcell`` command."""

from __future__ import annotations

from fedcell.cli import main

main()
