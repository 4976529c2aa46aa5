"""Job folders: export/load round trips in json, yaml and toml, custom code, and broken folders."""

from __future__ import annotations

import importlib
import json
import shutil
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedcell.controllers.scatter_gather import FedAvg
from fedcell.engine.job import Job
from fedcell.engine.job_folder import CONFIG_NAMES
from fedcell.errors import ConfigError
from fedcell.executors.numpy_executor import NumpyExecutor

FORMATS = ["json", "yaml", "toml"]

# A user's own algorithms, as they would sit next to their job script (not part of fedcell).
COMPONENTS = '''
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedcell.engine.dispatcher import Controller, ControllerContext
from fedcell.errors import ConfigError


class Mode(str, enum.Enum):
    FAST = "fast"
    SAFE = "safe"


@dataclass
class Schedule:
    warmup: int = 0
    decay: float = 0.5


@dataclass
class Tuned(Controller):
    rounds: int = 1
    lr: float = 1e-10
    sites: tuple[str, ...] = ("site-1", "site-2")
    mode: Mode = Mode.SAFE
    out: Path | None = None
    note: str | None = None
    schedule: Schedule = field(default_factory=Schedule)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def task_names(self) -> tuple[str, ...]:
        return ("train",)

    def __post_init__(self) -> None:
        if self.rounds < 0:
            raise ConfigError(f"rounds must be >= 0, not {self.rounds}")

    async def run(self, ctx: ControllerContext) -> Any:
        return self.rounds


class Trainer:
    """An executor configured through the config() protocol instead of being a dataclass."""

    def __init__(self, epochs: int, tags: tuple[str, ...] = ()) -> None:
        self.epochs = epochs
        self.tags = tags

    def config(self) -> dict[str, Any]:
        return {"epochs": self.epochs, "tags": self.tags}

    @property
    def task_names(self) -> tuple[str, ...]:
        return ("train", "validate")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Trainer) and other.config() == self.config()


def local_train(params, config):
    return params, {}, 1
'''


