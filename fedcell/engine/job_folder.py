"""Job folders: a job written to disk as one config file plus its custom code, and read back.

Layout::

    my-job/
        job.json | job.yaml | job.toml     the config (exactly one)
        custom/                            custom code and the files added with Job.add_file

Config (shown as YAML; JSON and TOML hold the same tree)::

    format_version: 1
    job: {name: cifar10, min_sites: 2}    # wall_time: 6h, memory: 16GiB (optional: a deployed
                                          # job's resource asks, read by each site's policy)
    nodes:
      - name: train
        controller: {type: "my_algos:FedAvgPlus", args: {rounds: 5, lr: 0.01}}
        after: [init]
        timeout: 3600                     # optional
    executors:
      - executor: {type: "fedcell.executors.torch_executor:TorchExecutor", args: {...}}
        tasks: [train, validate]
        sites: [site-1, site-2]           # optional: every site
    custom_code: [my_algos.py]
    files: [train.py]

A job loaded from a folder keeps ``files`` pointing at the copies in its ``custom/``, so it can be
exported again unchanged.

**Components describe themselves by their constructor arguments.** A controller or executor is
either a dataclass (its ``init`` fields are its arguments) or a class with a ``config()`` method
returning the keyword arguments that rebuild it: ``type(obj)(**obj.config())``. The config names
its class as ``"module:QualName"``: job folders are the export format, the one place where the
engine wires components by dotted path (in Python, jobs are wired with objects). Argument
values must be config values: ``None``, ``bool``, ``int``, ``float``, ``str``, lists/tuples and
``str``-keyed dicts of those, ``pathlib`` paths and enum members (written as their value and
converted back using the class's type annotations, as tuples are), nested components (written
as ``{type, args}`` the same way), or module-level functions and classes (written as
``{ref: "module:QualName"}``, e.g. the training function of a ``NumpyExecutor``). Anything else
(an array, a lambda, a live model object) raises :class:`~fedcell.errors.ConfigError` at export,
naming the field. TOML has no null: a ``None`` argument whose default is ``None`` is left out,
any other ``None`` is refused.

**Custom code.** Every class a component uses is imported from its module on load. A module
whose top-level package is part of the standard library or of an installed distribution
(fedcell included, also when installed in editable mode) is expected at the loading side. Any
other module's top-level package folder (or lone module file) is copied into ``custom/``, which
:func:`load_job` puts at the front of ``sys.path`` (once; it stays there so the job's code can
import its own modules later). Files added with ``Job.add_file`` land there too, so a model named
by path (``FedAvg(model="model:Net")`` with ``model.py`` added) imports in a job server process.
Classes defined in ``__main__`` or inside a function cannot be found by name and are refused at
export. A module already imported under the same name is used as it is.

Loading trusts the folder: importing custom code runs it. Whether a site may run a job's custom
code is the site policy's decision, made before the folder is loaded.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
import importlib.metadata
import inspect
import json
import shutil
import sys
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path, PurePath
from typing import Any, get_args, get_origin

import tomli_w
import yaml

from fedcell.engine.dispatcher import Controller
from fedcell.engine.job import ConfigFormat, Job
from fedcell.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = ["CONFIG_NAMES", "CUSTOM_DIR", "FORMAT_VERSION", "export_job", "load_job"]

FORMAT_VERSION = 1
CUSTOM_DIR = "custom"
#: config file name per format
CONFIG_NAMES: dict[str, str] = {"json": "job.json", "yaml": "job.yaml", "toml": "job.toml"}

_SCALARS = (bool, int, float, str)
_TOP_KEYS = frozenset({"format_version", "job", "nodes", "executors", "custom_code", "files"})
#: ``wall_time`` and ``memory`` are resource asks for the sites' policies (read by their daemons
#: from the config, :func:`fedcell.deploy.job_archive.job_meta`); loading accepts and skips them.
_JOB_KEYS = frozenset({"name", "min_sites", "wall_time", "memory"})
_NODE_KEYS = frozenset({"name", "controller", "after", "timeout"})
_EXECUTOR_KEYS = frozenset({"executor", "tasks", "sites"})


# =========================================================================== export


def export_job(job: Job, directory: str | Path, *, format: ConfigFormat = "json") -> Path:
    """Write ``job`` into ``directory`` (created if missing, must be empty); return the config path.

    Raises
    ------
    ConfigError
        Unknown format, a non-empty directory, a component that is neither a dataclass nor has
        ``config()``, an argument that is not a config value, a class that cannot be found by
        name, or two custom modules/files with the same name.
    """
    if format not in CONFIG_NAMES:
        raise ConfigError(f"unknown job config format {format!r}; use one of {list(CONFIG_NAMES)}")
    target = Path(directory)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ConfigError(f"cannot export job {job.name!r} to {target}: not an empty folder")
    writer = _ConfigWriter(toml=format == "toml")
    tree: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "job": {"name": job.name, "min_sites": job.min_sites},
        "nodes": [],
        "executors": [],
    }
    for node in job.nodes.values():
        entry: dict[str, Any] = {
            "name": node.name,
            "controller": writer.component(node.controller, f"nodes.{node.name}.controller"),
            "after": list(node.after),
        }
        if node.timeout is not None:
            entry["timeout"] = node.timeout
        tree["nodes"].append(entry)
    for index, binding in enumerate(job.executors):
        entry = {
            "executor": writer.component(binding.executor, f"executors[{index}].executor"),
            "tasks": list(binding.tasks),
        }
        if binding.sites is not None:
            entry["sites"] = list(binding.sites)
        tree["executors"].append(entry)

    modules = _custom_code_sources(writer.modules)
    copies = dict(modules)
    for path in job.files:
        if copies.get(path.name, path) != path:
            raise ConfigError(
                f"job {job.name!r}: added file {path} and {copies[path.name]} would both be "
                f"{CUSTOM_DIR}/{path.name}"
            )
        copies[path.name] = path
    tree["custom_code"] = sorted(modules)
    tree["files"] = [path.name for path in job.files]

    target.mkdir(parents=True, exist_ok=True)
    if copies:
        custom = target / CUSTOM_DIR
        custom.mkdir()
        for name, source in copies.items():
            if source.is_dir():
                shutil.copytree(
                    source, custom / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
                )
            else:
                shutil.copy2(source, custom / name)
    config_path = target / CONFIG_NAMES[format]
    config_path.write_text(_dump(tree, format), encoding="utf-8")
    return config_path


def _dump(tree: dict[str, Any], format: str) -> str:
    if format == "json":
        return json.dumps(tree, indent=2) + "\n"
    if format == "yaml":
        dumped: str = yaml.safe_dump(tree, sort_keys=False)
        return dumped
    return tomli_w.dumps(tree)


class _ConfigWriter:
    """Turns components into ``{type, args}`` trees and remembers the modules they come from."""

    def __init__(self, *, toml: bool) -> None:
        self.toml = toml
        self.modules: set[str] = set()

    def component(self, obj: object, where: str) -> dict[str, Any]:
        cls = type(obj)
        reference = self.reference(cls, where)
        args: dict[str, Any] = {}
        for name, value in _constructor_args(obj, where).items():
            if value is None and self.toml:
                if _default_of(cls, name) is None:
                    continue
                raise ConfigError(
                    f"{where}.args.{name}: TOML cannot hold None here (its default is not None); "
                    "export as json or yaml"
                )
            args[name] = self.value(value, f"{where}.args.{name}")
        return {"type": reference, "args": args}

    def reference(self, target: Any, where: str) -> str:
        """``"module:QualName"`` of a class or function that can be imported by that name."""
        module = getattr(target, "__module__", None)
        qualname = getattr(target, "__qualname__", "?")
        if not isinstance(module, str) or module == "__main__" or "<" in qualname:
            raise ConfigError(
                f"{where}: {qualname} is defined in {module} or inside a function (or is a "
                "lambda) and cannot be found by name; define it at the top of a module"
            )
        self.modules.add(module)
        return f"{module}:{qualname}"

    def value(self, value: object, where: str) -> Any:
        if value is None:
            if self.toml:
                raise ConfigError(f"{where}: TOML cannot hold None inside a list or table")
            return None
        if isinstance(value, enum.Enum):
            return self.value(value.value, where)
        for scalar in _SCALARS:
            if isinstance(value, scalar):
                return scalar(value)
        if isinstance(value, PurePath):
            return str(value)
        if isinstance(value, list | tuple):
            return [self.value(item, f"{where}[{index}]") for index, item in enumerate(value)]
        if isinstance(value, dict):
            if not all(isinstance(key, str) for key in value):
                raise ConfigError(f"{where}: dict keys must be strings to be exported")
            if _looks_like_component(value) or _looks_like_reference(value):
                raise ConfigError(
                    f"{where}: a plain dict with exactly the keys 'type' and 'args', or 'ref', "
                    "would load as a component or reference; rename its keys"
                )
            return {key: self.value(item, f"{where}.{key}") for key, item in value.items()}
        if inspect.isfunction(value) or inspect.isbuiltin(value) or isinstance(value, type):
            return {"ref": self.reference(value, where)}
        if _is_component(value):
            return self.component(value, where)
        raise ConfigError(
            f"{where}: a {type(value).__qualname__} is not a config value (use None, bool, "
            "int, float, str, lists, dicts, paths, enums, or components)"
        )


def _is_component(value: object) -> bool:
    return (dataclasses.is_dataclass(value) and not isinstance(value, type)) or _has_config(
        type(value)
    )


def _has_config(cls: type) -> bool:
    return inspect.isfunction(getattr(cls, "config", None))


def _constructor_args(obj: object, where: str) -> dict[str, Any]:
    cls = type(obj)
    if _has_config(cls):
        args = obj.config()  # type: ignore[attr-defined]
        if not isinstance(args, Mapping) or not all(isinstance(k, str) for k in args):
            raise ConfigError(f"{where}: {cls.__qualname__}.config() must return a str-keyed dict")
        return dict(args)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj) if f.init}
    raise ConfigError(
        f"{where}: {cls.__qualname__} cannot be exported: components must be dataclasses or "
        "define config() returning their constructor arguments"
    )


def _default_of(cls: type, name: str) -> object:
    """The constructor default of argument ``name`` (``inspect.Parameter.empty`` if none)."""
    try:
        parameter = inspect.signature(cls).parameters.get(name)
    except (TypeError, ValueError):
        return inspect.Parameter.empty
    return inspect.Parameter.empty if parameter is None else parameter.default


def _looks_like_component(value: Mapping[str, Any]) -> bool:
    return set(value) == {"type", "args"} and isinstance(value["type"], str)


def _looks_like_reference(value: Mapping[str, Any]) -> bool:
    return set(value) == {"ref"} and isinstance(value["ref"], str)


def _custom_code_sources(modules: set[str]) -> dict[str, Path]:
    """Map ``custom/`` entry names to what to copy for the modules that are not installed."""
    installed = importlib.metadata.packages_distributions()
    sources: dict[str, Path] = {}
    for module_name in sorted(modules):
        top = module_name.partition(".")[0]
        if top in sys.stdlib_module_names or top in sys.builtin_module_names or top in installed:
            continue
        module = sys.modules.get(module_name)
        top_module = sys.modules.get(top)
        file = getattr(module, "__file__", None)
        if module is None or top_module is None or file is None:
            raise ConfigError(f"module {module_name!r} has no source file to ship with the job")
        if hasattr(top_module, "__path__"):
            source = next(
                (Path(p) for p in top_module.__path__ if Path(file).is_relative_to(p)),
                Path(file).parent,
            )
        else:
            source = Path(file)
        previous = sources.get(source.name)
        if previous is not None and previous != source:
            raise ConfigError(
                f"custom code {previous} and {source} would both be {CUSTOM_DIR}/{source.name}"
            )
        sources[source.name] = source
    return sources


# =========================================================================== load


def load_job(directory: str | Path) -> Job:
    """Rebuild the job in ``directory``.

    Raises
    ------
    ConfigError
        Naming the problem and the path (and the field inside the config): no or several config
        files, a config that does not parse, an unknown format version, a missing or mistyped
        field, an unknown type, arguments the class refuses, a missing custom file.
    """
    folder = Path(directory)
    if not folder.is_dir():
        raise ConfigError(f"job folder {folder} does not exist")
    present = [folder / name for name in CONFIG_NAMES.values() if (folder / name).is_file()]
    if len(present) != 1:
        found = [p.name for p in present] or "none"
        raise ConfigError(
            f"job folder {folder} must hold exactly one of {list(CONFIG_NAMES.values())}; "
            f"found {found}"
        )
    config_path = present[0]
    tree = _parse(config_path)
    reader = _ConfigReader(config_path)
    return reader.job(tree, folder)


def _parse(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".json":
            return json.loads(text)
        if path.suffix == ".yaml":
            return yaml.safe_load(text)
        return tomllib.loads(text)
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot parse job config: {exc}") from exc


class _ConfigReader:
    """Builds a :class:`Job` from a parsed tree; every error names the file and the field."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, where: str, problem: str) -> ConfigError:
        return ConfigError(f"{self.path}: {where}: {problem}")

    def job(self, tree: Any, folder: Path) -> Job:
        root = self.mapping(tree, "top level")
        self.known_keys(root, _TOP_KEYS, "top level")
        version = root.get("format_version")
        if version != FORMAT_VERSION:
            raise self.fail(
                "format_version", f"is {version!r}; this fedcell reads version {FORMAT_VERSION}"
            )
        custom_names = self.names(root.get("custom_code", []), "custom_code")
        file_names = self.names(root.get("files", []), "files")
        custom = folder / CUSTOM_DIR
        for name in [*custom_names, *file_names]:
            if name in ("", ".", "..") or Path(name).name != name:
                raise self.fail("custom_code/files", f"{name!r} is not a plain file name")
            if not (custom / name).exists():
                raise self.fail("custom_code/files", f"{CUSTOM_DIR}/{name} is missing")
        if (custom_names or file_names) and str(custom) not in sys.path:
            sys.path.insert(0, str(custom))

        header = self.mapping(root.get("job"), "job")
        self.known_keys(header, _JOB_KEYS, "job")
        job_name = self.string(header.get("name"), "job.name")
        job: Job = self.build("job", Job, job_name, min_sites=header.get("min_sites", 1))
        for index, raw in enumerate(self.sequence(root.get("nodes"), "nodes")):
            where = f"nodes[{index}]"
            entry = self.mapping(raw, where)
            name = self.string(entry.get("name"), f"{where}.name")
            where = f"nodes.{name}"
            self.known_keys(entry, _NODE_KEYS, where)
            controller = self.component(entry.get("controller"), f"{where}.controller")
            if not isinstance(controller, Controller):
                raise self.fail(
                    f"{where}.controller", f"{type(controller).__name__} is not a Controller"
                )
            after = self.names(entry.get("after", []), f"{where}.after")
            timeout = entry.get("timeout")
            self.build(where, job.add, controller, name=name, after=after, timeout=timeout)
        for index, raw in enumerate(self.sequence(root.get("executors", []), "executors")):
            where = f"executors[{index}]"
            entry = self.mapping(raw, where)
            self.known_keys(entry, _EXECUTOR_KEYS, where)
            executor = self.component(entry.get("executor"), f"{where}.executor")
            tasks = self.names(entry.get("tasks"), f"{where}.tasks")
            sites = entry.get("sites")
            site_names = None if sites is None else self.names(sites, f"{where}.sites")
            self.build(where, job.add_executor, executor, tasks=tasks, sites=site_names)
        for name in file_names:
            self.build("files", job.add_file, custom / name)
        return job

    def component(self, raw: Any, where: str) -> Any:
        entry = self.mapping(raw, where)
        if set(entry) != {"type", "args"}:
            raise self.fail(
                where, f"a component needs exactly the keys type and args, not {sorted(entry)}"
            )
        cls = self.resolve(self.string(entry["type"], f"{where}.type"), f"{where}.type")
        if not isinstance(cls, type):
            raise self.fail(f"{where}.type", f"{entry['type']!r} is not a class")
        hints = _argument_hints(cls)
        args = {
            name: _coerce(self.value(value, f"{where}.args.{name}"), hints.get(name))
            for name, value in self.mapping(entry["args"], f"{where}.args").items()
        }
        return self.build(f"{where} ({entry['type']})", cls, **args)

    def value(self, raw: Any, where: str) -> Any:
        if isinstance(raw, dict) and _looks_like_component(raw):
            return self.component(raw, where)
        if isinstance(raw, dict) and _looks_like_reference(raw):
            return self.resolve(raw["ref"], f"{where}.ref")
        if isinstance(raw, dict):
            return {key: self.value(item, f"{where}.{key}") for key, item in raw.items()}
        if isinstance(raw, list):
            return [self.value(item, f"{where}[{index}]") for index, item in enumerate(raw)]
        return raw

    def resolve(self, reference: str, where: str) -> Any:
        module_name, colon, qualname = reference.partition(":")
        if not colon or not module_name or not qualname:
            raise self.fail(where, f"{reference!r} is not of the form 'module:Class'")
        try:
            target: Any = importlib.import_module(module_name)
        except Exception as exc:
            raise self.fail(where, f"cannot import module {module_name!r}: {exc!r}") from exc
        for part in qualname.split("."):
            try:
                target = getattr(target, part)
            except AttributeError as exc:
                raise self.fail(where, f"module {module_name!r} has no {qualname!r}") from exc
        return target

    def build(self, where: str, make: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return make(*args, **kwargs)
        except (TypeError, ValueError) as exc:  # ConfigError is a ValueError
            raise self.fail(where, str(exc)) from exc

    def known_keys(self, entry: Mapping[str, Any], known: frozenset[str], where: str) -> None:
        unknown = sorted(set(entry) - known)
        if unknown:
            raise self.fail(where, f"unknown key(s) {unknown}; expected some of {sorted(known)}")

    def mapping(self, raw: Any, where: str) -> dict[str, Any]:
        if not isinstance(raw, dict):
            raise self.fail(where, f"expected a table/mapping, got {type(raw).__name__}")
        return raw

    def sequence(self, raw: Any, where: str) -> list[Any]:
        if not isinstance(raw, list):
            raise self.fail(where, f"expected a list, got {type(raw).__name__}")
        return raw

    def string(self, raw: Any, where: str) -> str:
        if not isinstance(raw, str):
            raise self.fail(where, f"expected a string, got {type(raw).__name__}")
        return raw

    def names(self, raw: Any, where: str) -> list[str]:
        return [
            self.string(item, f"{where}[{i}]") for i, item in enumerate(self.sequence(raw, where))
        ]


def _argument_hints(cls: type) -> dict[str, Any]:
    """Resolved type annotations of ``cls``'s constructor arguments (empty when unresolvable)."""
    try:
        if dataclasses.is_dataclass(cls) and not _has_config(cls):
            return typing.get_type_hints(cls)
        init = next(vars(c)["__init__"] for c in cls.__mro__ if "__init__" in vars(c))
        return typing.get_type_hints(init)
    except Exception:  # annotations naming unimportable things: load without coercion
        return {}


def _coerce(value: Any, annotation: Any) -> Any:
    """Turn a config value back into the annotated type where config formats lose it:
    list → tuple, str → Path, value → enum member."""
    if annotation is None:
        return value
    members = (
        get_args(annotation)
        if get_origin(annotation) in (typing.Union, types.UnionType)
        else (annotation,)
    )
    classes = [get_origin(m) or m for m in members]
    if isinstance(value, list) and tuple in classes and list not in classes:
        return tuple(value)
    if isinstance(value, str) and str not in classes:
        for target in classes:
            if isinstance(target, type) and issubclass(target, PurePath):
                return target(value)
    for target in classes:
        if (
            isinstance(target, type)
            and issubclass(target, enum.Enum)
            and not isinstance(value, target)
        ):
            try:
                return target(value)
            except ValueError:
                continue
    return value
