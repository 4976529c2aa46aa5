"""The Client API called where no fedcell site runs the script: clear errors, not hangs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import fedcell.client as flare
from fedcell.errors import ConfigError
from fedcell.executors.script_protocol import ENV_URL


def test_calls_before_init_say_to_call_init(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_URL, raising=False)
    for call in (flare.receive, flare.is_running, flare.system_info, flare.get_site_name):
        with pytest.raises(ConfigError, match=r"call flare\.init\(\)"):
            call()
    with pytest.raises(ConfigError, match="not initialized"):
        flare.send(flare.FLModel(params={}))


def test_init_outside_a_site_says_how_to_run_the_script(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_URL, raising=False)
    with pytest.raises(ConfigError, match="ScriptRunner") as raised:
        flare.init()
    assert "python train.py" in str(raised.value)


@pytest.mark.integration
def test_script_started_directly_fails_at_init_with_the_explanation(tmp_path: Path) -> None:
    # Prepare
    script = tmp_path / "train.py"
    script.write_text("import fedcell.client as flare\nflare.init()\n")

    # Execute
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(flare.__file__).parents[2])}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env)

    # Assert
    assert done.returncode == 1
    assert "ConfigError: flare.init() found no fedcell site to serve" in done.stderr
