"""In-time weighted averaging of site results: the server holds one accumulator, not n models.

:class:`WeightedMean` is folded one :class:`~fedcell.engine.dispatcher.TaskResult` at a time, as
results arrive (``Dispatcher.broadcast_and_wait(..., fold=mean)``), and each result can be
dropped once folded. It is a :class:`~fedcell.engine.dispatcher.StreamingFold`: a result that
arrives as a stream is folded chunk by chunk while it streams in and never exists whole on the
server. Memory is the accumulator (one model at accumulator precision) whatever the number of
sites.

Rules, which follow NVIDIA FLARE's weighted aggregation:

- **Weight** of a result: ``meta[weigh_by]`` (default ``"NUM_STEPS_CURRENT_ROUND"``, FLARE's
  convention; a sample count works the same), 1 when the key is absent or ``weigh_by`` is
  ``None``. A weight that is not a finite number > 0 rejects the result.
- **Per-key means**: a site may send a subset of the reference keys (e.g. only trainable
  layers); each key is averaged over the sites that sent it. Keys nobody sent keep their
  reference (global) value.
- **FULL and DIFF**: the first result fixes the round's ``params_type`` (``None`` means FULL);
  a result of the other type is rejected. :meth:`WeightedMean.mean` is the mean of what was
  sent; :meth:`WeightedMean.update` turns it into the step from the global model (mean - global
  for FULL, the mean diff itself for DIFF), which server optimizers consume.
- **Validation first**: a result is checked whole (type, known keys, shapes, weight) before any
  of it is added, so a rejected result (:class:`~fedcell.errors.ProtocolError`, recorded by the
  dispatcher as that site's ``"failed"``) leaves the accumulator untouched. A streamed result is
  checked from its skeleton (every non-array value, every array's dtype and shape), which the
  stream announces before its first byte.

Folding while streaming (:meth:`WeightedMean.open_stream`): each verified chunk of a param is
added, at the result's weight, into its slice of the accumulator (elements cut by a chunk
boundary arrive whole, see :mod:`fedcell.transports.array_sink`; bf16 and float8 chunks are
widened exactly to float32). The weight, metrics and count of the result are added only when
the whole stream verified. A stream that breaks midway has added part of a result:
:meth:`WeightedMean.discard` reports it and :meth:`WeightedMean.reset` starts over, which is how
``broadcast_and_wait`` restarts the round without that site. Results carrying arrays outside
``params`` (in ``meta``, say) are taken whole, as before. Several streams fold into the same
accumulator at once (each adds its own slices), so results are summed in arrival order, chunk
by chunk; floating-point sums of three or more results can differ in the last bit between runs,
as whole results arriving in another order do.

Precision and memory (the budget is server memory ≤ 2·S + 256 MiB for an S-byte model): the
accumulator is float64 when the whole model has at most :data:`FLOAT64_ACCUMULATOR_LIMIT`
elements (≤ 64 MiB of accumulator, where exactness is free), float32 above that (float64
parameters always accumulate in float64). So bf16/fp16 models are summed in at least float32
rather than in their own 8-bit mantissa, and a large float32 model costs one extra S. Results come
back in each reference parameter's dtype (integers rounded), so bf16 stays bf16. Folding adds no
whole-model temporaries (torch ``add_(alpha=w)``; numpy in blocks of
:data:`ADD_BLOCK_ELEMENTS`). With results folded while they stream in, a large float32 model's
round holds the global model and the accumulator, 2·S, plus about a stream window per result
in flight; whole results (a runtime that does not stream) add the one being folded: 3·S.

Arrays stay in the reference's library: numpy references accumulate with numpy, torch references
with torch (CPU), and a site's tensor of the other library is converted on the way in. All
arithmetic is whole-array (vectorized); there is no per-element Python.
"""

from __future__ import annotations

import math
import sys
import weakref
from collections.abc import Mapping
from typing import Any

import numpy as np

