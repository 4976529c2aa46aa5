"""Cyclic over LocalDispatcher: visiting order, seeded shuffles, laps, dropped and rejected hops,
one model held at a time, progress, initial model sources, config errors and export."""

from __future__ import annotations

import asyncio
import gc
import itertools
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedcell.controllers import Cyclic
from fedcell.engine.dispatcher import ControllerContext, Task
from fedcell.engine.job import Job
from fedcell.engine.local_dispatcher import LocalDispatcher, SiteHandler
from fedcell.engine.progress import ProgressEvent
from fedcell.errors import CheckpointError, ConfigError, SiteCrashedError, TooFewResultsError
from fedcell.fl_model import FLModel, ParamsType
from fedcell.transports.codec import decode, encode, pack_tree, unpack_tree

SITES = ("s1", "s2", "s3")


def run(
    controller: Cyclic,
    handlers: Mapping[str, SiteHandler],
    inputs: Mapping[str, Any] | None = None,
    *,
    wire: bool = True,
    progress: list[ProgressEvent] | None = None,
) -> FLModel:
    async def main() -> FLModel:
        dispatcher = LocalDispatcher(handlers, wire=wire)
        ctx = ControllerContext(
            "job-1", "cyclic", dispatcher, dict(inputs or {}),
            progress=None if progress is None else progress.append,
        )  # fmt: skip
        return await controller.run(ctx)

    return asyncio.run(main())


def appends_digit(visits: list[tuple[str, int | None]]) -> SiteHandler:
    """A site that trains by ``w = 10 * w + <its digit>`` and records (site, round) it saw, so
    the final weight spells the visiting order. Like every executor, it answers with the round
    it was given (mid-lap sites receive the previous site's answer as it was sent)."""

    def train(site: str, task: Task) -> FLModel:
        visits.append((site, task.data.current_round))
        params = {"w": task.data.params["w"] * 10 + int(site[1:])}
        return FLModel(params=params, metrics={"w": float(params["w"][0])},
                       current_round=task.data.current_round)  # fmt: skip

    return train


def tiny_model() -> dict[str, np.ndarray]:
    """A model factory, referenced by path as ``model="test_cyclic:tiny_model"``."""
    return {"w": np.full(1, 7.0)}


def test_fixed_order_relays_the_model_through_every_site_each_lap() -> None:
    # Prepare
    visits: list[tuple[str, int | None]] = []
    handlers = dict.fromkeys(SITES, appends_digit(visits))

    # Execute
    out = run(Cyclic(rounds=2, initial_params={"w": [0.0]}), handlers)

    # Assert: each site trained on the previous site's output, two laps in the given order
    assert out.params["w"].tolist() == [123123.0]
    assert visits == [("s1", 0), ("s2", 0), ("s3", 0), ("s1", 1), ("s2", 1), ("s3", 1)]
    history = out.meta["history"]
    assert [(r["round"], r["hop"], r["site"], r["status"]) for r in history] == [
        (lap, hop, site, "ok") for lap in range(2) for hop, site in enumerate(SITES)
    ]
    assert out.meta["orders"] == [list(SITES), list(SITES)]
    assert out.metrics == {"w": 123123.0}
    assert out.params_type is ParamsType.FULL
    assert (out.current_round, out.total_rounds) == (1, 2)


def test_sites_parameter_sets_the_fixed_order_and_the_subset() -> None:
    visits: list[tuple[str, int | None]] = []
    out = run(
        Cyclic(sites=["s3", "s1"], initial_params={"w": [0.0]}),
        dict.fromkeys(SITES, appends_digit(visits)),
    )
    assert out.params["w"].tolist() == [31.0]
    assert [site for site, _ in visits] == ["s3", "s1"]


def shuffled_orders(seed: int, rounds: int) -> list[list[str]]:
    visits: list[tuple[str, int | None]] = []
    handlers = dict.fromkeys(SITES, appends_digit(visits))
    out = run(Cyclic(rounds=rounds, order="shuffle", seed=seed, initial_params={"w": [0.0]}),
              handlers)  # fmt: skip
    orders: list[list[str]] = out.meta["orders"]
    assert [site for site, _ in visits] == [site for order in orders for site in order]
    return orders


