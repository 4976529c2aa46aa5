"""Ready job templates: ``fedcell job create -t NAME DIR`` writes a job folder to start from.

A template is a Python builder returning a :class:`~fedcell.engine.job.Job`, like any job written
in Python; :func:`create` exports it with :meth:`Job.export` (JSON, YAML or TOML). The training
scripts and model files are package data (``fedcell/templates/files/``) added to the job with
``job.add_file``, so the created folder holds its own copies in ``custom/``: edit them there, run
``fedcell simulate DIR -n 2``, then ``fedcell job submit DIR``.

| template | nodes | what it shows |
|---|---|---|
| ``fedavg-pytorch`` | ``train`` (FedAvg) | a Client-API script (``fl_train.py``) training a tiny torch model on synthetic data |
| ``cyclic`` | ``cyclic`` (Cyclic) | one model relayed site to site, lap after lap |
| ``cross-site-eval`` | ``train`` (FedAvg) → ``cross_site`` (CrossSiteEval) | the global model and every site's local model evaluated at every site |
| ``split-learning`` | ``split`` (SplitLearning) | a network cut between a data site and a label site |

Sites: a template is written for any number of sites (executors bound to every site) unless
:func:`create` gets ``sites``: a count sets the job's ``min_sites``; names bind the executors to
exactly those sites (the job then runs there and nowhere else) and set ``min_sites`` to their
number. Split learning needs exactly two sites: the first holds the features, the second the
labels (default ``site-1``, ``site-2``).

Templates are small on purpose (hundreds of samples, a few rounds): each runs in seconds with
``fedcell simulate DIR -n 2``, and the tests run every one that way.
"""

from __future__ import annotations

import importlib.util
import re
import sys
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from fedcell.engine.job import ConfigFormat, Job
from fedcell.errors import ConfigError

__all__ = ["FILES", "TEMPLATES", "Template", "create", "parse_sites"]

#: The package-data folder holding the templates' scripts and model files.
FILES = Path(__file__).resolve().parent / "files"

_SITE_NAME = re.compile(r"[A-Za-z0-9_-]{1,63}")

Sites = int | tuple[str, ...] | None
"""What :func:`create` takes: ``None`` (any sites), a count, or site names."""


@dataclass(frozen=True)
class Template:
    """A named job builder.

    Attributes
    ----------
    name:
        What ``-t`` takes.
    description:
        One line for ``fedcell job templates``.
    nodes:
        The DAG in words (node names and controllers).
    build:
        ``build(sites) -> Job``; ``sites`` as :func:`create` takes it.
    """

    name: str
    description: str
    nodes: str
    build: Callable[[Sites], Job]


def parse_sites(text: str | None) -> Sites:
    """Read ``--sites``: a count (``3``) or comma-separated names (``site-a,site-b``).

    Raises
    ------
    ConfigError
        A count below 1, an empty or invalid name, or a name given twice.
    """
    if text is None:
        return None
    text = text.strip()
    if text.isdigit():
        count = int(text)
        if count < 1:
            raise ConfigError(f"--sites {text}: a job needs at least one site")
        return count
    names = tuple(name.strip() for name in text.split(","))
    for name in names:
        if not _SITE_NAME.fullmatch(name):
            raise ConfigError(
                f"--sites {text!r}: {name!r} is not a site name (letters, digits, '_', '-')"
            )
    if len(set(names)) != len(names):
        raise ConfigError(f"--sites {text!r} names a site twice")
    return names


def _site_binding(sites: Sites) -> tuple[int, tuple[str, ...] | None]:
    """``(min_sites, executor sites)`` for ``sites``."""
    if sites is None:
        return 1, None
    if isinstance(sites, int):
        return sites, None
    return len(sites), sites


def _fedavg_pytorch(sites: Sites) -> Job:
    from fedcell.controllers import FedAvg
    from fedcell.executors.script_runner import ScriptRunner

    min_sites, bound = _site_binding(sites)
    job = Job("fedavg-pytorch", min_sites=min_sites)
    job.add(FedAvg(rounds=3, model="net:Net"), name="train")
    job.add_executor(ScriptRunner(script="fl_train.py"), tasks=("train",), sites=bound)
    job.add_file(FILES / "fl_train.py")
    job.add_file(FILES / "net.py")
    return job


def _cyclic(sites: Sites) -> Job:
    from fedcell.controllers import Cyclic
    from fedcell.executors.script_runner import ScriptRunner

    min_sites, bound = _site_binding(sites)
    job = Job("cyclic", min_sites=min_sites)
    job.add(Cyclic(rounds=2, model="net:Net"), name="cyclic")
    job.add_executor(ScriptRunner(script="fl_train.py"), tasks=("train",), sites=bound)
    job.add_file(FILES / "fl_train.py")
    job.add_file(FILES / "net.py")
    return job


