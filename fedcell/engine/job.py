"""A job: a DAG of controller nodes plus the executors that answer their tasks at the sites.

Jobs are wired with objects, not strings::

    job = Job("cifar10")
    init = job.add(InitModel(seed=0), name="init")
    train = job.add(FedAvg(rounds=5), name="train", after=[init])
    job.add(CrossSiteEval(), name="eval", after=[train])
    job.add_executor(TorchExecutor(model=...), tasks=("train", "validate"))

Contracts:

- A node is a :class:`~fedcell.engine.dispatcher.Controller` under a unique name. Its output flows
  along its out-edges: a node started after ``train`` finds that output in
  ``ctx.inputs["train"]``. Nodes without a path between them run concurrently.
- ``after`` may name nodes added later; :meth:`Job.validate` reports names that never appear.
- An executor binding says which executor object answers which task names at which sites
  (``sites=None``: every site). Executors are opaque here; they expose ``task_names``. Two
  bindings may not answer the same task at the same site.
- :meth:`Job.validate` runs before anything starts and reports *every* problem at once in one
  :class:`~fedcell.errors.ConfigError`, one line per problem naming the node (and site/task):
  unknown dependencies, cycles, executors bound to unknown sites, sites without an executor for a
  task a controller sends, and each controller's own ``validate()``. Mistakes that can be caught
  while wiring (a duplicate node name, a non-controller, overlapping executor bindings) raise at
  once from :meth:`Job.add` / :meth:`Job.add_executor`.
- The graph is a ``networkx.DiGraph`` with an edge ``upstream → downstream``; :meth:`node_specs`
  turns it into the plain :class:`~fedcell.engine.scheduler.NodeSpec` list the scheduler runs, in
  topological order that keeps insertion order among independent nodes.

Export and load (:meth:`Job.export`, :meth:`Job.load`) are in :mod:`fedcell.engine.job_folder`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import networkx as nx

from fedcell.engine.dispatcher import Controller
from fedcell.engine.scheduler import NodeSpec
from fedcell.errors import ConfigError

if TYPE_CHECKING:
    from fedcell.engine.simulator import SimulationResult

__all__ = ["ExecutorBinding", "Job", "JobNode"]

_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")

ConfigFormat = Literal["json", "yaml", "toml"]


@dataclass(frozen=True)
class JobNode:
    """One DAG node: a controller, the nodes it waits for, and its time limit in seconds."""

    name: str
    controller: Controller
    after: tuple[str, ...] = ()
    timeout: float | None = None


@dataclass(frozen=True)
class ExecutorBinding:
    """``executor`` answers ``tasks`` at ``sites`` (``None``: at every site)."""

    executor: Any
    tasks: tuple[str, ...]
    sites: tuple[str, ...] | None = None

    def covers(self, task: str, site: str) -> bool:
        return task in self.tasks and (self.sites is None or site in self.sites)


class Job:
    """A named DAG of controllers, with executor bindings and extra files.

    Parameters
    ----------
    name:
        The job's name (letters, digits, ``-`` and ``_``).
    min_sites:
        The job crashes when fewer sites remain connected (and does not start with fewer).

    Raises
    ------
    ConfigError
        The name is not a valid name, or ``min_sites`` is below 1.
    """

    def __init__(self, name: str, *, min_sites: int = 1) -> None:
        _check_name(name, "job name")
        if isinstance(min_sites, bool) or not isinstance(min_sites, int) or min_sites < 1:
            raise ConfigError(f"job {name!r}: min_sites must be an int >= 1, not {min_sites!r}")
        self.name = name
        self.min_sites = min_sites
        self._graph: nx.DiGraph[str] = nx.DiGraph()
        self._added: list[str] = []  # node names in add() order (the graph also holds placeholders)
        self._executors: list[ExecutorBinding] = []
        self._files: list[Path] = []

    def __repr__(self) -> str:
        return f"Job({self.name!r}, nodes={list(self.nodes)}, executors={len(self._executors)})"

    # ------------------------------------------------------------------ wiring

    def add(
        self,
        controller: Controller,
        *,
        name: str | None = None,
        after: Iterable[str] = (),
        timeout: float | None = None,
    ) -> str:
        """Add a controller node; return its name (pass it to later ``after=`` lists).

        Parameters
        ----------
        controller:
            The algorithm this node runs.
        name:
            Unique node name; default: the controller's class name in lower case, with ``-2``,
            ``-3``, ... appended when taken.
        after:
            Names of the nodes whose outputs this node needs; it starts when all finished.
        timeout:
            Seconds the node may run before it is cancelled and failed; ``None``: no limit.

        Raises
        ------
        ConfigError
            ``controller`` is not a Controller, the name is invalid or taken, ``after`` is a bare
            string, or ``timeout`` is not a positive number.
        """
        if not isinstance(controller, Controller):
            raise ConfigError(
                f"job {self.name!r}: {controller!r} is not a fedcell Controller and cannot be a node"
            )
        if name is None:
            name = self._free_name(type(controller).__name__.lower())
        _check_name(name, "node name")
        if "node" in self._graph.nodes.get(name, {}):
            raise ConfigError(f"job {self.name!r}: node name {name!r} is used twice")
        if isinstance(after, str):
            raise ConfigError(
                f"node {name!r}: after= takes a list of node names, not the string {after!r}"
            )
        upstream = tuple(after)
        for dependency in upstream:
            if not isinstance(dependency, str):
                raise ConfigError(f"node {name!r}: after= holds {dependency!r}, not a node name")
        if timeout is not None and (
            isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0
        ):
            raise ConfigError(f"node {name!r}: timeout must be a positive number, not {timeout!r}")
        self._graph.add_node(name, node=JobNode(name, controller, upstream, timeout))
        self._added.append(name)
        for dependency in upstream:
            self._graph.add_edge(dependency, name)
        return name

    def add_executor(
        self,
        executor: Any,
        *,
        tasks: Iterable[str] | None = None,
        sites: Iterable[str] | None = None,
    ) -> None:
        """Bind ``executor`` to answer ``tasks`` at ``sites``.

        Parameters
        ----------
        executor:
            An executor object (see :mod:`fedcell.executors`); it must have ``task_names``.
        tasks:
            Task names it answers in this job; default: all its ``task_names``.
        sites:
            Sites it runs at; default ``None``: every site.

        Raises
        ------
        ConfigError
            The executor has no ``task_names``, ``tasks`` names a task it does not answer, a
            list is empty or a bare string, or another binding already answers one of these
            tasks at one of these sites.
        """
        declared = getattr(executor, "task_names", None)
        if declared is None or isinstance(declared, str):
            raise ConfigError(
                f"job {self.name!r}: {type(executor).__name__} has no task_names tuple and "
                "cannot be an executor"
            )
        declared = tuple(declared)
        chosen = declared if tasks is None else _name_tuple(tasks, "tasks", type(executor))
        unknown = [task for task in chosen if task not in declared]
        if unknown:
            raise ConfigError(
                f"job {self.name!r}: {type(executor).__name__} answers {list(declared)}, "
                f"not {unknown}"
            )
        if not chosen:
            raise ConfigError(f"job {self.name!r}: {type(executor).__name__} answers no task")
        site_names = None if sites is None else _name_tuple(sites, "sites", type(executor))
        binding = ExecutorBinding(executor, chosen, site_names)
        for existing in self._executors:
            shared_tasks = set(existing.tasks) & set(chosen)
            if not shared_tasks:
                continue
            if existing.sites is None or site_names is None:
                shared_sites = "every site"
            else:
                overlap = sorted(set(existing.sites) & set(site_names))
                if not overlap:
                    continue
                shared_sites = f"sites {overlap}"
            raise ConfigError(
                f"job {self.name!r}: {type(existing.executor).__name__} already answers "
                f"{sorted(shared_tasks)} at {shared_sites}; {type(executor).__name__} cannot too"
            )
        self._executors.append(binding)

    def add_file(self, path: str | Path) -> None:
        """Ship a file or folder with the job (exported into the job folder's ``custom/``).

        Raises
        ------
        ConfigError
            The path does not exist, or a file with the same name was already added.
        """
        resolved = Path(path).resolve()
        if not resolved.exists():
            raise ConfigError(f"job {self.name!r}: add_file({str(path)!r}): no such file")
        if any(existing.name == resolved.name for existing in self._files):
            raise ConfigError(f"job {self.name!r}: a file named {resolved.name!r} is already added")
        self._files.append(resolved)

    # ------------------------------------------------------------------ views

    @property
    def nodes(self) -> Mapping[str, JobNode]:
        """Nodes by name, in the order they were added."""
        return {name: self._graph.nodes[name]["node"] for name in self._added}

    @property
    def executors(self) -> tuple[ExecutorBinding, ...]:
        return tuple(self._executors)

    @property
    def files(self) -> tuple[Path, ...]:
        return tuple(self._files)

    @property
    def graph(self) -> nx.DiGraph[str]:
        """A read-only view of the DAG (edges point downstream)."""
        view: nx.DiGraph[str] = self._graph.copy(as_view=True)
        return view

    def executors_for(self, site: str) -> dict[str, Any]:
        """Task name → the executor answering it at ``site``."""
        return {
            task: binding.executor
            for binding in self._executors
            if binding.sites is None or site in binding.sites
            for task in binding.tasks
        }

    def node_specs(self) -> list[NodeSpec]:
        """The nodes as scheduler specs, upstream first (insertion order among independents).

        Raises
        ------
        ConfigError
            The graph has a cycle or an unknown dependency (run :meth:`validate` for details).
        """
        nodes = self.nodes
        order = {name: index for index, name in enumerate(self._added)}
        if len(nodes) != len(self._graph):
            raise ConfigError(f"job {self.name!r} has unknown dependencies; validate it first")
        try:
            names = list(nx.lexicographical_topological_sort(self._graph, key=order.__getitem__))
        except nx.NetworkXUnfeasible as exc:
            raise ConfigError(f"job {self.name!r} has a cycle; validate it first") from exc
        return [NodeSpec(name, nodes[name].after, nodes[name].timeout) for name in names]

    # ------------------------------------------------------------------ validation

    def validate(self, sites: Sequence[str]) -> None:
        """Check the whole job against the sites that will run it.

        Raises
        ------
        ConfigError
            Listing every problem, one per line, each naming the node (and site/task).
        """
        problems: list[str] = []
        site_names = list(sites)
        if len(set(site_names)) != len(site_names):
            problems.append(f"sites {site_names} hold duplicates")
        if len(set(site_names)) < self.min_sites:
            problems.append(
                f"the job needs at least {self.min_sites} site(s), got {len(set(site_names))}"
            )
        if not self.nodes:
            problems.append("the job has no nodes")
        problems += self._dependency_problems()
        problems += self._executor_problems(site_names)
        for node in self.nodes.values():
            try:
                node.controller.validate()
            except ConfigError as exc:
                problems.append(f"node {node.name!r}: {exc}")
        if problems:
            lines = "\n".join(f"- {problem}" for problem in problems)
            raise ConfigError(f"job {self.name!r} is invalid:\n{lines}")

    def _dependency_problems(self) -> list[str]:
        problems: list[str] = []
        nodes = self.nodes
        for name in self._graph.nodes:
            if name not in nodes:
                waiting = sorted(self._graph.successors(name))
                problems.append(
                    f"node(s) {waiting} wait for {name!r}, which is not a node of the job"
                )
        for cycle in nx.simple_cycles(self._graph):
            path = " -> ".join([*cycle, cycle[0]])
            problems.append(f"nodes form a cycle: {path}")
        return problems

    def _executor_problems(self, sites: Sequence[str]) -> list[str]:
        problems: list[str] = []
        for binding in self._executors:
            strangers = [s for s in binding.sites or () if s not in sites]
            if strangers:
                problems.append(
                    f"{type(binding.executor).__name__} is bound to unknown site(s) {strangers}"
                )
        for node in self.nodes.values():
            for task in node.controller.task_names:
                uncovered = [
                    site for site in sites if not any(b.covers(task, site) for b in self._executors)
                ]
                if uncovered:
                    problems.append(
                        f"node {node.name!r} sends task {task!r}, but site(s) {uncovered} have "
                        "no executor for it"
                    )
        return problems

    # ------------------------------------------------------------------ job folders

    def simulate(self, n_clients: int | None = None, **options: Any) -> SimulationResult:
        """Run this job on simulated sites; see :func:`fedcell.engine.simulator.simulate`."""
        from fedcell.engine.simulator import simulate

        return simulate(self, n_clients, **options)

    def export(self, directory: str | Path, *, format: ConfigFormat = "json") -> Path:
        """Write this job as a job folder; return the config file's path.

        See :func:`fedcell.engine.job_folder.export_job`.

        Raises
        ------
        ConfigError
            A component cannot be described as config, or ``directory`` is not empty.
        """
        from fedcell.engine.job_folder import export_job

        return export_job(self, directory, format=format)

    @classmethod
    def load(cls, directory: str | Path) -> Job:
        """Rebuild a job from a job folder; see :func:`fedcell.engine.job_folder.load_job`.

        Raises
        ------
        ConfigError
            Naming the problem and the path: bad format, unknown type, bad args, missing file.
        """
        from fedcell.engine.job_folder import load_job

        return load_job(directory)

    # ------------------------------------------------------------------ helpers

    def _free_name(self, base: str) -> str:
        candidate, suffix = base, 2
        while candidate in self._graph:
            candidate, suffix = f"{base}-{suffix}", suffix + 1
        return candidate


def _check_name(name: object, what: str) -> None:
    if not isinstance(name, str) or not _NAME_PATTERN.fullmatch(name):
        raise ConfigError(
            f"{what} {name!r} is invalid: use letters, digits, '-' and '_', starting with a "
            "letter or digit"
        )


def _name_tuple(values: Iterable[str], what: str, owner: type) -> tuple[str, ...]:
    if isinstance(values, str):
        raise ConfigError(f"{owner.__name__}: {what}= takes a list of names, not {values!r}")
    names = tuple(values)
    if not names or not all(isinstance(v, str) and v for v in names):
        raise ConfigError(f"{owner.__name__}: {what}= must be a non-empty list of names")
    return names
