"""WeightedMean folding results chunk by chunk while they stream in: the same mean as folding
them whole (any dtype, elements cut by chunk boundaries, DIFF, weights), validation before the
first byte, and what a broken or discarded stream leaves behind."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from fedcell.controllers import aggregation
from fedcell.controllers.aggregation import WeightedMean
from fedcell.engine.dispatcher import TaskResult
from fedcell.errors import FedcellError, ProtocolError, StreamCancelledError, StreamError
from fedcell.fl_model import FLModel, ParamsType
from fedcell.transports import codec
from fedcell.transports.array_sink import ArraySinkAdapter, skeleton
from fedcell.transports.message import Message
from fedcell.transports.stream_receiver import ArrayPool


def result(site: str, params: dict[str, Any], steps: float = 1.0, **extra: Any) -> TaskResult:
    meta = {"NUM_STEPS_CURRENT_ROUND": steps}
    return TaskResult(site, "train", "ok", FLModel(params=params, meta=meta, **extra))


class Streamed:
    """A result as the stream layer hands it to a fold: its skeleton first, then its raw bytes
    in ``chunk``-byte pieces through the real element-aligning adapter."""

    def __init__(self, value: TaskResult, chunk: int = 1000) -> None:
        tree, buffers = codec.encode(value)
        self.skeleton = skeleton(codec.unpack_tree(codec.pack_tree(tree)))
        self.specs = codec.array_specs(tree)
        self.raw = b"".join(bytes(memoryview(b).cast("B")) for b in buffers)
        self.chunk = chunk

    def open(self, mean: WeightedMean) -> ArraySinkAdapter | None:
        sink = mean.open_stream(self.skeleton)
        if sink is None:
            return None
        envelope = Message.create("site", "server", "fc.task").envelope
        return ArraySinkAdapter(envelope, self.specs, sink)

    def feed(self, adapter: ArraySinkAdapter, upto: int | None = None) -> None:
        end = len(self.raw) if upto is None else upto
        for offset in range(0, end, self.chunk):
            adapter.write(offset, [self.raw[offset : min(offset + self.chunk, end)]])

    def fold(self, mean: WeightedMean) -> TaskResult:
        adapter = self.open(mean)
        assert adapter is not None
        self.feed(adapter)
        delivered = adapter.finish("digest").payload
        assert isinstance(delivered, TaskResult)
        return delivered


def _params(seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    return {
        "mask": np.arange(3, dtype=np.uint8) + seed,  # 3 bytes: later elements straddle chunks
        "w": rng.standard_normal((33, 17)).astype(np.float32),
        "w64": rng.standard_normal(101),
        "steps": np.arange(7, dtype=np.int64) * seed,
    }


def test_streamed_results_fold_to_the_same_mean_as_whole_results() -> None:
    # Prepare
    reference = {name: np.zeros_like(value) for name, value in _params(0).items()}
    results = [result(f"site-{i}", _params(i), steps=i) for i in (1, 2, 3)]
    whole, streamed = WeightedMean(reference), WeightedMean(reference)
    for r in results:
        whole.fold(r)

    # Execute: 1000-byte chunks cut float32, float64 and int64 elements apart
    delivered = [Streamed(r, chunk=1000).fold(streamed) for r in results]
    for d in delivered:
        streamed.fold(d)  # what broadcast_and_wait does next: skipped, it is folded already

    # Assert
    assert streamed.count == 3 and streamed.params_type is ParamsType.FULL
    for name, value in whole.mean().items():
        np.testing.assert_allclose(streamed.mean()[name], value, rtol=1e-6)
    assert streamed.metrics() == whole.metrics()
    assert delivered[0].site == "site-1" and delivered[0].ok


def test_torch_bf16_results_fold_exactly_and_stay_bf16() -> None:
    # Prepare: bf16 values, exactly representable: the widened sum must be exact
    reference = {"w": torch.zeros(999, dtype=torch.bfloat16)}
    values = [torch.arange(999, dtype=torch.float32).div(8).to(torch.bfloat16) * k for k in (1, 3)]
    mean = WeightedMean(reference)

    # Execute: 333-byte chunks split bf16 elements in two
    for k, value in enumerate(values):
        Streamed(result(f"site-{k}", {"w": value}, steps=1), chunk=333).fold(mean)
    averaged = aggregation.cast_like(mean.mean()["w"], reference["w"])

    # Assert
    assert averaged.dtype == torch.bfloat16
    expected = ((values[0].float() + values[1].float()) / 2).to(torch.bfloat16)
    assert torch.equal(averaged, expected)


def test_diff_results_stream_into_the_update() -> None:
    reference = {"w": np.full(5, 10.0)}
    mean = WeightedMean(reference)
    for k, diff in enumerate(([1.0] * 5, [3.0] * 5)):
        value = result(f"site-{k}", {"w": np.array(diff)}, params_type=ParamsType.DIFF)
        Streamed(value, chunk=8).fold(mean)
    assert mean.params_type is ParamsType.DIFF
    np.testing.assert_allclose(mean.update()["w"], [2.0] * 5)


@pytest.mark.parametrize(
    ("params", "extra", "match"),
    [
        ({"unknown": np.zeros(4)}, {}, "not in the global model"),
        ({"w": np.zeros(5)}, {}, "has shape"),
        ({"w": [1.0, 2.0, 3.0, 4.0]}, {}, "not an array"),
        ({"w": np.zeros(4, np.complex64)}, {}, "is complex"),
        ({"w": np.zeros(4)}, {"params_type": ParamsType.DIFF}, "DIFF params in a round of FULL"),
    ],
)
def test_a_malformed_streamed_result_is_rejected_before_any_byte(
    params: dict[str, Any], extra: dict[str, Any], match: str
) -> None:
    # Prepare: the round is FULL already
    mean = WeightedMean({"w": np.zeros(4)})
    Streamed(result("site-0", {"w": np.ones(4)})).fold(mean)

    # Execute / Assert
    with pytest.raises(ProtocolError, match=match):
        Streamed(result("site-1", params, **extra)).open(mean)
    assert mean.count == 1
    np.testing.assert_allclose(mean.mean()["w"], np.ones(4))


def test_a_bad_weight_is_rejected_before_any_byte() -> None:
    mean = WeightedMean({"w": np.zeros(4)})
    with pytest.raises(ProtocolError, match="finite and > 0"):
        Streamed(result("site-1", {"w": np.ones(4)}, steps=-1)).open(mean)
    assert mean.count == 0


def test_results_with_arrays_outside_params_and_metrics_only_means_are_taken_whole() -> None:
    with_meta_array = TaskResult(
        "site-1", "train", "ok", FLModel(params={"w": np.ones(4)}, meta={"mask": np.ones(2)})
    )
    assert Streamed(with_meta_array).open(WeightedMean({"w": np.zeros(4)})) is None
    assert Streamed(result("site-1", {"w": np.ones(4)})).open(WeightedMean(None)) is None


def test_a_broken_stream_is_reported_as_partly_folded_and_takes_no_more_chunks() -> None:
    # Prepare
    mean = WeightedMean({"w": np.zeros(1000, np.float32)})
    streamed = Streamed(result("site-1", {"w": np.ones(1000, np.float32)}), chunk=400)
    adapter = streamed.open(mean)
    assert adapter is not None

    # Execute: two chunks arrive, then the stream breaks
    streamed.feed(adapter, upto=800)
    adapter.abort(StreamError("peer lost"))

    # Assert: part of it is in (the aggregate is tainted), its weight and count are not
    assert mean.discard("site-1") is True
    assert mean.count == 0
    with pytest.raises(StreamCancelledError):
        streamed.feed(adapter)


def test_discard_cuts_off_an_open_stream_and_reports_whether_it_had_started() -> None:
    mean = WeightedMean({"w": np.zeros(1000, np.float32)})
    not_started = Streamed(result("site-1", {"w": np.ones(1000, np.float32)}))
    started = Streamed(result("site-2", {"w": np.ones(1000, np.float32)}))
    idle, busy = not_started.open(mean), started.open(mean)
    assert idle is not None and busy is not None
    started.feed(busy, upto=1000)

    assert mean.discard("site-1") is False  # nothing of it was added: no restart needed
    assert mean.discard("site-2") is True
    assert mean.discard("site-3") is False  # never streamed
    for streamed, adapter in ((not_started, idle), (started, busy)):
        with pytest.raises(StreamCancelledError):
            streamed.feed(adapter)
        with pytest.raises(FedcellError):
            adapter.finish("digest")


def test_reset_forgets_everything_and_stops_open_streams() -> None:
    # Prepare: one result folded, one half-way
    mean = WeightedMean({"w": np.zeros(1000, np.float32)})
    Streamed(result("site-1", {"w": np.full(1000, 5.0, np.float32)})).fold(mean)
    half = Streamed(result("site-2", {"w": np.full(1000, 7.0, np.float32)}))
    adapter = half.open(mean)
    assert adapter is not None
    half.feed(adapter, upto=2000)

    # Execute
    mean.reset()

    # Assert: the half-way stream takes nothing more; a fresh result folds into a clean mean
    with pytest.raises(StreamCancelledError):
        half.feed(adapter)
    assert mean.count == 0 and mean.params_type is None
    Streamed(result("site-1", {"w": np.full(1000, 2.0, np.float32)})).fold(mean)
    np.testing.assert_allclose(mean.mean()["w"], np.full(1000, 2.0))
    with pytest.raises(RuntimeError, match="after mean"):
        mean.reset()


def test_torch_references_accumulate_streamed_numpy_and_float8_results() -> None:
    reference = {"w": torch.zeros(64), "q": torch.zeros(16, dtype=torch.float8_e4m3fn)}
    mean = WeightedMean(reference)
    params = {
        "w": np.arange(64, dtype=np.float32),
        "q": torch.full((16,), 0.5).to(torch.float8_e4m3fn),
    }
    Streamed(result("site-1", params, steps=2), chunk=7).fold(mean)
    averaged = mean.mean()
    assert torch.equal(averaged["w"], torch.arange(64, dtype=averaged["w"].dtype))
    assert torch.equal(averaged["q"], torch.full((16,), 0.5, dtype=averaged["q"].dtype))


def test_accumulators_reuse_pooled_memory_zeroed_once_the_old_model_is_dropped() -> None:
    # Prepare: a pool shared by two rounds' means; 2 MiB params are pooled (>= 1 MiB)
    reference = {"w": np.zeros(512 * 1024, np.float32)}
    pool = ArrayPool(WeightedMean(reference).accumulator_nbytes)
    first = WeightedMean(reference, pool=pool)
    Streamed(result("site-1", {"w": np.full(512 * 1024, 3.0, np.float32)}), chunk=1 << 20).fold(
        first
    )
    model = first.mean()["w"]
    np.testing.assert_array_equal(model, 3.0)
    assert pool.reused == 0

    # Execute: the first round's model is dropped; the second round allocates its accumulator
    del first, model
    second = WeightedMean(reference, pool=pool)
    Streamed(result("site-1", {"w": np.full(512 * 1024, 5.0, np.float32)}), chunk=1 << 20).fold(
        second
    )

    # Assert: the same memory, zeroed first (5, not 3 + 5)
    assert pool.reused == 1
    np.testing.assert_array_equal(second.mean()["w"], 5.0)
    pool.close()