def _cross_site_eval(sites: Sites) -> Job:
    from fedcell.controllers import CrossSiteEval, FedAvg
    from fedcell.executors.script_runner import ScriptRunner

    min_sites, bound = _site_binding(sites)
    job = Job("cross-site-eval", min_sites=min_sites)
    job.add(FedAvg(rounds=2, model="net:Net"), name="train")
    job.add(CrossSiteEval(models="both", metric="accuracy"), name="cross_site", after=["train"])
    job.add_executor(ScriptRunner(script="fl_train_eval.py"), sites=bound)
    job.add_file(FILES / "fl_train_eval.py")
    job.add_file(FILES / "net.py")
    return job


def _split_learning(sites: Sites) -> Job:
    from fedcell.controllers.split_learning import SplitLearning
    from fedcell.executors.split_learning import SplitDataExecutor, SplitLabelExecutor

    if sites is None or sites == 2:
        data_site, label_site = "site-1", "site-2"
    elif isinstance(sites, tuple) and len(sites) == 2:
        data_site, label_site = sites
    else:
        raise ConfigError(
            f"split-learning runs on exactly two sites (data site, label site), not {sites!r}"
        )
    halves = _files_module("split_halves")
    job = Job("split-learning", min_sites=2)
    job.add(
        SplitLearning(data_site=data_site, label_site=label_site, epochs=2, batch_size=64),
        name="split",
    )
    optimizer_args = {"lr": 0.3}
    job.add_executor(
        SplitDataExecutor(
            model=halves.bottom,
            features=halves.features,
            optimizer_args=optimizer_args,
            save_as="bottom.pt",
        ),
        sites=[data_site],
    )
    job.add_executor(
        SplitLabelExecutor(
            model=halves.top,
            labels=halves.labels,
            optimizer_args=optimizer_args,
            save_as="top.pt",
        ),
        sites=[label_site],
    )
    return job


def _files_module(name: str) -> types.ModuleType:
    """Import ``files/<name>.py`` as the top-level module ``name``.

    Executors refer to its functions as ``name:function``; a top-level module that is not part
    of an installed distribution is shipped in the job's ``custom/`` on export.
    """
    path = FILES / f"{name}.py"
    loaded = sys.modules.get(name)
    if loaded is not None:
        if Path(getattr(loaded, "__file__", "") or "").resolve() == path:
            return loaded
        raise ConfigError(
            f"another module named {name!r} is already imported ({loaded.__file__}); create "
            "this template from a fresh process (fedcell job create)"
        )
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"the template file {path} is missing from the installation")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


TEMPLATES: dict[str, Template] = {
    template.name: template
    for template in (
        Template(
            "fedavg-pytorch",
            "FedAvg of a Client-API script (tiny torch model, synthetic data)",
            "train (FedAvg)",
            _fedavg_pytorch,
        ),
        Template(
            "cyclic",
            "one model trained site after site, lap after lap",
            "cyclic (Cyclic)",
            _cyclic,
        ),
        Template(
            "cross-site-eval",
            "FedAvg, then every model evaluated at every site",
            "train (FedAvg) → cross_site (CrossSiteEval)",
            _cross_site_eval,
        ),
        Template(
            "split-learning",
            "a network cut between a data site and a label site",
            "split (SplitLearning)",
            _split_learning,
        ),
    )
}


def create(
    name: str, directory: str | Path, *, format: ConfigFormat = "json", sites: Sites = None
) -> Path:
    """Write template ``name`` as a job folder in ``directory``; return the config file's path.

    Parameters
    ----------
    name:
        A key of :data:`TEMPLATES`.
    directory:
        The job folder to write (created; must be empty if it exists).
    format:
        The config format: ``json``, ``yaml`` or ``toml``.
    sites:
        ``None`` (any sites), a count (the job's ``min_sites``) or site names (executors bound
        to exactly those sites); see the module docstring.

    Raises
    ------
    ConfigError
        An unknown template, sites the template cannot run on, or a ``directory`` that is not
        empty (and anything :meth:`Job.export` refuses).
    """
    template = TEMPLATES.get(name)
    if template is None:
        raise ConfigError(f"unknown job template {name!r}; templates: {', '.join(TEMPLATES)}")
    job = template.build(sites)
    job.validate(_planned_sites(job, sites))
    return job.export(directory, format=format)


def _planned_sites(job: Job, sites: Sites) -> Sequence[str]:
    """The sites the job is checked against before it is written."""
    if isinstance(sites, tuple):
        return sites
    count = sites if isinstance(sites, int) else job.min_sites
    return [f"site-{i}" for i in range(1, max(count, job.min_sites, 1) + 1)]
