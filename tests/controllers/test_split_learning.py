"""Split learning over LocalDispatcher: same accuracy (and the same losses) as centralized
training, what travels (never labels, never features), bytes and time per batch, sample
alignment, roles, failing sites, bad requests from the network, config errors, export."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fedcell.controllers.split_learning import (
    EVALUATE_TASK,
    SETUP_TASK,
    TRAIN_TASK,
    CutActivations,
    CutGradient,
    EvalCounts,
    ForwardRequest,
    LabelRequest,
    SiteSamples,
    SplitLearning,
    batch_order,
    wire_size,
)
from fedcell.engine.dispatcher import ControllerContext, Task
from fedcell.engine.job import Job
from fedcell.engine.local_dispatcher import LocalDispatcher, SiteHandler
from fedcell.errors import ConfigError, ProtocolError, TaskFailedError, TooFewResultsError
from fedcell.executors.base import Executor, SiteContext
from fedcell.executors.split_learning import SplitDataExecutor, SplitLabelExecutor
from fedcell.fl_model import FLModel
from fedcell.transports.codec import encode

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "split-learning"
LR = 0.3


@pytest.fixture(scope="module")
def example() -> Iterator[dict[str, Any]]:
    """The example's network, data and centralized baseline (modules next to its job.py)."""
    sys.path.insert(0, str(EXAMPLE))
    try:
        import centralized_baseline
        import split_net
        import vertical_data

        yield {"net": split_net, "data": vertical_data, "baseline": centralized_baseline}
    finally:
        sys.path.remove(str(EXAMPLE))


def data_executor(example: dict[str, Any], **overrides: Any) -> SplitDataExecutor:
    config: dict[str, Any] = {
        "model": example["net"].bottom,
        "features": example["data"].features,
        "optimizer_args": {"lr": LR},
    }
    return SplitDataExecutor(**{**config, **overrides})


def label_executor(example: dict[str, Any], **overrides: Any) -> SplitLabelExecutor:
    config: dict[str, Any] = {
        "model": example["net"].top,
        "labels": example["data"].labels,
        "optimizer_args": {"lr": LR},
    }
    return SplitLabelExecutor(**{**config, **overrides})


Recorder = list[tuple[str, str, Any, Any]]


def handler(executor: Executor, recorded: Recorder | None = None) -> SiteHandler:
    """A site that runs ``executor`` (started on first use); records (site, task, in, out)."""
    started: list[bool] = []

    async def handle(site: str, task: Task) -> Any:
        if not started:
            await executor.start(SiteContext(site, "job-1"))
            started.append(True)
        result = await executor.execute(task)
        if recorded is not None:
            recorded.append((site, task.name, task.data, result))
        return result

    return handle


def run(
    controller: SplitLearning, handlers: dict[str, SiteHandler], *, wire: bool = True
) -> FLModel:
    async def main() -> FLModel:
        ctx = ControllerContext("job-1", "split", LocalDispatcher(handlers, wire=wire))
        return await controller.run(ctx)

    return asyncio.run(main())


def split_pair(example: dict[str, Any], recorded: Recorder | None = None) -> dict[str, SiteHandler]:
    return {
        "site-1": handler(data_executor(example), recorded),
        "site-2": handler(label_executor(example), recorded),
    }


def test_split_training_matches_centralized_training(example: dict[str, Any]) -> None:
    # Prepare
    epochs = 3
    central_accuracy, central_losses = example["baseline"].train_centralized(epochs, lr=LR)

    # Execute
    out = run(SplitLearning(epochs=epochs, seed=0), split_pair(example))

    # Assert: it learned, to the centralized accuracy; the updates are the same ones
    split_losses = [record["metrics"]["train_loss"] for record in out.meta["history"]]
    assert central_accuracy > 0.7
    assert abs(out.metrics["accuracy"] - central_accuracy) <= 0.02
    np.testing.assert_allclose(split_losses, central_losses, rtol=1e-4)
    assert split_losses[-1] < split_losses[0] * 0.6
    assert out.params is None  # the halves stay at their sites


def test_a_different_seed_gives_a_different_run(example: dict[str, Any]) -> None:
    first = run(SplitLearning(epochs=1, seed=0), split_pair(example))
    second = run(SplitLearning(epochs=1, seed=1), split_pair(example))
    assert first.meta["history"][0]["metrics"]["train_loss"] != pytest.approx(
        second.meta["history"][0]["metrics"]["train_loss"], rel=1e-6
    )