from fedcell.engine.dispatcher import StreamingFold, TaskResult
from fedcell.errors import ProtocolError, StreamCancelledError
from fedcell.fl_model import FLModel, ParamsType
from fedcell.transports.array_sink import ArraySink
from fedcell.transports.codec import ArraySpec
from fedcell.transports.stream_receiver import POOLED_MIN_BYTES, ArrayPool

__all__ = [
    "ADD_BLOCK_ELEMENTS",
    "FLOAT64_ACCUMULATOR_LIMIT",
    "WeightedMean",
    "add_into",
    "as_params",
    "cast_like",
    "is_tensor",
    "sign",
    "sqrt",
    "zeros_like",
]

#: Models with at most this many elements accumulate in float64 (64 MiB of accumulator).
FLOAT64_ACCUMULATOR_LIMIT = 8 * 1024 * 1024


# ------------------------------------------------------------------------------------------------
# array helpers shared by the aggregation and the server optimizers (numpy or torch, whole-array)


def is_tensor(value: object) -> bool:
    """Whether ``value`` is a torch tensor (without importing torch)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


def _is_array(value: object) -> bool:
    return isinstance(value, np.ndarray) or is_tensor(value)


def _float_dtype_name(value: Any) -> str:
    if isinstance(value, ArraySpec) and value.library == "numpy":
        return np.dtype(value.dtype).name  # specs name numpy dtypes by their code ("<f4")
    return str(value.dtype).removeprefix("torch.")


def zeros_like(value: Any, dtype_name: str) -> Any:
    """Zeros with ``value``'s shape and library, of dtype ``"float32"`` or ``"float64"``."""
    if isinstance(value, np.ndarray):
        return np.zeros(value.shape, dtype=dtype_name)
    import torch

    return torch.zeros(value.shape, dtype=getattr(torch, dtype_name))


#: numpy has no fused ``a += w * x``: it is done in blocks of this many elements, so the
#: temporary ``w * x`` costs 8 MiB at most instead of a whole parameter.
ADD_BLOCK_ELEMENTS = 1 << 20


def add_into(accumulator: Any, value: Any, weight: float) -> None:
    """``accumulator += weight * value`` in place (``value`` in the accumulator's library;
    ``accumulator`` contiguous, as :func:`zeros_like` makes it)."""
    if not isinstance(accumulator, np.ndarray):
        accumulator.add_(value, alpha=weight)
    elif weight == 1.0:
        accumulator += value  # casts in small internal buffers: no temporary
    else:
        target, source = accumulator.reshape(-1), np.ravel(value)
        for start in range(0, target.size, ADD_BLOCK_ELEMENTS):
            block = slice(start, start + ADD_BLOCK_ELEMENTS)
            target[block] += weight * source[block]


def cast_like(value: Any, reference: Any) -> Any:
    """``value`` in ``reference``'s dtype (rounded for integer and bool dtypes)."""
    if isinstance(reference, np.ndarray):
        if reference.dtype.kind in "iub":
            value = np.rint(value)
        return value.astype(reference.dtype, copy=False)
    if not (reference.is_floating_point() or reference.is_complex()):
        value = value.round()
    return value.to(reference.dtype)


def sqrt(value: Any) -> Any:
    """Element-wise square root, numpy or torch."""
    return np.sqrt(value) if isinstance(value, np.ndarray) else value.sqrt()


def sign(value: Any) -> Any:
    """Element-wise sign, numpy or torch."""
    return np.sign(value) if isinstance(value, np.ndarray) else value.sign()


def as_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """A parameter dict whose values are arrays: tensors and arrays kept, numbers and nested lists
    (as a job config exports them) made numpy arrays."""
    return {name: v if _is_array(v) else np.asarray(v) for name, v in params.items()}


