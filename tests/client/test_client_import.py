"""``import fedcell.client`` sits at the top of every training script: it must be cheap."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

PROBE = """
import json, sys, time
wall, cpu = time.perf_counter(), time.process_time()
import fedcell.client
print(json.dumps({
    "wall": time.perf_counter() - wall,
    "cpu": time.process_time() - cpu,
    "torch": "torch" in sys.modules,
    "zmq": "zmq" in sys.modules,
}))
"""


@pytest.mark.integration
def test_import_is_fast_and_loads_neither_torch_nor_zmq() -> None:
    """Budget: 0.3 s. It is checked on the CPU time of the import, the best of three fresh
    interpreters: wall time on a shared 2-core CI machine mostly measures the neighbours."""
    # Prepare / Execute
    runs = [
        json.loads(
            subprocess.run(
                [sys.executable, "-c", PROBE], check=True, capture_output=True, text=True
            ).stdout
        )
        for _ in range(3)
    ]

    # Assert
    assert not any(run["torch"] for run in runs), "import fedcell.client imported torch"
    assert not any(run["zmq"] for run in runs), "import fedcell.client imported pyzmq"
    assert min(run["cpu"] for run in runs) <= 0.3, runs
    assert min(run["wall"] for run in runs) <= 1.0, runs