def test_shuffle_is_a_seeded_permutation_per_lap_never_repeating_a_site_at_the_seam() -> None:
    # Execute
    orders = shuffled_orders(seed=3, rounds=30)

    # Assert
    assert orders == shuffled_orders(seed=3, rounds=30)  # the seed replays the visits
    assert orders != shuffled_orders(seed=4, rounds=30)
    assert all(sorted(order) == sorted(SITES) for order in orders)
    assert len({tuple(order) for order in orders}) > 1  # reshuffled per lap
    assert all(before[-1] != after[0] for before, after in itertools.pairwise(orders))


def test_dropped_sites_are_skipped_and_the_next_site_gets_the_last_good_model() -> None:
    # Prepare: s2 fails, s3 crashes, s4 hangs past the hop timeout; s1 and s5 train.
    seen: list[tuple[str, float]] = []

    def good(site: str, task: Task) -> FLModel:
        seen.append((site, float(task.data.params["w"][0])))
        return FLModel(params={"w": task.data.params["w"] + 1})

    def fails(site: str, task: Task) -> FLModel:
        raise ValueError("bad batch")

    def crashes(site: str, task: Task) -> FLModel:
        raise SiteCrashedError("site lost")

    async def hangs(site: str, task: Task) -> FLModel:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    handlers = {"s1": good, "s2": fails, "s3": crashes, "s4": hangs, "s5": good}

    # Execute
    out = run(Cyclic(rounds=2, hop_timeout=0.2, initial_params={"w": [0.0]}), handlers)

    # Assert
    assert out.params["w"].tolist() == [4.0]
    assert seen == [("s1", 0.0), ("s5", 1.0), ("s1", 2.0), ("s5", 3.0)]
    statuses = [(r["site"], r["status"]) for r in out.meta["history"][:5]]
    assert statuses == [("s1", "ok"), ("s2", "failed"), ("s3", "crashed"), ("s4", "timeout"),
                        ("s5", "ok")]  # fmt: skip
    errors = {r["site"]: r["error"] for r in out.meta["history"][:5]}
    assert "ValueError: bad batch" in errors["s2"] and "no result within" in errors["s4"]


def test_the_next_site_gets_the_previous_good_output_not_the_initial_model() -> None:
    received: list[float] = []

    def records(site: str, task: Task) -> FLModel:
        received.append(float(task.data.params["w"][0]))
        if site == "s2":
            raise ValueError("boom")
        return FLModel(params={"w": task.data.params["w"] + 5})

    out = run(Cyclic(initial_params={"w": [1.0]}), dict.fromkeys(SITES, records))
    assert received == [1.0, 6.0, 6.0]
    assert out.params["w"].tolist() == [11.0]


@pytest.mark.parametrize(
    ("bad_answer", "reason"),
    [
        ({"w": np.zeros(3)}, "shape"),
        ({"v": np.zeros(1)}, "keys"),
        ("not a model", "expected an FLModel"),
    ],
)
def test_a_malformed_result_is_rejected_and_the_relay_resumes_with_the_last_good_model(
    bad_answer: Any, reason: str
) -> None:
    # Prepare: s2 answers ok with something the next site must not train on.
    received: dict[str, float] = {}

    def train(site: str, task: Task) -> Any:
        if site == "s2":
            return bad_answer if isinstance(bad_answer, str) else FLModel(params=bad_answer)
        received[site] = float(task.data.params["w"][0])
        return FLModel(params={"w": task.data.params["w"] + 1})

    # Execute
    out = run(Cyclic(initial_params={"w": [0.0]}), dict.fromkeys(SITES, train))

    # Assert
    assert received == {"s1": 0.0, "s3": 1.0}
    assert out.params["w"].tolist() == [2.0]
    s2 = out.meta["history"][1]
    assert s2["status"] == "failed" and reason in s2["error"]
    assert [r["site"] for r in out.meta["history"]] == list(SITES)


