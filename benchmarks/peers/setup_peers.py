"""Create the peers' private virtualenvs (NVIDIA FLARE 2.9.0, Flower 1.42.0) for the benchmarks.

The peers are measured, never depended on: each lives in its own virtualenv under a cache folder
(``$FEDCELL_PEERS_HOME``, default ``~/.cache/fedcell-peers``), one per peer, never in fedcell's
``.venv`` and never in fedcell's dependencies.

Install order matters. ``torch==2.13.0`` goes in first, from the CPU wheel that pip's configured
``find-links`` holds on local disk (``2.13.0+cpu`` satisfies ``==2.13.0``): that step runs with
``--no-index``, so a machine without the local wheel fails at once instead of downloading the
registry's multi-GB CUDA build; torch's own dependencies follow from the index. The peer follows with a constraints file pinning ``torch==2.13.0`` so its
resolver can never swap in a multi-GB CUDA torch. After the install, the venv's torch is checked to
be a CPU build; a venv that fails the check is not marked ready.

Idempotent: a finished venv carries a marker file naming what was installed; a later call with the
same specification reuses it at once, and a half-built venv (no marker) is rebuilt from scratch.

Run ``python -m benchmarks.peers setup [nvflare] [flower]`` from the repository root.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import venv
from pathlib import Path

PEERS_HOME_ENV = "FEDCELL_PEERS_HOME"
TORCH_PIN = "torch==2.13.0"
PEER_REQUIREMENTS: dict[str, tuple[str, ...]] = {
    "nvflare": ("nvflare==2.9.0",),
    "flower": ("flwr[simulation]==1.42.0",),
}
READY_MARKER = "fedcell-peer-ready.txt"
INSTALL_TIMEOUT_S = 3600.0


class PeerSetupError(RuntimeError):
    """A peer virtualenv could not be created or failed its post-install check."""


def peers_home() -> Path:
    """Return the cache folder that holds one virtualenv per peer."""
    configured = os.environ.get(PEERS_HOME_ENV)
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "fedcell-peers"


def peer_venv_dir(name: str) -> Path:
    """Return the virtualenv folder of peer ``name`` (``nvflare`` or ``flower``).

    Raises
    ------
    PeerSetupError
        If ``name`` is not a known peer.
    """
    if name not in PEER_REQUIREMENTS:
        raise PeerSetupError(f"unknown peer {name!r}; known peers: {sorted(PEER_REQUIREMENTS)}")
    return peers_home() / name


def peer_python(name: str) -> Path:
    """Return the interpreter of peer ``name``'s virtualenv (it may not exist yet)."""
    return peer_venv_dir(name) / "bin" / "python"


def _install_spec(name: str) -> str:
    return "\n".join((TORCH_PIN, *PEER_REQUIREMENTS[name])) + "\n"


def is_peer_ready(name: str) -> bool:
    """Return whether peer ``name``'s virtualenv is fully installed with the current spec."""
    marker = peer_venv_dir(name) / READY_MARKER
    return marker.is_file() and marker.read_text() == _install_spec(name)


def _pip(python: Path, *args: str, log: Path) -> None:
    command = [str(python), "-m", "pip", "install", "--disable-pip-version-check", *args]
    with log.open("a") as log_file:
        log_file.write(f"$ {' '.join(command)}\n")
        log_file.flush()
        try:
            completed = subprocess.run(
                command, stdout=log_file, stderr=subprocess.STDOUT,
                timeout=INSTALL_TIMEOUT_S, check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise PeerSetupError(f"pip install {' '.join(args)} timed out; see {log}") from exc
    if completed.returncode != 0:
        raise PeerSetupError(
            f"pip install {' '.join(args)} exited {completed.returncode}; see {log}"
        )


def _check_cpu_torch(python: Path) -> None:
    probe = "import torch, sys; sys.stdout.write(f'{torch.__version__} {torch.version.cuda}')"
    completed = subprocess.run(
        [str(python), "-c", probe], capture_output=True, text=True, timeout=300, check=False
    )
    if completed.returncode != 0:
        raise PeerSetupError(f"torch does not import in {python}: {completed.stderr[-2000:]}")
    version, cuda = completed.stdout.split()
    if not version.startswith("2.13.0") or cuda != "None":
        raise PeerSetupError(f"{python} got torch {version} (cuda {cuda}); expected 2.13.0 CPU")


def ensure_peer(name: str) -> Path:
    """Create (or reuse) peer ``name``'s virtualenv and return its python interpreter.

    Parameters
    ----------
    name
        ``"nvflare"`` or ``"flower"``.

    Returns
    -------
    Path
        The virtualenv's ``bin/python``.

    Raises
    ------
    PeerSetupError
        If the name is unknown, an install step fails or times out, or the installed torch is not
        the 2.13.0 CPU build. The install log sits next to the venv (``<name>-install.log``).
    """
    venv_dir = peer_venv_dir(name)
    python = peer_python(name)
    if is_peer_ready(name):
        return python
    if venv_dir.exists():
        shutil.rmtree(venv_dir)
    venv_dir.parent.mkdir(parents=True, exist_ok=True)
    log = venv_dir.parent / f"{name}-install.log"
    log.write_text("")
    venv.EnvBuilder(with_pip=True, clear=True).create(venv_dir)
    constraints = venv_dir / "constraints.txt"
    constraints.write_text(TORCH_PIN + "\n")
    try:
        _pip(python, "--no-index", "--no-deps", "--only-binary=torch", TORCH_PIN, log=log)
    except PeerSetupError as exc:
        raise PeerSetupError(
            f"no local wheel of {TORCH_PIN} on pip's find-links (a registry torch may be a "
            "multi-GB CUDA build); add a folder holding the CPU wheel to PIP_FIND_LINKS"
        ) from exc
    _pip(python, TORCH_PIN, log=log)  # torch's own dependencies, from the index
    _pip(python, "-c", str(constraints), *PEER_REQUIREMENTS[name], log=log)
    _check_cpu_torch(python)
    (venv_dir / READY_MARKER).write_text(_install_spec(name))
    return python