def _frames(value: Any) -> list[bytes]:
    return [bytes(buffer) for buffer in encode(value)[1]]


def test_labels_and_features_never_leave_their_sites(example: dict[str, Any]) -> None:
    # Prepare
    recorded: Recorder = []
    _, label_values = example["data"].labels("train")
    _, feature_values = example["data"].features("train")

    # Execute
    run(SplitLearning(epochs=1, batch_size=128), split_pair(example, recorded))

    # Assert: each site answers only with its protocol messages...
    label_replies = {type(out) for site, _, _, out in recorded if site == "site-2"}
    data_replies = {type(out) for site, _, _, out in recorded if site == "site-1"}
    assert label_replies == {SiteSamples, CutGradient, EvalCounts}
    assert data_replies == {SiteSamples, CutActivations, type(None)}
    # ...no integer tensor leaves the label site, and no run of labels or features is in any
    # frame that anyone sent (requests included)
    for _, _, _, out in recorded:
        if isinstance(out, CutGradient):
            assert out.gradient.is_floating_point()
    label_run = np.ascontiguousarray(label_values[:16]).tobytes()
    sorted_labels = np.sort(label_values)  # a label run in id order would differ: check both
    feature_row = np.ascontiguousarray(feature_values[0]).tobytes()
    sent = [frame for _, _, request, out in recorded for frame in _frames((request, out))]
    assert sent
    for frame in sent:
        assert label_run not in frame
        assert sorted_labels[:16].tobytes() not in frame
        assert feature_row not in frame