def test_a_diff_result_is_rejected() -> None:
    def train(site: str, task: Task) -> FLModel:
        return FLModel(params={"w": np.ones(1)}, params_type=ParamsType.DIFF)

    with pytest.raises(TooFewResultsError, match="DIFF"):
        run(Cyclic(initial_params={"w": [0.0]}), {"s1": train})


def test_a_lap_without_any_ok_site_fails_with_every_drop_listed() -> None:
    def fails(site: str, task: Task) -> FLModel:
        raise ValueError(f"broken {site}")

    with pytest.raises(TooFewResultsError, match="lap 0: no site answered ok") as caught:
        run(Cyclic(rounds=3, initial_params={"w": [0.0]}), dict.fromkeys(SITES, fails))
    assert [r.site for r in caught.value.results] == list(SITES)
    assert {r.status for r in caught.value.results} == {"failed"}


def test_the_controller_holds_one_model_at_a_time() -> None:
    # Prepare: without the wire codec the arrays a site returns are the ones the controller
    # holds; when a site starts, every model but the one it received must be gone.
    produced: list[weakref.ref[np.ndarray]] = []
    alive_at_start: list[int] = []

    def train(site: str, task: Task) -> FLModel:
        gc.collect()
        alive_at_start.append(sum(ref() is not None for ref in produced[:-1]))
        params = {"w": task.data.params["w"] + np.ones(100_000)}
        produced.append(weakref.ref(params["w"]))
        return FLModel(params=params)

    handlers = {f"s{i}": train for i in range(1, 7)}

    # Execute
    out = run(Cyclic(rounds=2, initial_params={"w": np.zeros(100_000)}), handlers, wire=False)

    # Assert
    assert float(out.params["w"][0]) == 12.0
    assert alive_at_start == [0] * 12


def test_progress_is_reported_per_hop() -> None:
    events: list[ProgressEvent] = []
    run(Cyclic(rounds=2, initial_params={"w": [0.0]}),
        dict.fromkeys(SITES, appends_digit([])), progress=events)  # fmt: skip
    assert [(e.node, e.step, e.total) for e in events] == [("cyclic", i, 6) for i in range(1, 7)]
    assert events[-1].metrics == {"w": 123123.0}


def test_initial_model_from_upstream_or_a_factory() -> None:
    visits: list[tuple[str, int | None]] = []
    handlers = {"s1": appends_digit(visits)}
    upstream = {"train": FLModel(params={"w": np.full(1, 2.0)}), "table": {"not": "a model"}}
    assert run(Cyclic(), handlers, upstream).params["w"].tolist() == [21.0]
    assert run(Cyclic(model="test_cyclic:tiny_model"), handlers).params["w"].tolist() == [71.0]


