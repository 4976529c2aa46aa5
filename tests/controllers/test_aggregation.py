"""WeightedMean: hand-computed weighted means, FULL/DIFF, per-key means, dtypes and libraries,
precision choice, and rejection of malformed results without touching the accumulator."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from fedcell.controllers import aggregation
from fedcell.controllers.aggregation import WeightedMean
from fedcell.engine.dispatcher import TaskResult
from fedcell.errors import ProtocolError
from fedcell.fl_model import FLModel, ParamsType


def model(params: dict[str, Any], steps: float | None = None, **extra: Any) -> FLModel:
    meta = {} if steps is None else {"NUM_STEPS_CURRENT_ROUND": steps}
    return FLModel(params=params, meta=meta, **extra)


def test_weighted_mean_matches_hand_computation() -> None:
    # Prepare
    reference = {"w": np.zeros(2, dtype=np.float32), "b": np.zeros((), dtype=np.float32)}
    mean = WeightedMean(reference)

    # Execute
    mean.add(model({"w": np.array([1.0, 2.0], np.float32), "b": np.array(1.0, np.float32)}, 1))
    mean.add(model({"w": np.array([4.0, 8.0], np.float32), "b": np.array(4.0, np.float32)}, 3))
    result = mean.mean()

    # Assert: (1*[1,2] + 3*[4,8]) / 4 = [13/4, 26/4]; (1*1 + 3*4) / 4 = 13/4
    np.testing.assert_allclose(result["w"], [3.25, 6.5])
    np.testing.assert_allclose(result["b"], 3.25)
    assert mean.count == 2 and mean.params_type is ParamsType.FULL


def test_missing_weight_counts_one_and_weigh_by_none_ignores_meta() -> None:
    reference = {"w": np.zeros(1)}
    by_steps = WeightedMean(reference)
    uniform = WeightedMean(reference, weigh_by=None)
    for mean in (by_steps, uniform):
        mean.add(model({"w": np.array([0.0])}))  # no NUM_STEPS: weight 1
        mean.add(model({"w": np.array([3.0])}, steps=2))

    np.testing.assert_allclose(by_steps.mean()["w"], [2.0])  # (0 + 2*3) / 3
    np.testing.assert_allclose(uniform.mean()["w"], [1.5])


def test_metrics_are_weighted_over_the_results_that_report_them() -> None:
    mean = WeightedMean({"w": np.zeros(1)})
    mean.add(model({"w": np.zeros(1)}, 1, metrics={"accuracy": 0.5, "loss": 2.0, "note": "x"}))
    mean.add(model({"w": np.zeros(1)}, 3, metrics={"accuracy": 0.9}))

    assert mean.metrics() == pytest.approx({"accuracy": (0.5 + 2.7) / 4, "loss": 2.0})


def test_keys_are_averaged_over_the_sites_that_sent_them() -> None:
    reference = {"head": np.zeros(1), "body": np.zeros(1)}
    mean = WeightedMean(reference)
    mean.add(model({"head": np.array([2.0]), "body": np.array([10.0])}, 1))
    mean.add(model({"head": np.array([4.0])}, 1))  # this site trains only the head

    result = mean.mean()

    np.testing.assert_allclose(result["head"], [3.0])
    np.testing.assert_allclose(result["body"], [10.0])


def test_update_is_the_step_from_the_global_model() -> None:
    reference = {"w": np.array([1.0, 1.0])}
    full = WeightedMean(reference)
    full.add(model({"w": np.array([3.0, 5.0])}))
    diff = WeightedMean(reference)
    diff.add(model({"w": np.array([2.0, 4.0])}, params_type="DIFF"))

    np.testing.assert_allclose(full.update()["w"], [2.0, 4.0])
    np.testing.assert_allclose(diff.update()["w"], [2.0, 4.0])
    assert diff.params_type is ParamsType.DIFF
    np.testing.assert_array_equal(reference["w"], [1.0, 1.0])  # the global model is untouched


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (FLModel(params=[1, 2]), "params must be a dict of arrays"),
        (model({"w": np.zeros(3), "extra": np.zeros(1)}), "'extra' is not in the global model"),
        (model({"w": np.zeros(4)}), r"'w' has shape \(4,\), the global model has \(3,\)"),
        (model({"w": [0.0, 0.0, 0.0]}), "'w' is list, not an array"),
        (model({"w": np.zeros(3, np.complex64)}), "'w' is complex"),
        (model({"w": np.zeros(3)}, steps=-1), "must be finite and > 0"),
        (model({"w": np.zeros(3)}, steps=float("nan")), "must be finite and > 0"),
        (model({"w": np.zeros(3)}, steps="many"), "must be a number"),
        (model({"w": np.zeros(3)}, params_type="DIFF"), "sent DIFF params in a round of FULL"),
        (FLModel(params={"w": np.zeros(3)}, metrics=[1]), "metrics must be a dict"),  # type: ignore[arg-type]
    ],
)
def test_malformed_results_are_rejected_and_leave_the_mean_untouched(
    bad: FLModel, message: str
) -> None:
    # Prepare
    mean = WeightedMean({"w": np.zeros(3)})
    mean.add(model({"w": np.ones(3)}, 2, metrics={"accuracy": 1.0}))

    # Execute
    with pytest.raises(ProtocolError, match=message):
        mean.add(bad, site="site-9")

    # Assert
    assert mean.count == 1
    np.testing.assert_array_equal(mean.mean()["w"], np.ones(3))
    assert mean.metrics() == {"accuracy": 1.0}


def test_fold_rejects_a_result_that_is_not_an_flmodel() -> None:
    mean = WeightedMean({"w": np.zeros(1)})
    with pytest.raises(ProtocolError, match="site-3: expected an FLModel, got dict"):
        mean.fold(TaskResult("site-3", "train", data={"w": np.zeros(1)}))


def test_torch_bf16_params_come_back_as_bf16_with_float64_accumulation() -> None:
    # Prepare
    reference = {"w": torch.zeros(3, dtype=torch.bfloat16)}
    mean = WeightedMean(reference)

    # Execute
    for value, steps in ((1.0, 1), (2.0, 1), (4.0, 2)):
        mean.add(model({"w": torch.full((3,), value, dtype=torch.bfloat16)}, steps))
    result = mean.mean()

    # Assert: (1 + 2 + 8) / 4 = 2.75, exact in bf16
    assert result["w"].dtype == torch.float64
    new = aggregation.cast_like(result["w"], reference["w"])
    assert new.dtype == torch.bfloat16
    assert torch.equal(new, torch.full((3,), 2.75, dtype=torch.bfloat16))


def test_large_models_accumulate_in_float32(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(aggregation, "FLOAT64_ACCUMULATOR_LIMIT", 10)
    small = {"w": np.zeros(10, np.float32)}
    large = {"w": np.zeros(11, np.float32), "d": np.zeros(1, np.float64)}
    small_mean, large_mean = WeightedMean(small), WeightedMean(large)
    small_mean.add(model({"w": np.ones(10, np.float32)}))
    large_mean.add(model({"w": np.ones(11, np.float32), "d": np.ones(1)}))

    assert small_mean.mean()["w"].dtype == np.float64
    assert large_mean.mean()["w"].dtype == np.float32
    assert large_mean.mean()["d"].dtype == np.float64  # float64 params never lose precision


def test_site_tensors_of_the_other_library_are_converted() -> None:
    numpy_reference = WeightedMean({"w": np.zeros(2, np.float32)})
    numpy_reference.add(model({"w": torch.tensor([1.0, 3.0], dtype=torch.bfloat16)}))
    numpy_reference.add(model({"w": np.array([3.0, 5.0], np.float32)}))
    torch_reference = WeightedMean({"w": torch.zeros(2)})
    torch_reference.add(model({"w": np.array([2.0, 4.0], np.float32)}))

    np.testing.assert_allclose(numpy_reference.mean()["w"], [2.0, 4.0])
    assert torch.equal(torch_reference.mean()["w"], torch.tensor([2.0, 4.0], dtype=torch.float64))


def test_integer_params_are_rounded_back() -> None:
    reference = {"count": np.array([0], dtype=np.int64)}
    mean = WeightedMean(reference)
    mean.add(model({"count": np.array([3])}))
    mean.add(model({"count": np.array([4])}))
    mean.add(model({"count": np.array([4])}))

    result = aggregation.cast_like(mean.mean()["count"], reference["count"])

    assert result.dtype == np.int64 and result.tolist() == [4]  # 11/3 = 3.67 → 4


def test_metrics_only_mean_ignores_params() -> None:
    mean = WeightedMean(None)
    mean.add(model({"anything": np.zeros(5)}, 1, metrics={"accuracy": 0.2}))
    mean.add(FLModel(metrics={"accuracy": 0.8}))

    assert mean.mean() == {}
    assert mean.metrics() == pytest.approx({"accuracy": 0.5})


def test_blocked_numpy_accumulation_matches_the_plain_formula(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(aggregation, "ADD_BLOCK_ELEMENTS", 3)
    accumulator = np.ones((4, 5))
    value = np.arange(40.0, dtype=np.float32).reshape(5, 8)[:, ::2].T  # non-contiguous (4, 5)

    aggregation.add_into(accumulator, value, 0.5)

    np.testing.assert_array_equal(accumulator, 1.0 + 0.5 * value.astype(np.float64))


def test_first_result_becomes_the_accumulator_when_results_are_handed_over() -> None:
    # Prepare: float64 weights (accumulated at float64), two results owned by the aggregator.
    reference = {"w": np.zeros(4, dtype=np.float64)}
    first = np.array([1.0, 2.0, 3.0, 4.0])
    second = np.array([3.0, 2.0, 1.0, 0.0])
    expected = first * 0.25 + second * 0.75
    mean = WeightedMean(reference, adopt_results=True)
    # Execute
    mean.add(FLModel(params={"w": first}, meta={"NUM_STEPS_CURRENT_ROUND": 1}))
    mean.add(FLModel(params={"w": second}, meta={"NUM_STEPS_CURRENT_ROUND": 3}))
    result = mean.mean()["w"]
    # Assert: no accumulator was allocated (the first result holds the sum), the mean is right.
    assert np.shares_memory(result, first)
    np.testing.assert_allclose(result, expected)


@pytest.mark.parametrize("adopt", [False, True])
def test_results_that_are_not_handed_over_or_alias_the_global_model_are_not_modified(
    adopt: bool,
) -> None:
    reference = {"w": np.ones(3, dtype=np.float64)}
    aliased = reference["w"]  # a site that answered with the global model itself
    mine = np.full(3, 5.0)
    mean = WeightedMean(reference, adopt_results=adopt)
    mean.add(FLModel(params={"w": aliased if adopt else mine}, meta={"NUM_STEPS_CURRENT_ROUND": 2}))
    mean.add(FLModel(params={"w": np.full(3, 3.0)}, meta={"NUM_STEPS_CURRENT_ROUND": 2}))
    result = mean.mean()["w"]
    assert reference["w"].tolist() == [1.0, 1.0, 1.0]
    assert mine.tolist() == [5.0, 5.0, 5.0]
    assert not np.shares_memory(result, reference["w"])
    np.testing.assert_allclose(result, np.full(3, 2.0 if adopt else 4.0))