def _in_library_of(value: Any, reference: Any) -> Any:
    """``value`` (a site's array) as the reference's library; CPU, no grad."""
    if isinstance(reference, np.ndarray):
        if isinstance(value, np.ndarray):
            return value
        tensor = value.detach().cpu()
        if _float_dtype_name(tensor) in ("bfloat16", "float8_e4m3fn", "float8_e5m2"):
            tensor = tensor.float()  # numpy has no such dtypes
        return tensor.numpy()
    if isinstance(value, np.ndarray):
        import torch

        return torch.from_numpy(np.ascontiguousarray(value))
    return value.detach().cpu()


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _weight_of(model: FLModel, weigh_by: str | None, site: str) -> float:
    if weigh_by is None or weigh_by not in model.meta:
        return 1.0
    weight = model.meta[weigh_by]
    if not _is_number(weight):
        raise ProtocolError(f"{site}: meta[{weigh_by!r}] must be a number, not {weight!r}")
    if not (math.isfinite(weight) and weight > 0):
        raise ProtocolError(f"{site}: meta[{weigh_by!r}] must be finite and > 0, not {weight!r}")
    return float(weight)


# ------------------------------------------------------------------------------------------------


class WeightedMean(StreamingFold):
    """Running weighted mean of :class:`~fedcell.fl_model.FLModel` params and metrics.

    Parameters
    ----------
    reference:
        The global params the sites received (name → numpy array or torch tensor): fixes the
        keys, shapes, dtypes and library. ``None`` averages metrics only (e.g. validation).
    weigh_by:
        The ``meta`` key holding a result's weight; ``None`` weighs every result 1.
    adopt_results:
        The caller hands results over (see :meth:`_adopt`).
    pool:
        Where accumulators get their memory (zeroed): an
        :class:`~fedcell.transports.stream_receiver.ArrayPool` that a run of rounds shares, so a
        round's accumulator reuses the memory of a global model two rounds old (zeroed) instead
        of fresh memory, whose first touch costs 0.5-2.6 s per GiB of page faults on the project's
        VM (a fresh region from the pool is faulted in by a worker thread instead). Fresh zeroed
        memory when ``None``.
    """

    def __init__(
        self,
        reference: Mapping[str, Any] | None,
        weigh_by: str | None = "NUM_STEPS_CURRENT_ROUND",
        *,
        adopt_results: bool = False,
        pool: ArrayPool | None = None,
    ) -> None:
        self.reference: Mapping[str, Any] = reference if reference is not None else {}
        self.adopt_results = adopt_results
        self._pool = pool
        self._averages_params = reference is not None
        self.weigh_by = weigh_by
        elements = sum(int(np.prod(tuple(v.shape))) for v in self.reference.values())
        self._precision = "float64" if elements <= FLOAT64_ACCUMULATOR_LIMIT else "float32"
        self._sums: dict[str, Any] = {}
        self._weights: dict[str, float] = {}
        self._metric_sums: dict[str, float] = {}
        self._metric_weights: dict[str, float] = {}
        self.params_type: ParamsType | None = None
        self.count = 0
        self._finalized: str | None = None  # "mean" or "update": the accumulators' content
        self._streams: dict[str, _FoldingStream] = {}

    def fold(self, result: TaskResult) -> None:
        """Add an ok result's FLModel (the ``fold`` of ``broadcast_and_wait``); a result that
        :meth:`open_stream` already folded while it streamed in is skipped.

        Raises
        ------
        ProtocolError
            If the result is not a usable FLModel (see :meth:`add`).
        """
        stream = self._streams.get(result.site)
        if stream is not None and stream.state == "done":
            return
        if not isinstance(result.data, FLModel):
            raise ProtocolError(
                f"{result.site}: expected an FLModel, got {type(result.data).__name__}"
            )
        self.add(result.data, site=result.site)

    def open_stream(self, result: TaskResult) -> ArraySink | None:
        """Fold ``result``'s params chunk by chunk while they stream in (see the module
        docstring). ``result.data`` is the FLModel with an ``ArraySpec`` for each array; it is
        checked whole, as :meth:`add` checks a model, before any byte is added. Returns ``None``
        (take the result whole) when this mean averages metrics only or the model carries
        arrays outside ``params``.

        Raises
        ------
        ProtocolError
            As :meth:`add`.
        """
        site, model = result.site, result.data
        if not isinstance(model, FLModel):
            raise ProtocolError(f"{site}: expected an FLModel, got {type(model).__name__}")
        if not self._averages_params or _holds_spec(
            (model.meta, model.metrics, model.optimizer_params)
        ):
            return None
        specs: dict[str, ArraySpec] = self._checked_params(model, site, streamed=True)
        weight = self._checked_model(model, site)
        targets: dict[int, tuple[np.ndarray, ArraySpec]] = {}
        for name, spec in specs.items():
            if name not in self._sums:
                self._sums[name] = self._zeros(name)
                self._weights[name] = 0.0
            targets[spec.frame] = (_flat_numpy(self._sums[name]), spec)
        metrics = dict(model.metrics or {})
        stream = _FoldingStream(self, result, weight, targets, list(specs), metrics)
        self._streams[site] = stream
        return stream

    def discard(self, site: str) -> bool:
        """Take no more of ``site``'s result stream; return whether any of it was folded."""
        stream = self._streams.get(site)
        if stream is None:
            return False
        touched = stream.written or stream.state == "done"
        stream.close("discarded")
        return touched

    def reset(self) -> None:
        """Forget every result folded (the round restarts); open streams take no more chunks.

        Raises
        ------
        RuntimeError
            If :meth:`mean` or :meth:`update` already finalized the accumulators.
        """
        if self._finalized is not None:
            raise RuntimeError(f"WeightedMean.reset after {self._finalized}(): the result is final")
        for stream in self._streams.values():
            stream.close("discarded")
        self._streams.clear()
        self._sums.clear()
        self._weights.clear()
        self._metric_sums.clear()
        self._metric_weights.clear()
        self.params_type = None
        self.count = 0

    def _commit(self, names: list[str], weight: float, metrics: Mapping[str, Any]) -> None:
        """A streamed result arrived whole and verified: count its weight and metrics."""
        for name in names:
            self._weights[name] += weight
        self._add_metrics(metrics, weight)
        self.count += 1

    def _checked_model(self, model: FLModel, site: str) -> float:
        """Check ``model``'s meta, metrics and params type; return its weight."""
        if self._finalized is not None:
            raise RuntimeError(f"WeightedMean.add after {self._finalized}(): the result is final")
        if not isinstance(model.meta, Mapping):
            raise ProtocolError(f"{site}: meta must be a dict, not {type(model.meta).__name__}")
        if model.metrics is not None and not isinstance(model.metrics, Mapping):
            raise ProtocolError(
                f"{site}: metrics must be a dict, not {type(model.metrics).__name__}"
            )
        weight = _weight_of(model, self.weigh_by, site)
        if self._averages_params:
            kind = ParamsType(model.params_type or ParamsType.FULL)
            if self.params_type is None:
                self.params_type = kind
            elif kind is not self.params_type:
                raise ProtocolError(
                    f"{site}: sent {kind} params in a round of {self.params_type} params"
                )
        return weight

    def _add_metrics(self, metrics: Mapping[str, Any], weight: float) -> None:
        for name, metric in metrics.items():
            if _is_number(metric) and math.isfinite(metric):
                self._metric_sums[name] = self._metric_sums.get(name, 0.0) + weight * metric
                self._metric_weights[name] = self._metric_weights.get(name, 0.0) + weight

    def add(self, model: FLModel, site: str = "a site") -> None:
        """Fold ``model`` in; nothing is added when it is rejected.

        Raises
        ------
        ProtocolError
            If its params are not a dict of arrays with the reference's keys and shapes, its
            params type differs from the round's, or its weight is not a positive number.
        """
        params: dict[str, Any] = {}
        if self._averages_params:
            params = {
                name: _in_library_of(value, self.reference[name])
                for name, value in self._checked_params(model, site).items()
            }
        weight = self._checked_model(model, site)
        for name, value in params.items():
            if name not in self._sums:
                self._weights[name] = weight
                adopted = self._adopt(name, value, weight)
                if adopted is not None:
                    self._sums[name] = adopted
                    continue
                self._sums[name] = self._zeros(name)
                self._weights[name] = 0.0
            add_into(self._sums[name], value, weight)
            self._weights[name] += weight
        self._add_metrics(model.metrics or {}, weight)
        self.count += 1

    def _adopt(self, name: str, value: Any, weight: float) -> Any | None:
        """Use a key's first result as its accumulator (scaled in place) instead of allocating
        one: a large model's round then holds the global model, one accumulator and the result
        arriving, not a separate accumulator besides. Only with ``adopt_results`` (the caller
        hands results over, as a dispatcher does with the copies it decoded), only an array of
        the accumulator's library and precision that is writable, contiguous and shares no
        memory with the global model."""
        reference = self.reference[name]
        if not self.adopt_results or _float_dtype_name(value) != self._precision_of(name):
            return None
        if isinstance(reference, np.ndarray):
            if not (
                isinstance(value, np.ndarray)
                and value.flags.writeable
                and value.flags.c_contiguous
                and not np.may_share_memory(value, reference)
            ):
                return None
        elif not (
            is_tensor(value)
            and value.is_contiguous()
            and value.device == reference.device
            and value.untyped_storage().data_ptr() != reference.untyped_storage().data_ptr()
        ):
            return None
        if weight != 1.0:
            value *= weight
        return value

    @property
    def accumulator_nbytes(self) -> int:
        """Bytes of the accumulators of every reference param (the size of a pool for them)."""
        return sum(
            int(np.prod(tuple(v.shape))) * np.dtype(self._precision_of(name)).itemsize
            for name, v in self.reference.items()
        )

    def _zeros(self, name: str) -> Any:
        """A zeroed accumulator for ``name`` (from the pool when there is one)."""
        reference, precision = self.reference[name], self._precision_of(name)
        if self._pool is None:
            return zeros_like(reference, precision)
        if isinstance(reference, np.ndarray):
            spec = ArraySpec("numpy", np.dtype(precision).str, tuple(reference.shape), 0)
        else:
            spec = ArraySpec("torch", precision, tuple(reference.shape), 0)
        reused = self._pool.reused
        accumulator = self._pool.allocate(spec)
        if self._pool.reused != reused or spec.nbytes < POOLED_MIN_BYTES:
            _flat_numpy(accumulator).fill(0)  # recycled or small (np.empty) memory
        # else: a fresh anonymous region, zero already, faulted in by the pool's worker thread
        return accumulator

    def _precision_of(self, name: str) -> str:
        if _float_dtype_name(self.reference[name]) == "float64":
            return "float64"
        return self._precision

    def _checked_params(
        self, model: FLModel, site: str, *, streamed: bool = False
    ) -> dict[str, Any]:
        """``model``'s params, each checked against the reference (arrays, or the
        ``ArraySpec`` of each array of a result still streaming in)."""
        if not isinstance(model.params, Mapping):
            raise ProtocolError(
                f"{site}: params must be a dict of arrays, not {type(model.params).__name__}"
            )
        checked: dict[str, Any] = {}
        for name, value in model.params.items():
            reference = self.reference.get(name)
            if reference is None:
                raise ProtocolError(f"{site}: param {name!r} is not in the global model")
            if not (isinstance(value, ArraySpec) if streamed else _is_array(value)):
                raise ProtocolError(
                    f"{site}: param {name!r} is {type(value).__name__}, not an array or tensor"
                )
            if tuple(value.shape) != tuple(reference.shape):
                raise ProtocolError(
                    f"{site}: param {name!r} has shape {tuple(value.shape)}, the global model "
                    f"has {tuple(reference.shape)}"
                )
            if _float_dtype_name(value).startswith("complex"):
                raise ProtocolError(f"{site}: param {name!r} is complex")
            checked[name] = value
        return checked

    def mean(self) -> dict[str, Any]:
        """The weighted mean of each key some site sent, at accumulator precision (float64 or
        float32). Finalizes: the accumulators are divided in place and returned (no copy)."""
        if self._finalized == "update":
            raise RuntimeError("WeightedMean.mean after update(): the accumulators hold the step")
        if self._finalized is None:
            for name, total in self._sums.items():
                total /= self._weights[name]
            self._finalized = "mean"
        return self._sums

    def update(self) -> dict[str, Any]:
        """The averaged step from the global model, per key sent, at accumulator precision:
        ``mean - global`` for FULL rounds, the mean diff for DIFF rounds. Finalizes in place."""
        if self._finalized == "update":
            return self._sums
        means = self.mean()
        if self.params_type is ParamsType.FULL:
            for name, value in means.items():
                value -= self.reference[name]
        self._finalized = "update"
        return means

    def metrics(self) -> dict[str, float]:
        """Weighted mean of each numeric metric, over the results that reported it."""
        return {
            name: total / self._metric_weights[name] for name, total in self._metric_sums.items()
        }


