"""``import fedcell.client`` sits at the top of every training script: it must be cheap."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

PROBE = """
import json, sys, time
started = time.perf_counter()
import fedcell.client
elapsed = time.perf_counter() - started
print(json.dumps({"seconds": elapsed, "torch": "torch" in sys.modules, "zmq": "zmq" in sys.modules}))
"""


@pytest.mark.integration
def test_import_is_fast_and_loads_neither_torch_nor_zmq() -> None:
    # Prepare / Execute: fresh interpreters (the best of three, the machine is shared)
    runs = [
        json.loads(subprocess.run([sys.executable, "-c", PROBE], check=True, capture_output=True, text=True).stdout)
        for _ in range(3)
    ]

    # Assert
    assert not any(run["torch"] for run in runs), "import fedcell.client imported torch"
    assert not any(run["zmq"] for run in runs), "import fedcell.client imported pyzmq"
    assert min(run["seconds"] for run in runs) <= 0.3, runs
