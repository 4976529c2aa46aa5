"""Job wiring and validation: the DAG, executor bindings, and the errors that name the culprit."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fedcell.engine.dispatcher import Controller, ControllerContext
from fedcell.engine.job import Job
from fedcell.engine.scheduler import NodeSpec
from fedcell.errors import ConfigError

SITES = ["site-1", "site-2"]


@dataclass
class Sends(Controller):
    """A controller that sends the given task names; ``rounds`` must be positive."""

    tasks: tuple[str, ...] = ()
    rounds: int = 1

    @property
    def task_names(self) -> tuple[str, ...]:
        return self.tasks

    def validate(self) -> None:
        if self.rounds < 1:
            raise ConfigError(f"rounds must be >= 1, not {self.rounds}")

    async def run(self, ctx: ControllerContext) -> Any:
        return None


@dataclass
class Answers:
    """An executor stand-in: executors are opaque objects with ``task_names``."""

    names: tuple[str, ...] = ("train", "validate")

    @property
    def task_names(self) -> tuple[str, ...]:
        return self.names


def test_add_returns_node_names_and_after_builds_the_graph() -> None:
    # Prepare
    job = Job("demo")

    # Execute
    init = job.add(Sends(), name="init")
    train = job.add(Sends(("train",)), name="train", after=[init], timeout=60)
    evaluate = job.add(Sends(("validate",)), name="eval", after=[train])

    # Assert
    assert (init, train, evaluate) == ("init", "train", "eval")
    assert list(job.nodes) == ["init", "train", "eval"]
    assert job.nodes["train"].after == ("init",)
    assert job.nodes["train"].timeout == 60
    assert sorted(job.graph.edges) == [("init", "train"), ("train", "eval")]


def test_default_names_come_from_the_class_and_stay_unique() -> None:
    job = Job("demo")
    assert [job.add(Sends()) for _ in range(3)] == ["sends", "sends-2", "sends-3"]


def test_graph_view_is_read_only() -> None:
    job = Job("demo")
    job.add(Sends(), name="a")
    with pytest.raises(Exception, match="Frozen"):
        job.graph.add_node("b")
    assert list(job.nodes) == ["a"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "bad name"}, "node name 'bad name' is invalid"),
        ({"name": ""}, "node name '' is invalid"),
        ({"name": "a.b"}, "node name 'a.b' is invalid"),
        ({"after": "init"}, "after= takes a list of node names"),
        ({"after": [3]}, "holds 3, not a node name"),
        ({"timeout": 0}, "timeout must be a positive number"),
        ({"timeout": True}, "timeout must be a positive number"),
        ({"timeout": "5"}, "timeout must be a positive number"),
    ],
)
def test_add_refuses_bad_arguments(kwargs: dict[str, Any], message: str) -> None:
    job = Job("demo")
    with pytest.raises(ConfigError, match=message):
        job.add(Sends(), **kwargs)
    assert not job.nodes


def test_add_refuses_duplicates_and_non_controllers() -> None:
    job = Job("demo")
    job.add(Sends(), name="train")
    with pytest.raises(ConfigError, match="node name 'train' is used twice"):
        job.add(Sends(), name="train")
    with pytest.raises(ConfigError, match="is not a fedcell Controller"):
        job.add(object(), name="other")  # type: ignore[arg-type]


@pytest.mark.parametrize(("name", "min_sites"), [("has space", 1), ("ok", 0), ("ok", True)])
def test_job_refuses_bad_name_and_min_sites(name: str, min_sites: int) -> None:
    with pytest.raises(ConfigError):
        Job(name, min_sites=min_sites)


def test_add_executor_defaults_to_all_task_names_and_every_site() -> None:
    job = Job("demo")
    job.add_executor(Answers())
    (binding,) = job.executors
    assert binding.tasks == ("train", "validate")
    assert binding.sites is None
    assert set(job.executors_for("any-site")) == {"train", "validate"}


def test_executors_for_picks_the_binding_of_each_site() -> None:
    # Prepare
    job = Job("demo")
    fast, slow, evaluator = Answers(("train",)), Answers(("train",)), Answers(("validate",))

    # Execute
    job.add_executor(fast, sites=["site-1"])
    job.add_executor(slow, sites=["site-2"])
    job.add_executor(evaluator)

    # Assert
    assert job.executors_for("site-1") == {"train": fast, "validate": evaluator}
    assert job.executors_for("site-2")["train"] is slow
    assert job.executors_for("site-3") == {"validate": evaluator}


@pytest.mark.parametrize(
    ("first", "second", "message"),
    [
        ({}, {}, r"already answers \['train', 'validate'\] at every site"),
        ({"sites": ["site-1"]}, {}, r"already answers .* at every site"),
        ({"sites": ["site-1", "site-2"]}, {"sites": ["site-2"]}, r"at sites \['site-2'\]"),
        ({"tasks": ["train"]}, {"tasks": ["train"], "sites": ["s"]}, r"\['train'\] at every"),
    ],
)
def test_overlapping_executor_bindings_are_refused(
    first: dict[str, Any], second: dict[str, Any], message: str
) -> None:
    job = Job("demo")
    job.add_executor(Answers(), **first)
    with pytest.raises(ConfigError, match=message):
        job.add_executor(Answers(), **second)
    assert len(job.executors) == 1


def test_disjoint_executor_bindings_are_fine() -> None:
    job = Job("demo")
    job.add_executor(Answers(), tasks=["train"])
    job.add_executor(Answers(), tasks=["validate"], sites=["site-1"])
    job.add_executor(Answers(), tasks=["validate"], sites=["site-2"])
    assert len(job.executors) == 3


@pytest.mark.parametrize(
    ("executor", "kwargs", "message"),
    [
        (object(), {}, "has no task_names tuple"),
        (Answers(), {"tasks": ["fly"]}, r"answers \['train', 'validate'\], not \['fly'\]"),
        (Answers(), {"tasks": "train"}, "takes a list of names"),
        (Answers(), {"tasks": []}, "non-empty list"),
        (Answers(), {"sites": []}, "non-empty list"),
        (Answers(), {"sites": "site-1"}, "takes a list of names"),
        (Answers(()), {}, "answers no task"),
    ],
)
def test_add_executor_refuses_bad_bindings(
    executor: Any, kwargs: dict[str, Any], message: str
) -> None:
    job = Job("demo")
    with pytest.raises(ConfigError, match=message):
        job.add_executor(executor, **kwargs)


def test_add_file_needs_an_existing_unique_file(tmp_path: Path) -> None:
    job = Job("demo")
    script = tmp_path / "train.py"
    script.write_text("print('hi')\n")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "train.py").write_text("")

    job.add_file(script)
    assert job.files == (script.resolve(),)
    with pytest.raises(ConfigError, match="no such file"):
        job.add_file(tmp_path / "missing.py")
    with pytest.raises(ConfigError, match=r"'train\.py' is already added"):
        job.add_file(tmp_path / "other" / "train.py")


def test_a_valid_job_validates() -> None:
    job = Job("demo", min_sites=2)
    init = job.add(Sends(), name="init")
    job.add(Sends(("train",), rounds=3), name="train", after=[init])
    job.add_executor(Answers())
    job.validate(SITES)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda job: job.add(Sends(), name="b", after=["ghost"]), r"\['b'\] wait for 'ghost'"),
        (
            lambda job: (
                job.add(Sends(), name="x", after=["y"]),
                job.add(Sends(), name="y", after=["x"]),
            ),
            "nodes form a cycle: (x -> y -> x|y -> x -> y)",
        ),
        (lambda job: job.add(Sends(), name="me", after=["me"]), "cycle: me -> me"),
        (
            lambda job: job.add(Sends(("predict",)), name="p"),
            r"node 'p' sends task 'predict', but site\(s\) \['site-1', 'site-2'\] have no executor",
        ),
        (lambda job: job.add(Sends(rounds=0), name="train"), "node 'train': rounds must be >= 1"),
        (
            lambda job: job.add_executor(Answers(("predict",)), sites=["site-9"]),
            r"Answers is bound to unknown site\(s\) \['site-9'\]",
        ),
    ],
)
def test_validate_names_the_culprit(build: Any, message: str) -> None:
    # Prepare
    job = Job("demo")
    job.add(Sends(), name="a")
    job.add_executor(Answers())
    build(job)

    # Execute / Assert
    with pytest.raises(ConfigError, match=message):
        job.validate(SITES)


def test_validate_reports_a_site_missing_an_executor_for_one_task() -> None:
    job = Job("demo")
    job.add(Sends(("train", "validate")), name="fl")
    job.add_executor(Answers(("train",)))
    job.add_executor(Answers(("validate",)), sites=["site-1"])
    with pytest.raises(ConfigError, match=r"sends task 'validate', but site\(s\) \['site-2'\]"):
        job.validate(SITES)


def test_validate_lists_every_problem_at_once() -> None:
    # Prepare
    job = Job("demo", min_sites=3)
    job.add(Sends(rounds=0), name="train", after=["ghost"])
    job.add(Sends(("predict",)), name="predict")

    # Execute
    with pytest.raises(ConfigError) as caught:
        job.validate(SITES)

    # Assert: one line per problem
    lines = str(caught.value).splitlines()
    assert lines[0] == "job 'demo' is invalid:"
    assert len(lines) == 5
    assert "needs at least 3 site(s), got 2" in lines[1]
    assert "wait for 'ghost'" in lines[2]
    assert "'predict' sends task 'predict'" in lines[3]
    assert "node 'train': rounds must be >= 1" in lines[4]


def test_validate_refuses_empty_jobs_and_duplicate_sites() -> None:
    with pytest.raises(ConfigError, match="the job has no nodes"):
        Job("empty").validate(SITES)
    job = Job("demo")
    job.add(Sends(), name="a")
    with pytest.raises(ConfigError, match="hold duplicates"):
        job.validate(["site-1", "site-1"])


def test_node_specs_are_topological_and_keep_insertion_order_among_independents() -> None:
    # Prepare: "late" is added before its upstream
    job = Job("demo")
    job.add(Sends(), name="late", after=["train"])
    job.add(Sends(), name="side")
    job.add(Sends(), name="train", timeout=5.0)
    job.add(Sends(), name="zeta")

    # Execute
    specs = job.node_specs()

    # Assert
    assert specs == [
        NodeSpec("side"),
        NodeSpec("train", timeout=5.0),
        NodeSpec("late", ("train",)),
        NodeSpec("zeta"),
    ]


def test_node_specs_refuse_unvalidated_graphs() -> None:
    job = Job("demo")
    job.add(Sends(), name="a", after=["ghost"])
    with pytest.raises(ConfigError, match="unknown dependencies"):
        job.node_specs()
    cyclic = Job("demo")
    cyclic.add(Sends(), name="a", after=["b"])
    cyclic.add(Sends(), name="b", after=["a"])
    with pytest.raises(ConfigError, match="has a cycle"):
        cyclic.node_specs()