@pytest.mark.parametrize(
    ("controller", "inputs", "message"),
    [
        (Cyclic(), {}, "needs exactly one initial model"),
        (Cyclic(initial_params={"w": [0.0]}), {"a": FLModel(params={"w": [1.0]})},
         "needs exactly one initial model"),
        (Cyclic(), {"a": FLModel(params={"w": [1.0]}), "b": FLModel(params={"w": [2.0]})},
         "needs exactly one initial model"),
        (Cyclic(sites=["s1", "elsewhere"], initial_params={"w": [0.0]}), {},
         "'elsewhere'\\] are not sites"),
    ],
)  # fmt: skip
def test_run_refuses_a_job_it_cannot_start(
    controller: Cyclic, inputs: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        run(controller, {"s1": appends_digit([])}, inputs)


@pytest.mark.parametrize(
    ("controller", "message"),
    [
        (Cyclic(rounds=0), "rounds must be an integer >= 1"),
        (Cyclic(order="random"), "order must be 'fixed' or 'shuffle'"),  # type: ignore[arg-type]
        (Cyclic(seed=1.5), "seed must be an integer"),  # type: ignore[arg-type]
        (Cyclic(sites=[]), "sites must be a non-empty list"),
        (Cyclic(sites=["a", "a"]), "names a site twice"),
        (Cyclic(hop_timeout=0), "hop_timeout must be a number > 0"),
        (Cyclic(initial_params={"w": [0.0]}, model="m:f"), "not both"),
        (Cyclic(model="no_colon"), "model must be 'package.module:factory'"),
        (Cyclic(task_props={1: 2}), "task_props must be a dict"),  # type: ignore[dict-item]
        (Cyclic(train_task=""), "train_task must be a non-empty string"),
    ],
)
def test_validate_names_the_bad_parameter(controller: Cyclic, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        controller.validate()


@pytest.mark.parametrize("config_format", ["json", "yaml", "toml"])
def test_cyclic_round_trips_through_a_job_folder(tmp_path: Path, config_format: str) -> None:
    # Prepare
    controller = Cyclic(
        rounds=4, order="shuffle", seed=7, sites=["s2", "s1"], hop_timeout=30.0,
        initial_params={"w": [[1.0, 2.0]]}, task_props={"local_epochs": 2}, train_task="fit",
    )  # fmt: skip
    job = Job("export")
    job.add(controller, name="cyclic")

    # Execute
    job.export(tmp_path / "job", format=config_format)  # type: ignore[arg-type]
    loaded = Job.load(tmp_path / "job")

    # Assert
    assert loaded.nodes["cyclic"].controller == controller
    assert loaded.nodes["cyclic"].controller.task_names == ("fit",)


def test_a_run_resumed_after_a_lap_ends_like_the_uninterrupted_one() -> None:
    # Prepare: a shuffled 4-lap run whose per-lap checkpoints are kept (through the codec, as
    # the checkpoint store keeps them).
    saved: list[Any] = []

    async def keep(state: Any) -> None:
        tree, buffers = encode(state)
        saved.append(decode(unpack_tree(pack_tree(tree)), [bytes(b) for b in buffers]))

    controller = Cyclic(rounds=4, order="shuffle", seed=7, initial_params={"w": [1.0]})

    def scale(site: str, task: Task) -> FLModel:
        factor = {"s1": 2.0, "s2": 3.0, "s3": 0.5}[site]
        return FLModel(params={"w": task.data.params["w"] * factor + 1.0},
                       current_round=task.data.current_round)  # fmt: skip

    async def execute(ctx: ControllerContext) -> FLModel:
        return await controller.run(ctx)

    dispatcher = LocalDispatcher(dict.fromkeys(SITES, scale))
    full = asyncio.run(execute(ControllerContext("j", "cyclic", dispatcher, checkpointer=keep)))
    assert len(saved) == 4 and saved[1]["next_lap"] == 2
    # Execute: "the server crashed during lap 3": resume from the checkpoint after lap 2.
    visits: list[int | None] = []

    def counting(site: str, task: Task) -> FLModel:
        visits.append(task.data.current_round)
        return scale(site, task)

    resumed = asyncio.run(
        execute(ControllerContext(
            "j", "cyclic", LocalDispatcher(dict.fromkeys(SITES, counting)), restored=saved[1]
        ))
    )  # fmt: skip
    # Assert: the same model, order and history; only laps 2 and 3 ran again.
    np.testing.assert_array_equal(resumed.params["w"], full.params["w"])
    assert resumed.meta["orders"] == full.meta["orders"]
    assert [(h["round"], h["site"]) for h in resumed.meta["history"]] == [
        (h["round"], h["site"]) for h in full.meta["history"]
    ]
    assert sorted(set(visits)) == [2, 3] and resumed.meta["resumed_at"] == [2]


def test_a_restored_state_that_is_not_cyclic_is_refused() -> None:
    ctx = ControllerContext(
        "j", "cyclic", LocalDispatcher(dict.fromkeys(SITES, lambda s, t: t.data)),
        restored={"round": 1},
    )  # fmt: skip
    with pytest.raises(CheckpointError, match="not a cyclic state"):
        asyncio.run(Cyclic(rounds=2, initial_params={"w": [0.0]}).run(ctx))