# ------------------------------------------------------------------------------------------------
# folding a result while it streams in


class _FoldingStream(ArraySink):
    """One site's result, folded chunk by chunk into its :class:`WeightedMean`'s accumulators.

    ``state``: ``"open"`` (chunks are being added), ``"done"`` (arrived whole and verified:
    weight and metrics counted), ``"failed"`` (the stream broke) or ``"discarded"`` (the mean
    takes no more of it; a late chunk fails the stream).
    """

    # It holds its mean weakly: the mean holds its streams, and a reference cycle would keep the
    # accumulators (one model) alive until the cyclic garbage collector happens to run.

    def __init__(
        self,
        mean: WeightedMean,
        result: TaskResult,
        weight: float,
        targets: dict[int, tuple[np.ndarray, ArraySpec]],
        names: list[str],
        metrics: dict[str, Any],
    ) -> None:
        self.state = "open"
        self.written = False
        self._mean = weakref.ref(mean)
        self._result = result
        self._weight = weight
        self._targets = targets
        self._names = names
        self._metrics = metrics

    def write(self, frame: int, start: int, data: memoryview) -> None:
        if self.state != "open":
            raise StreamCancelledError(f"{self._result.site}: its result is no longer aggregated")
        accumulator, spec = self._targets[frame]
        values = _chunk_values(data, spec)
        first = start // (data.nbytes // values.size) if values.size else 0
        self.written = True
        add_into(accumulator[first : first + values.size], values, self._weight)

    def finish(self) -> TaskResult:
        if self.state != "open":
            raise StreamCancelledError(f"{self._result.site}: its result is no longer aggregated")
        mean = self._mean()
        if mean is None:
            raise StreamCancelledError(f"{self._result.site}: its aggregate is gone")
        self.close("done")
        mean._commit(self._names, self._weight, self._metrics)
        return self._result

    def abort(self, error: Exception) -> None:
        self.close("failed")

    def close(self, state: str) -> None:
        """Leave the ``"open"`` state for ``state`` (no-op once closed): no more chunks."""
        if self.state == "open":
            self.state = state
            self._targets = {}