@pytest.fixture
def user_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Import COMPONENTS as a uniquely named module from a folder outside fedcell; afterwards
    forget it (and whatever Job.load put on sys.path)."""
    name = f"user_algos_{uuid.uuid4().hex[:8]}"
    source = tmp_path / "src"
    source.mkdir()
    (source / f"{name}.py").write_text(COMPONENTS)
    monkeypatch.setattr(sys, "path", [str(source), *sys.path])
    importlib.invalidate_caches()
    module = importlib.import_module(name)
    yield module
    sys.modules.pop(name, None)


def forget(module: Any, tmp_path: Path) -> None:
    """Make the original module unreachable, as on another machine."""
    shutil.rmtree(tmp_path / "src")
    sys.path.remove(str(tmp_path / "src"))
    del sys.modules[module.__name__]
    importlib.invalidate_caches()


def full_job(algos: Any, tmp_path: Path) -> Job:
    script = tmp_path / "train.py"
    script.write_text("print('training')\n")
    job = Job("round-trip", min_sites=2)
    job.add(algos.Tuned(), name="init")
    job.add(
        algos.Tuned(
            rounds=3,
            lr=0.25,
            sites=("a", "b"),
            mode=algos.Mode.FAST,
            out=Path("models/out.pt"),
            schedule=algos.Schedule(warmup=2),
            extra={"momentum": 0.9, "layers": [1, 2], "nested": {"flag": True}},
        ),
        name="train",
        after=["init"],
        timeout=3600.5,
    )
    job.add(FedAvg(rounds=2, task_props={"local_epochs": 1}), name="fedavg", after=["init"])
    job.add_executor(algos.Trainer(epochs=4, tags=("gpu",)), sites=["site-1"])
    job.add_executor(NumpyExecutor(train=algos.local_train), sites=["site-2"])
    job.add_executor(algos.Trainer(epochs=1), tasks=["validate"], sites=["site-2"])
    job.add_file(script)
    return job


@pytest.mark.parametrize("format", FORMATS)
def test_round_trip_rebuilds_an_equal_job_from_copied_custom_code(
    format: Any, user_code: Any, tmp_path: Path
) -> None:
    # Prepare
    job = full_job(user_code, tmp_path)
    folder = tmp_path / "job"

    # Execute
    config_path = job.export(folder, format=format)
    forget(user_code, tmp_path)
    loaded = Job.load(folder)

    # Assert: the same DAG, bindings and files...
    assert config_path == folder / CONFIG_NAMES[format]
    assert (loaded.name, loaded.min_sites) == ("round-trip", 2)
    assert list(loaded.nodes) == ["init", "train", "fedavg"]
    assert loaded.nodes["train"].after == ("init",)
    assert loaded.nodes["train"].timeout == 3600.5
    assert loaded.nodes["init"].timeout is None
    assert [(b.tasks, b.sites) for b in loaded.executors] == [
        (("train", "validate"), ("site-1",)),
        (("train",), ("site-2",)),
        (("validate",), ("site-2",)),
    ]
    assert [path.read_text() for path in loaded.files] == ["print('training')\n"]
    assert loaded.files[0] == folder / "custom" / "train.py"
    # ...with components rebuilt from the copy in custom/, types preserved
    train = loaded.nodes["train"].controller
    assert type(train).__module__ == user_code.__name__
    assert sys.modules[user_code.__name__].__file__ == str(
        folder / "custom" / f"{user_code.__name__}.py"
    )
    assert train.rounds == 3 and train.lr == 0.25  # type: ignore[attr-defined]
    assert train.sites == ("a", "b")  # type: ignore[attr-defined]
    assert train.mode.value == "fast" and type(train.mode).__name__ == "Mode"  # type: ignore[attr-defined]
    assert train.out == Path("models/out.pt")  # type: ignore[attr-defined]
    assert train.note is None  # type: ignore[attr-defined]
    assert train.schedule.warmup == 2 and train.schedule.decay == 0.5  # type: ignore[attr-defined]
    assert train.extra == {"momentum": 0.9, "layers": [1, 2], "nested": {"flag": True}}  # type: ignore[attr-defined]
    assert loaded.nodes["init"].controller.lr == 1e-10  # type: ignore[attr-defined]
    assert loaded.nodes["fedavg"].controller == FedAvg(rounds=2, task_props={"local_epochs": 1})
    trainer, numpy_executor, _ = (b.executor for b in loaded.executors)
    assert trainer.config() == {"epochs": 4, "tags": ("gpu",)}
    assert numpy_executor.train.__name__ == "local_train"
    loaded.validate(["site-1", "site-2"])


@pytest.mark.parametrize("format", FORMATS)
def test_a_loaded_job_exports_to_the_same_config(
    format: Any, user_code: Any, tmp_path: Path
) -> None:
    # Prepare
    first = tmp_path / "first"
    full_job(user_code, tmp_path).export(first, format=format)

    # Execute
    Job.load(first).export(tmp_path / "second", format=format)

    # Assert
    name = CONFIG_NAMES[format]
    assert (tmp_path / "second" / name).read_text() == (first / name).read_text()
    assert sorted(p.name for p in (tmp_path / "second" / "custom").iterdir()) == sorted(
        p.name for p in (first / "custom").iterdir()
    )


def test_config_is_readable_and_names_classes_only_as_module_colon_class(
    user_code: Any, tmp_path: Path
) -> None:
    full_job(user_code, tmp_path).export(tmp_path / "job")

    config = json.loads((tmp_path / "job" / "job.json").read_text())

    assert config["format_version"] == 1
    assert config["job"] == {"name": "round-trip", "min_sites": 2}
    train = config["nodes"][1]
    assert train["controller"]["type"] == f"{user_code.__name__}:Tuned"
    assert train["controller"]["args"]["schedule"] == {
        "type": f"{user_code.__name__}:Schedule",
        "args": {"warmup": 2, "decay": 0.5},
    }
    assert train["controller"]["args"]["mode"] == "fast"
    assert train["after"] == ["init"]
    assert config["nodes"][2]["controller"]["type"] == "fedcell.controllers.scatter_gather:FedAvg"
    assert config["executors"][1]["executor"]["args"]["train"] == {
        "ref": f"{user_code.__name__}:local_train"
    }
    assert "sites" in config["executors"][0]
    # fedcell's own code is not copied; the user's module and added files are
    assert config["custom_code"] == [f"{user_code.__name__}.py"]
    assert config["files"] == ["train.py"]
    assert {p.name for p in (tmp_path / "job" / "custom").iterdir()} == {
        f"{user_code.__name__}.py",
        "train.py",
    }


def test_a_package_is_copied_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: the component lives in pkg.sub.algos and imports a sibling module
    package = f"user_pkg_{uuid.uuid4().hex[:8]}"
    root = tmp_path / "src" / package
    (root / "sub").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "sub" / "__init__.py").write_text("")
    (root / "helpers.py").write_text("ROUNDS = 7\n")
    (root / "sub" / "algos.py").write_text(
        textwrap.dedent(f"""
        from dataclasses import dataclass
        from fedcell.engine.dispatcher import Controller
        from {package}.helpers import ROUNDS

        @dataclass
        class Seven(Controller):
            rounds: int = ROUNDS

            async def run(self, ctx):
                return self.rounds
        """)
    )
    monkeypatch.setattr(sys, "path", [str(tmp_path / "src"), *sys.path])
    importlib.invalidate_caches()
    seven = importlib.import_module(f"{package}.sub.algos").Seven
    job = Job("pkg")
    job.add(seven(), name="seven")

    # Execute
    job.export(tmp_path / "job", format="yaml")
    for name in [m for m in sys.modules if m.startswith(package)]:
        del sys.modules[name]
    shutil.rmtree(tmp_path / "src")
    loaded = Job.load(tmp_path / "job")

    # Assert
    assert (tmp_path / "job" / "custom" / package / "helpers.py").is_file()
    assert loaded.nodes["seven"].controller.rounds == 7  # type: ignore[attr-defined]
    for name in [m for m in sys.modules if m.startswith(package)]:
        del sys.modules[name]


# ---------------------------------------------------------------------------- export errors


def test_export_refuses_a_non_empty_folder_and_unknown_formats(
    user_code: Any, tmp_path: Path
) -> None:
    job = full_job(user_code, tmp_path)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "old.txt").write_text("")
    with pytest.raises(ConfigError, match="not an empty folder"):
        job.export(tmp_path / "busy")
    with pytest.raises(ConfigError, match="unknown job config format 'xml'"):
        job.export(tmp_path / "new", format="xml")  # type: ignore[arg-type]
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda m: m.Tuned(extra={"w": np.zeros(3)}), r"nodes\.n\.controller\.args\.extra\.w: a ndarray is not a config value"),
        (lambda m: m.Tuned(extra={1: "x"}), r"nodes\.n\.controller\.args\.extra: dict keys must be strings"),
        (lambda m: m.Tuned(extra={"f": lambda: 0}), r"extra\.f: .*<lambda> .* cannot be found by name"),
        (lambda m: m.Tuned(extra={"x": {"type": "a", "args": {}}}), "would load as a component"),
        (lambda m: m.Tuned(extra={"x": {"ref": "a:b"}}), "would load as a component or reference"),
        (lambda m: m.Tuned(schedule=object()), "a object is not a config value"),
    ],
)  # fmt: skip
def test_export_names_the_field_it_cannot_write(
    make: Any, message: str, user_code: Any, tmp_path: Path
) -> None:
    job = Job("bad")
    job.add(make(user_code), name="n")
    with pytest.raises(ConfigError, match=message):
        job.export(tmp_path / "job")


def test_export_refuses_classes_that_cannot_be_found_by_name(
    user_code: Any, tmp_path: Path
) -> None:
    # Prepare
    class Local(user_code.Tuned):  # type: ignore[misc]
        pass

    job = Job("bad")
    job.add(Local(), name="local")
    other = Job("bad")
    other.add(user_code.Tuned(), name="n")
    other.add_executor(NotAComponent())

    # Execute / Assert
    with pytest.raises(ConfigError, match=r"nodes\.local\.controller: .*Local is defined in"):
        job.export(tmp_path / "a")
    with pytest.raises(
        ConfigError, match=r"executors\[0\]\.executor: NotAComponent cannot be exported"
    ):
        other.export(tmp_path / "b")


def test_toml_drops_none_defaults_and_refuses_other_nones(user_code: Any, tmp_path: Path) -> None:
    # Prepare
    defaults = Job("nones")
    defaults.add(user_code.Tuned(note=None, out=None), name="n")
    listed = Job("nones")
    listed.add(user_code.Tuned(extra={"x": [1, None]}), name="n")
    not_default = Job("nones")
    not_default.add(user_code.Tuned(schedule=None), name="n")

    # Execute
    defaults.export(tmp_path / "ok", format="toml")

    # Assert
    text = (tmp_path / "ok" / "job.toml").read_text()
    assert "note" not in text and "timeout" not in text
    assert Job.load(tmp_path / "ok").nodes["n"].controller.note is None  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match=r"extra\.x\[1\]: TOML cannot hold None"):
        listed.export(tmp_path / "bad1", format="toml")
    with pytest.raises(ConfigError, match=r"args\.schedule: TOML cannot hold None here"):
        not_default.export(tmp_path / "bad2", format="toml")
    not_default.export(tmp_path / "fine", format="yaml")  # yaml and json have null


# ---------------------------------------------------------------------------- load errors


class NotAComponent:
    """Neither a dataclass nor has config(): an executor a job cannot export."""

    task_names = ("train",)


def exported(user_code: Any, tmp_path: Path, format: str = "json") -> Path:
    folder = tmp_path / "job"
    full_job(user_code, tmp_path).export(folder, format=format)  # type: ignore[arg-type]
    return folder


def test_load_needs_exactly_one_config_file(user_code: Any, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        Job.load(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"must hold exactly one of .*; found none"):
        Job.load(tmp_path / "empty")
    folder = exported(user_code, tmp_path)
    (folder / "job.yaml").write_text("{}")
    with pytest.raises(ConfigError, match=r"found \['job.json', 'job.yaml'\]"):
        Job.load(folder)


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("job.json", "{not json"),
        ("job.yaml", "nodes: [unclosed"),
        ("job.toml", "nodes = = 3"),
        ("job.json", "\udcff"),
    ],
)
def test_a_config_that_does_not_parse_names_the_file(tmp_path: Path, name: str, text: str) -> None:
    (tmp_path / name).write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(ConfigError, match=f"{tmp_path / name}: cannot parse job config"):
        Job.load(tmp_path)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c.update(format_version=9), "format_version: is 9; this fedcell reads version 1"),
        (lambda c: c.update(nodes={}), "nodes: expected a list, got dict"),
        (lambda c: c.update(job=[]), "job: expected a table/mapping, got list"),
        (lambda c: c["job"].update(min_sites=0), "job: job 'round-trip': min_sites must be"),
        (lambda c: c["nodes"][0].pop("name"), r"nodes\[0\]\.name: expected a string, got NoneType"),
        (lambda c: c["nodes"][1]["controller"].update(type="no_such_module_xyz:Tuned"), r"nodes\.train\.controller\.type: cannot import module 'no_such_module_xyz'"),
        (lambda c: c["nodes"][1]["controller"].update(type="fedcell.errors:Nope"), r"module 'fedcell.errors' has no 'Nope'"),
        (lambda c: c["nodes"][1]["controller"].update(type="FedAvg"), "is not of the form 'module:Class'"),
        (lambda c: c["nodes"][1]["controller"].update(type="fedcell.errors:__all__"), "is not a class"),
        (lambda c: c["nodes"][1]["controller"]["args"].update(bogus=1), r"nodes\.train\.controller \(.*:Tuned\): .*unexpected keyword argument 'bogus'"),
        (lambda c: c["nodes"][1]["controller"]["args"].update(rounds=-1), r"nodes\.train\.controller .*rounds must be >= 0, not -1"),
        (lambda c: c["nodes"][1]["controller"].update(extra=1), "needs exactly the keys type and args"),
        (lambda c: c["nodes"][1].update(controller=c["executors"][0]["executor"]), "Trainer is not a Controller"),
        (lambda c: c["nodes"][1].update(after="init"), r"nodes\.train\.after: expected a list, got str"),
        (lambda c: c["nodes"][1].update(timeout=-5), r"nodes\.train: node 'train': timeout must be a positive number"),
        (lambda c: c["nodes"][2].update(name="train"), "node name 'train' is used twice"),
        (lambda c: c["executors"][0].update(tasks=["fly"]), r"executors\[0\]: .*not \['fly'\]"),
        (lambda c: c["executors"][0]["executor"]["args"].update(train={"ref": "fedcell.errors:nope"}), r"executors\[0\]\.executor\.args\.train\.ref: module 'fedcell.errors' has no 'nope'"),
        (lambda c: c["files"].append("gone.py"), "custom/gone.py is missing"),
        (lambda c: c["files"].append("../job.json"), r"files: '\.\./job\.json' is not a plain file name"),
        (lambda c: c.update(executor=[]), r"top level: unknown key\(s\) \['executor'\]"),
        (lambda c: c["job"].update(min_site=2), r"job: unknown key\(s\) \['min_site'\]"),
        (lambda c: c["nodes"][1].update(depends=["init"]), r"nodes\.train: unknown key\(s\) \['depends'\]"),
        (lambda c: c["executors"][0].update(site=["site-1"]), r"executors\[0\]: unknown key\(s\) \['site'\]"),
    ],
)  # fmt: skip
def test_a_broken_config_raises_config_error_naming_file_and_field(
    edit: Any, message: str, user_code: Any, tmp_path: Path
) -> None:
    # Prepare
    folder = exported(user_code, tmp_path)
    config = json.loads((folder / "job.json").read_text())
    edit(config)
    (folder / "job.json").write_text(json.dumps(config))

    # Execute / Assert
    with pytest.raises(ConfigError, match=message) as caught:
        Job.load(folder)
    assert str(folder / "job.json") in str(caught.value)


def test_missing_custom_code_is_reported_before_anything_is_imported(
    user_code: Any, tmp_path: Path
) -> None:
    folder = exported(user_code, tmp_path, format="yaml")
    (folder / "custom" / f"{user_code.__name__}.py").unlink()
    with pytest.raises(ConfigError, match=f"custom/{user_code.__name__}.py is missing"):
        Job.load(folder)


def test_adding_the_custom_module_as_a_file_ships_it_once(user_code: Any, tmp_path: Path) -> None:
    # Prepare
    job = Job("both")
    job.add(user_code.Tuned(rounds=5), name="n")
    job.add_file(user_code.__file__)

    # Execute
    job.export(tmp_path / "job")
    forget(user_code, tmp_path)
    loaded = Job.load(tmp_path / "job")

    # Assert
    config = json.loads((tmp_path / "job" / "job.json").read_text())
    assert config["custom_code"] == config["files"] == [f"{user_code.__name__}.py"]
    assert loaded.nodes["n"].controller.rounds == 5  # type: ignore[attr-defined]


def test_an_added_file_may_not_shadow_a_custom_module(user_code: Any, tmp_path: Path) -> None:
    impostor = tmp_path / "other" / f"{user_code.__name__}.py"
    impostor.parent.mkdir()
    impostor.write_text("")
    job = Job("clash")
    job.add(user_code.Tuned(), name="n")
    job.add_file(impostor)
    with pytest.raises(ConfigError, match=f"would both be custom/{user_code.__name__}.py"):
        job.export(tmp_path / "job")