def test_bytes_and_time_per_batch_are_reported(example: dict[str, Any]) -> None:
    # Prepare
    batch_size = 64
    cut_width = example["net"].CUT_WIDTH
    tensor_bytes = batch_size * cut_width * 4

    # Execute
    out = run(SplitLearning(epochs=2, batch_size=batch_size), split_pair(example))

    # Assert: activations forward and gradients back, each a batch of cut-layer floats plus a
    # small header; the server sends the rows and relays both
    per_batch = out.meta["bytes_per_batch"]
    n_train = example["data"].N_TRAIN
    batches = -(-n_train // batch_size)
    full_batches_share = (n_train // batch_size) / batches
    for sender in ("data_site", "label_site"):
        assert full_batches_share * tensor_bytes < per_batch[sender] < tensor_bytes + 200
    assert per_batch["server"] > per_batch["data_site"] + per_batch["label_site"]
    history = out.meta["history"]
    assert [record["batches"] for record in history] == [batches, batches]
    for record in history:
        assert record["metrics"]["data_site_bytes_per_batch"] == pytest.approx(
            per_batch["data_site"]
        )
        assert record["metrics"]["ms_per_batch"] == pytest.approx(
            1000 * record["seconds"] / batches
        )
    assert 0 < out.meta["ms_per_batch"] < 50


def test_wire_size_counts_header_and_tensor_bytes() -> None:
    message = CutActivations(torch.zeros(64, 16))
    assert 64 * 16 * 4 < wire_size(message) < 64 * 16 * 4 + 100


def test_batch_order_is_a_seeded_permutation() -> None:
    order = batch_order(3, 1, 100)
    assert sorted(order.tolist()) == list(range(100))
    np.testing.assert_array_equal(order, batch_order(3, 1, 100))
    assert not np.array_equal(order, batch_order(3, 2, 100))


def test_sites_holding_different_samples_are_refused(example: dict[str, Any]) -> None:
    def fewer_labels(split: str) -> tuple[np.ndarray, np.ndarray]:
        ids, values = example["data"].labels(split)
        return ids[1:], values[1:]

    def other_ids(split: str) -> tuple[np.ndarray, np.ndarray]:
        ids, values = example["data"].labels(split)
        return ids + 1, values

    for labels in (fewer_labels, other_ids):
        handlers = {
            "site-1": handler(data_executor(example)),
            "site-2": handler(label_executor(example, labels=labels)),
        }
        with pytest.raises(ConfigError, match="hold different 'train' samples"):
            run(SplitLearning(), handlers)


def test_swapped_roles_are_refused(example: dict[str, Any]) -> None:
    handlers = split_pair(example)
    with pytest.raises(ConfigError, match="site-2 should be the data site"):
        run(SplitLearning(data_site="site-2", label_site="site-1"), handlers)


def test_a_failing_site_ends_the_run_naming_the_step(example: dict[str, Any]) -> None:
    # Prepare: the top half breaks on the third training batch
    label_site = handler(label_executor(example))
    calls = {"train": 0}

    async def flaky(site: str, task: Task) -> Any:
        if task.name == TRAIN_TASK:
            calls["train"] += 1
            if calls["train"] == 3:
                raise RuntimeError("GPU fell off")
        return await label_site(site, task)

    handlers = {"site-1": handler(data_executor(example)), "site-2": flaky}

    # Execute / Assert
    with pytest.raises(TooFewResultsError, match=r"epoch 0 batch 2: .*GPU fell off"):
        run(SplitLearning(), handlers)


def test_a_site_answering_the_wrong_message_is_a_protocol_error(example: dict[str, Any]) -> None:
    label_site = handler(label_executor(example))

    async def confused(site: str, task: Task) -> Any:
        result = await label_site(site, task)
        return {"gradient": result.gradient} if isinstance(result, CutGradient) else result

    handlers = {"site-1": handler(data_executor(example)), "site-2": confused}
    with pytest.raises(ProtocolError, match="with dict, not CutGradient"):
        run(SplitLearning(), handlers)


@pytest.mark.parametrize(
    ("kind", "tamper", "error"),
    [
        (CutGradient, lambda r: CutGradient(r.gradient, "low"), "loss 'low' for epoch 0 batch 0"),
        (EvalCounts, lambda r: EvalCounts(9999, r.count, r.loss_sum), "as 9999/"),
        (EvalCounts, lambda r: EvalCounts(r.correct, r.count + 1, r.loss_sum), "has 1024 samples"),
        (EvalCounts, lambda r: EvalCounts(r.correct, r.count, None), "loss sum None"),
        (SiteSamples, lambda r: SiteSamples(r.role, [1], r.digests), "without per-split counts"),
    ],
)
def test_malformed_replies_are_protocol_errors(
    example: dict[str, Any], kind: type, tamper: Callable[[Any], Any], error: str
) -> None:
    # Prepare: a label site whose replies of one message type are rewritten on the way
    label_site = handler(label_executor(example))

    async def tampering(site: str, task: Task) -> Any:
        result = await label_site(site, task)
        return tamper(result) if isinstance(result, kind) else result

    handlers = {"site-1": handler(data_executor(example)), "site-2": tampering}

    # Execute / Assert
    with pytest.raises(ProtocolError, match=error):
        run(SplitLearning(epochs=1), handlers)


def test_sites_must_be_in_the_job(example: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match=r"\['site-3'\] are not sites of the job"):
        run(SplitLearning(label_site="site-3"), split_pair(example))


# ------------------------------------------------------------------ the executors on their own


def started(executor: Executor, seed: int = 0) -> Executor:
    async def main() -> None:
        await executor.start(SiteContext("site-x", "job-1"))
        await executor.execute(Task(SETUP_TASK, props={"seed": seed}))

    asyncio.run(main())
    return executor


def execute(executor: Executor, name: str, data: Any) -> Any:
    return asyncio.run(executor.execute(Task(name, data)))


ROWS = np.arange(8)


def scalar_identity() -> torch.nn.Module:
    """A trainable ``y = x`` on one feature (an optimizer needs parameters)."""
    layer = torch.nn.Linear(1, 1)
    with torch.no_grad():
        layer.weight.fill_(1.0)
        layer.bias.zero_()
    return layer


@pytest.mark.parametrize(
    ("request_data", "error"),
    [
        (ForwardRequest("train", np.array([0, 10**9])), "in 0..3071"),
        (ForwardRequest("train", np.array([-1])), "in 0..3071"),
        (ForwardRequest("train", np.array([], dtype=np.int64)), "non-empty"),
        (ForwardRequest("train", np.array([0.5])), "1-D integer array"),
        (ForwardRequest("train", [1, 2]), "1-D integer array"),  # type: ignore[arg-type]
        (ForwardRequest("test", ROWS), "unknown split 'test'"),
        (ForwardRequest("validate", ROWS), "the 'train' split only"),
        (ForwardRequest("train", ROWS, torch.zeros(8, 16)), "no training batch is pending"),
        (LabelRequest("train", ROWS, torch.zeros(8, 16)), "expects a ForwardRequest"),
        ({"rows": ROWS}, "expects a ForwardRequest, not dict"),
    ],
)
def test_data_site_refuses_bad_requests(
    example: dict[str, Any], request_data: Any, error: str
) -> None:
    site = started(data_executor(example))
    with pytest.raises(ProtocolError, match=error):
        execute(site, TRAIN_TASK, request_data)


def test_data_site_keeps_serving_after_bad_requests(example: dict[str, Any]) -> None:
    site = started(data_executor(example))
    execute(site, TRAIN_TASK, ForwardRequest("train", ROWS))  # batch 0 awaits its gradient
    with pytest.raises(ProtocolError, match="before the previous batch's gradient"):
        execute(site, TRAIN_TASK, ForwardRequest("train", ROWS))
    with pytest.raises(ProtocolError, match="gradient has shape"):
        execute(site, TRAIN_TASK, ForwardRequest("train", ROWS, torch.zeros(7, 16)))
    with pytest.raises(ProtocolError, match="floating-point tensor"):
        execute(site, TRAIN_TASK, ForwardRequest("train", ROWS, np.zeros((8, 16))))
    with pytest.raises(ProtocolError, match="come after the last one"):
        execute(site, EVALUATE_TASK, ForwardRequest("validate", ROWS))
    # the pending batch survived the bad requests: its gradient still applies
    assert execute(site, TRAIN_TASK, ForwardRequest("train", None, torch.zeros(8, 16))) is None
    cut = execute(site, EVALUATE_TASK, ForwardRequest("validate", ROWS))
    assert isinstance(cut, CutActivations) and cut.activations.shape == (8, 16)


def test_the_gradient_updates_the_bottom_half(example: dict[str, Any]) -> None:
    site = started(data_executor(example))
    before = execute(site, EVALUATE_TASK, ForwardRequest("validate", ROWS)).activations
    execute(site, TRAIN_TASK, ForwardRequest("train", ROWS))
    execute(site, TRAIN_TASK, ForwardRequest("train", None, torch.ones(8, 16)))
    after = execute(site, EVALUATE_TASK, ForwardRequest("validate", ROWS)).activations
    assert not torch.equal(before, after)


@pytest.mark.parametrize(
    ("request_data", "error"),
    [
        (LabelRequest("train", ROWS, torch.zeros(7, 16)), r"\(7, 16\) cut activations for 8"),
        (LabelRequest("train", ROWS, torch.zeros(8, 16, dtype=torch.int64)), "floating-point"),
        (LabelRequest("train", np.array([5000]), torch.zeros(1, 16)), "in 0..3071"),
        (ForwardRequest("train", ROWS), "expects a LabelRequest"),
        (LabelRequest("validate", ROWS, torch.zeros(8, 16)), "the 'train' split only"),
    ],
)
def test_label_site_refuses_bad_requests(
    example: dict[str, Any], request_data: Any, error: str
) -> None:
    site = started(label_executor(example))
    with pytest.raises(ProtocolError, match=error):
        execute(site, TRAIN_TASK, request_data)


def test_label_site_reports_user_code_errors_as_failed(example: dict[str, Any]) -> None:
    site = started(label_executor(example))
    with pytest.raises(TaskFailedError, match="top model or loss"):
        execute(site, TRAIN_TASK, LabelRequest("train", ROWS, torch.zeros(8, 5)))


def test_label_site_evaluation_returns_counts_only(example: dict[str, Any]) -> None:
    site = started(label_executor(example))
    counts = execute(site, EVALUATE_TASK, LabelRequest("validate", ROWS, torch.zeros(8, 16)))
    assert isinstance(counts, EvalCounts)
    assert counts.count == 8 and 0 <= counts.correct <= 8 and counts.loss_sum > 0


def test_a_step_before_setup_is_refused(example: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match="before 'split_setup'"):
        execute(data_executor(example), TRAIN_TASK, ForwardRequest("train", ROWS))


def test_setup_aligns_rows_by_sample_id(example: dict[str, Any]) -> None:
    # Prepare: the same samples listed in two orders
    ids = np.array([30, 10, 20])
    values = np.array([[3.0], [1.0], [2.0]], dtype=np.float32)

    def shuffled(split: str) -> tuple[np.ndarray, np.ndarray]:
        return ids, values

    def ordered(split: str) -> tuple[np.ndarray, np.ndarray]:
        return np.sort(ids), np.sort(values, axis=0)

    # Execute
    sites = [
        started(SplitDataExecutor(model=scalar_identity, features=f)) for f in (shuffled, ordered)
    ]
    cuts = [execute(s, EVALUATE_TASK, ForwardRequest("train", np.arange(3))) for s in sites]

    # Assert
    for cut in cuts:
        np.testing.assert_array_equal(cut.activations.numpy().ravel(), [1.0, 2.0, 3.0])


@pytest.mark.parametrize(
    ("ids", "error"),
    [
        (np.array([1, 1, 2]), "duplicate sample ids"),
        (np.array([1, 2]), "give one id per row"),
        (np.array([1.0, 2.0, 3.0]), "integers or strings"),
    ],
)
def test_setup_refuses_bad_sample_ids(ids: np.ndarray, error: str) -> None:
    def loader(split: str) -> tuple[np.ndarray, np.ndarray]:
        return ids, np.zeros((3, 2), dtype=np.float32)

    with pytest.raises(ConfigError, match=error):
        started(SplitDataExecutor(model=scalar_identity, features=loader))


def test_string_ids_align_too() -> None:
    def loader(split: str) -> tuple[list[str], np.ndarray]:
        return ["b", "a"], np.array([[2.0], [1.0]], dtype=np.float32)

    site = started(SplitDataExecutor(model=scalar_identity, features=loader))
    cut = execute(site, EVALUATE_TASK, ForwardRequest("validate", np.arange(2)))
    np.testing.assert_array_equal(cut.activations.numpy().ravel(), [1.0, 2.0])


def test_unknown_optimizer_is_refused_at_start(example: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match="no optimizer 'Sgd'"):
        asyncio.run(data_executor(example, optimizer="Sgd").start(SiteContext("s", "j")))


def test_setup_builds_the_same_initial_weights_for_the_same_seed(example: dict[str, Any]) -> None:
    cuts = []
    for seed in (0, 0, 1):
        site = started(data_executor(example), seed=seed)
        cuts.append(execute(site, EVALUATE_TASK, ForwardRequest("validate", ROWS)).activations)
    assert torch.equal(cuts[0], cuts[1])
    assert not torch.equal(cuts[0], cuts[2])


def test_sites_building_at_once_in_one_process_each_get_their_seed(
    example: dict[str, Any],
) -> None:
    # Prepare: the same seed built alone, then four builds racing on worker threads; the
    # factory pauses between layers, so an unguarded global RNG would be reseeded mid-build
    def slow_bottom() -> torch.nn.Module:
        first = torch.nn.Linear(32, 64)
        time.sleep(0.02)
        return torch.nn.Sequential(first, torch.nn.ReLU(), torch.nn.Linear(64, 16))

    reference = started(data_executor(example, model=slow_bottom), seed=5)
    racers = [data_executor(example, model=slow_bottom) for _ in range(4)]

    async def race() -> None:
        await asyncio.gather(*(r.start(SiteContext("s", "j")) for r in racers))
        seeds = (5, 6, 5, 6)
        await asyncio.gather(
            *(
                r.execute(Task(SETUP_TASK, props={"seed": s}))
                for r, s in zip(racers, seeds, strict=True)
            )
        )

    # Execute
    asyncio.run(race())

    # Assert
    expected = execute(reference, EVALUATE_TASK, ForwardRequest("validate", ROWS)).activations
    for racer in racers[::2]:
        cut = execute(racer, EVALUATE_TASK, ForwardRequest("validate", ROWS))
        assert torch.equal(cut.activations, expected)


def test_stop_saves_the_trained_half_in_the_workspace(
    example: dict[str, Any], tmp_path: Path
) -> None:
    # Prepare: one training step, so the saved weights are the trained ones
    site = data_executor(example, save_as="bottom.pt")

    async def main() -> torch.Tensor:
        await site.start(SiteContext("site-1", "job-1", workspace=tmp_path))
        await site.execute(Task(SETUP_TASK, props={"seed": 0}))
        await site.execute(Task(TRAIN_TASK, ForwardRequest("train", ROWS)))
        await site.execute(Task(TRAIN_TASK, ForwardRequest("train", None, torch.ones(8, 16))))
        cut = await site.execute(Task(EVALUATE_TASK, ForwardRequest("validate", ROWS)))
        await site.stop()
        return cut.activations

    # Execute
    trained_cut = asyncio.run(main())

    # Assert: the file rebuilds the trained bottom
    bottom = example["net"].bottom()
    bottom.load_state_dict(torch.load(tmp_path / "bottom.pt"))
    _, features = example["data"].features("validate")
    ids, _ = example["data"].features("validate")
    inputs = torch.from_numpy(features[np.argsort(ids)][:8])
    with torch.no_grad():
        torch.testing.assert_close(bottom(inputs), trained_cut)


@pytest.mark.parametrize(
    ("save_as", "workspace", "error"),
    [
        ("../bottom.pt", True, "must be a file name"),
        ("bottom.pt", False, "has no workspace"),
    ],
)
def test_save_as_is_checked_at_start(
    example: dict[str, Any], tmp_path: Path, save_as: str, workspace: bool, error: str
) -> None:
    context = SiteContext("site-1", "job-1", workspace=tmp_path if workspace else None)
    with pytest.raises(ConfigError, match=error):
        asyncio.run(data_executor(example, save_as=save_as).start(context))


# ------------------------------------------------------------------ configuration and export


@pytest.mark.parametrize(
    ("config", "error"),
    [
        ({"data_site": "a", "label_site": "a"}, "must differ"),
        ({"data_site": ""}, "data_site must be a site name"),
        ({"epochs": 0}, "epochs must be an integer >= 1"),
        ({"batch_size": 2.5}, "batch_size must be an integer >= 1"),
        ({"eval_batch_size": True}, "eval_batch_size must be an integer >= 1"),
        ({"seed": -1}, "seed must be an integer >= 0"),
        ({"step_timeout": 0}, "step_timeout must be a number > 0"),
    ],
)
def test_config_errors(config: dict[str, Any], error: str) -> None:
    with pytest.raises(ConfigError, match=error):
        SplitLearning(**config).validate()


def test_job_folder_round_trip(example: dict[str, Any], tmp_path: Path) -> None:
    # Prepare
    job = Job("split", min_sites=2)
    job.add(SplitLearning(epochs=2, batch_size=32, step_timeout=30.0), name="split")
    job.add_executor(data_executor(example, optimizer="Adam"), sites=["site-1"])
    job.add_executor(label_executor(example), sites=["site-2"])
    job.validate(["site-1", "site-2"])

    # Execute
    job.export(tmp_path / "job")
    loaded = Job.load(tmp_path / "job")

    # Assert
    assert loaded.nodes["split"].controller == job.nodes["split"].controller
    for original, copy in zip(job.executors, loaded.executors, strict=True):
        assert copy.sites == original.sites
        assert_same_config(copy.executor, original.executor)
    assert (tmp_path / "job" / "custom" / "vertical_data.py").exists()


def assert_same_config(copy: object, original: object) -> None:
    assert type(copy) is type(original) and is_dataclass(original)
    for spec in fields(original):
        if spec.init:
            assert getattr(copy, spec.name) == getattr(original, spec.name), spec.name


def test_per_batch_overhead_is_small(example: dict[str, Any]) -> None:
    """The controller and the dispatcher cost little beyond the executors' own work."""
    # Prepare: time the same steps calling the executors directly, on one event loop
    data, label = started(data_executor(example)), started(label_executor(example))
    order = batch_order(0, 0, example["data"].N_TRAIN)
    n_batches = 20

    async def direct() -> float:
        gradient = None
        begin = time.perf_counter()
        for start in range(0, n_batches * 64, 64):
            rows = order[start : start + 64]
            forward = ForwardRequest("train", rows, gradient)
            cut = await data.execute(Task(TRAIN_TASK, forward))
            reply = await label.execute(
                Task(TRAIN_TASK, LabelRequest("train", rows, cut.activations))
            )
            gradient = reply.gradient
        return (time.perf_counter() - begin) * 1000 / n_batches

    direct_ms = asyncio.run(direct())

    # Execute
    out = run(SplitLearning(epochs=1), split_pair(example))

    # Assert: a generous bound, for a loaded 2-core machine
    assert out.meta["ms_per_batch"] < direct_ms + 3.0, (out.meta["ms_per_batch"], direct_ms)