def _holds_spec(value: object) -> bool:
    """Whether an array (an ``ArraySpec`` in a streamed result's skeleton) is inside ``value``."""
    if isinstance(value, ArraySpec):
        return True
    if isinstance(value, Mapping):
        return any(_holds_spec(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_holds_spec(v) for v in value)
    return False


def _flat_numpy(accumulator: Any) -> np.ndarray:
    """A flat numpy view of a contiguous float32/float64 accumulator (array or CPU tensor)."""
    if isinstance(accumulator, np.ndarray):
        return accumulator.reshape(-1)
    flat: np.ndarray = accumulator.numpy().reshape(-1)
    return flat


def _chunk_values(data: memoryview, spec: ArraySpec) -> np.ndarray:
    """Whole elements of a streamed array as numpy numbers (bf16 and float8 widened exactly to
    float32; the accumulator is at least float32)."""
    if spec.dtype == "bfloat16":  # the top half of a float32: widen by shifting, exactly
        bits = np.frombuffer(data, dtype=np.uint16)
        widened: np.ndarray = (bits.astype(np.uint32) << 16).view(np.float32)
        return widened
    if spec.dtype.startswith("float8"):
        import torch

        raw = torch.frombuffer(bytearray(data), dtype=getattr(torch, spec.dtype))
        return raw.float().numpy()
    return np.frombuffer(data, dtype=np.dtype(spec.dtype))
