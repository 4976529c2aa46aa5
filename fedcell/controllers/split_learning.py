"""Split learning (vertical): one network cut in two, trained across a data site and a label site.

The **data site** holds the features and the bottom of the network (input → cut layer); the
**label site** holds the labels and the top (cut layer → logits → loss). Neither ever sees the
other's half of the data: per batch, the activations of the cut layer travel forward and their
gradients travel back, nothing else. Executors: :mod:`fedcell.executors.split_learning`.

Who drives the batch loop
    The :class:`SplitLearning` controller, through the ordinary
    :class:`~fedcell.engine.dispatcher.Dispatcher`: every batch is two tasks, one per site, so
    the algorithm is testable with a
    :class:`~fedcell.engine.local_dispatcher.LocalDispatcher`, runs unchanged over cells and
    gets the dispatcher's failure statuses (a lost site ends the run with a clear error rather
    than a hung peer-to-peer exchange). The price is that cut tensors cross the server: each
    is sent twice on the wire (site → server → other site). At cut-layer sizes (a batch × a few
    dozen floats) that is a few kilobytes a batch; the per-batch cost is dominated by message
    latency, which the pipelining below keeps to two round trips.

One batch, pipelined (two messages per batch, not three)::

    server → data site    Task("split_train", ForwardRequest(rows_i, gradient_{i-1}))
                          data site: apply gradient_{i-1} to batch i-1's graph, optimizer step,
                          then forward batch i through the updated bottom
    data site → server    CutActivations(activations_i)
    server → label site   Task("split_train", LabelRequest(rows_i, activations_i))
                          label site: top forward, loss against its labels, backward, step
    label site → server   CutGradient(d loss / d activations_i, loss_i)

Each side steps its own optimizer on its own parameters with gradients computed before any step
of that batch, and batch i+1 is computed by the bottom updated with batch i: exactly the updates
of training the whole network in one place with the same initial weights, data order and
optimizer. That is what the accuracy test checks (against centralized training, same seed).
After the last batch one more ``ForwardRequest(rows=None, gradient)`` applies the last gradient.

Sample alignment
    Each site loads its part of every sample with the sample's id (ids shared by both sites,
    e.g. a record number; computing the intersection of two id sets is not part of this
    protocol) and sorts its samples by id, so row ``r`` is the same sample at both sites. A
    setup task asks each site for its role, sample counts and a SHA-256 digest of its sorted ids
    per split; the controller refuses to train when they differ. Batch order is the
    controller's: :func:`batch_order` (a permutation seeded by ``(seed, epoch)``) cut into
    batches, and every request names its rows, so the two sites cannot drift apart. The same
    ``seed`` is sent at setup so both sites build their half of the network from the same
    seeded initial weights as a centralized run would.

What travels
    Row positions (int32, server → sites), cut-layer activations (data site → label site) and
    their gradients (back). Never labels, never raw features; the final evaluation runs on the
    ``"validate"`` split with the top at the label site, and only its counts (correct, samples,
    loss sum) leave it. Cut activations and gradients do carry information about features and
    labels (known split-learning leakage); protecting them (noise, secure aggregation) is out of
    scope here.

Bytes and time
    The controller measures the encoded size (header + tensor bytes) of what each site sends per
    batch and of what it sends itself, and the wall time per batch. Each epoch's record in
    ``meta["history"]`` holds them (``metrics`` of the record, so the simulator's
    ``metrics.csv`` lists them), and each epoch is logged. Measured with
    ``examples/split-learning`` (a 32→64→16 bottom, a 16→32→4 top, batches of 64, 2 shared
    cores): each site sends 4.2 kB per batch (64×16 float32 plus a ~60-byte header), the server
    8.8 kB (rows and both relayed tensors); 0.8 ms of compute per batch becomes 2.3 ms with the
    sites as threads of the simulator and 3.2 ms with the sites as processes over ipc, and the
    split run reaches the centralized run's accuracy exactly.

Output
    An :class:`~fedcell.fl_model.FLModel` without params (the halves stay at their sites, which
    save them when asked, see the executors' ``save_as``) whose
    ``metrics`` are the validation ``accuracy`` and ``loss``; ``meta`` holds ``history`` (per
    epoch: train loss, batches, seconds, ms per batch, bytes per batch by sender) and
    ``bytes_per_batch`` / ``ms_per_batch`` over the whole run.

Limits: exactly one data site and one label site; the executors keep the model halves between
tasks, so one split-learning node runs at a time per pair of executors.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import numpy as np

from fedcell.engine.dispatcher import Controller, ControllerContext, Task
from fedcell.errors import ConfigError, ProtocolError, TooFewResultsError
from fedcell.fl_model import FLModel
from fedcell.transports.codec import encode, pack_tree, payload_nbytes, wire_type

__all__ = [
    "EVALUATE_TASK",
    "SETUP_TASK",
    "SPLITS",
    "TRAIN_TASK",
    "CutActivations",
    "CutGradient",
    "EvalCounts",
    "ForwardRequest",
    "LabelRequest",
    "SiteSamples",
    "SplitLearning",
    "batch_order",
    "ids_digest",
    "wire_size",
]

SETUP_TASK = "split_setup"
TRAIN_TASK = "split_train"
EVALUATE_TASK = "split_evaluate"
#: The sample splits each site loads: training batches and the final evaluation.
SPLITS: tuple[str, ...] = ("train", "validate")

SplitRole = Literal["data", "label"]

#: Row positions travel as int32 (half the bytes of int64); setup refuses larger splits.
_ROW_DTYPE = np.int32
_MAX_ROWS = int(np.iinfo(_ROW_DTYPE).max)

T = TypeVar("T")


@wire_type("fedcell.split.SiteSamples")
@dataclass(frozen=True)
class SiteSamples:
    """A site's answer to the setup task: its role and, per split, sample count and id digest."""

    role: str
    counts: dict[str, int]
    digests: dict[str, str]


@wire_type("fedcell.split.ForwardRequest")
@dataclass(frozen=True)
class ForwardRequest:
    """Server → data site: apply ``gradient`` (of the previous train batch), then forward ``rows``.

    ``rows`` are positions into the site's id-sorted samples of ``split``; ``None`` only applies
    the gradient (the end of training).
    """

    split: str
    rows: np.ndarray | None
    gradient: Any = None


@wire_type("fedcell.split.CutActivations")
@dataclass(frozen=True)
class CutActivations:
    """Data site → server: the cut layer's output for the requested rows."""

    activations: Any


@wire_type("fedcell.split.LabelRequest")
@dataclass(frozen=True)
class LabelRequest:
    """Server → label site: the cut activations of ``rows`` of ``split``."""

    split: str
    rows: np.ndarray
    activations: Any


@wire_type("fedcell.split.CutGradient")
@dataclass(frozen=True)
class CutGradient:
    """Label site → server: d loss / d activations for the batch, and the batch's mean loss."""

    gradient: Any
    loss: float


@wire_type("fedcell.split.EvalCounts")
@dataclass(frozen=True)
class EvalCounts:
    """Label site → server: evaluation of one batch; only these numbers leave the label site."""

    correct: int
    count: int
    loss_sum: float


def batch_order(seed: int, epoch: int, n_samples: int) -> np.ndarray:
    """The order in which epoch ``epoch`` visits samples ``0 .. n_samples-1`` (int64 positions).

    A centralized run that visits its id-sorted samples in this order, cut into batches of the
    same size, makes exactly the same updates as the split run.
    """
    return np.random.default_rng((seed, epoch)).permutation(n_samples)


def ids_digest(sorted_ids: np.ndarray) -> str:
    """SHA-256 of a sorted id array; integer and string ids hash differently on purpose.

    Raises
    ------
    ConfigError
        If the ids are neither integers nor strings.
    """
    if sorted_ids.dtype.kind in "iu":
        content = b"int:" + sorted_ids.astype("<i8").tobytes()
    elif sorted_ids.dtype.kind == "U":
        content = b"str:" + "\x00".join(sorted_ids.tolist()).encode()
    else:
        raise ConfigError(f"sample ids must be integers or strings, not {sorted_ids.dtype}")
    return hashlib.sha256(content).hexdigest()


def wire_size(value: Any) -> int:
    """Bytes ``value`` takes as a payload on the wire: encoded header plus raw buffers."""
    tree, buffers = encode(value)
    return len(pack_tree(tree)) + payload_nbytes(buffers)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _positive_int(owner: str, name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{owner}: {name} must be an integer >= 1, not {value!r}")


@dataclass
class _Traffic:
    """What one epoch (or the whole run) moved: batches, seconds and bytes by sender."""

    batches: int = 0
    seconds: float = 0.0
    loss_sum: float = 0.0
    sent: dict[str, int] = field(
        default_factory=lambda: {"data_site": 0, "label_site": 0, "server": 0}
    )

    def add(self, other: _Traffic) -> None:
        self.batches += other.batches
        self.seconds += other.seconds
        self.loss_sum += other.loss_sum
        for sender, count in other.sent.items():
            self.sent[sender] += count

    def per_batch(self) -> dict[str, float]:
        batches = max(self.batches, 1)
        return {sender: count / batches for sender, count in self.sent.items()}

    def ms_per_batch(self) -> float:
        return 1000.0 * self.seconds / max(self.batches, 1)


@dataclass
class SplitLearning(Controller):
    """Train a network split between a data site (bottom) and a label site (top).

    Parameters
    ----------
    data_site:
        The site holding the features and the bottom of the network.
    label_site:
        The site holding the labels and the top of the network.
    epochs:
        Passes over the training split (≥ 1).
    batch_size:
        Training samples per batch (≥ 1); the last batch of an epoch may be smaller.
    eval_batch_size:
        Samples per batch of the final evaluation (≥ 1).
    seed:
        Seeds the batch order (:func:`batch_order`) and, sent at setup, the initial weights of
        both halves.
    step_timeout:
        Seconds one site has for one step (setup, one batch, one evaluation batch); ``None``:
        wait until it answers or is lost.
    """

    data_site: str = "site-1"
    label_site: str = "site-2"
    epochs: int = 1
    batch_size: int = 64
    eval_batch_size: int = 1024
    seed: int = 0
    step_timeout: float | None = None

    @property
    def task_names(self) -> tuple[str, ...]:
        return (SETUP_TASK, TRAIN_TASK, EVALUATE_TASK)

    def validate(self) -> None:
        """Check the configuration.

        Raises
        ------
        ConfigError
            Naming the first bad parameter.
        """
        owner = type(self).__name__
        for name in ("data_site", "label_site"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ConfigError(f"{owner}: {name} must be a site name, not {value!r}")
        if self.data_site == self.label_site:
            raise ConfigError(
                f"{owner}: data_site and label_site must differ (both {self.data_site!r})"
            )
        for name in ("epochs", "batch_size", "eval_batch_size"):
            _positive_int(owner, name, getattr(self, name))
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ConfigError(f"{owner}: seed must be an integer >= 0, not {self.seed!r}")
        if self.step_timeout is not None and not (
            _is_number(self.step_timeout) and self.step_timeout > 0
        ):
            raise ConfigError(
                f"{owner}: step_timeout must be a number > 0, not {self.step_timeout!r}"
            )

    async def run(self, ctx: ControllerContext) -> FLModel:
        """Set up both sites, train ``epochs`` epochs batch by batch, evaluate at the label site.

        Raises
        ------
        ConfigError
            If the configuration is invalid, a site is not in the job, a site answers setup
            with the wrong role, or the two sites hold different samples.
        ProtocolError
            If a site answers a step with something other than the protocol's reply.
        TooFewResultsError
            If a site fails, crashes or times out on a step (the message says which step).
        """
        self.validate()
        missing = [s for s in (self.data_site, self.label_site) if s not in ctx.dispatcher.sites]
        if missing:
            raise ConfigError(
                f"{type(self).__name__} node {ctx.node!r}: {missing} are not sites of the job "
                f"(sites: {list(ctx.dispatcher.sites)})"
            )
        counts = await self._setup(ctx)
        history: list[dict[str, Any]] = []
        total = _Traffic()
        gradient: Any = None
        for epoch in range(self.epochs):
            traffic, gradient = await self._train_epoch(ctx, epoch, counts["train"], gradient)
            total.add(traffic)
            record = _epoch_record(epoch, traffic)
            history.append(record)
            ctx.report(epoch + 1, self.epochs, record["metrics"])
            ctx.logger.info(
                "%s epoch %d/%d: loss %.4f, %d batches, %.2f ms/batch, bytes/batch sent by "
                "data site %.0f, label site %.0f, server %.0f",
                ctx.node, epoch + 1, self.epochs, record["metrics"]["train_loss"],
                traffic.batches, traffic.ms_per_batch(), *traffic.per_batch().values(),
            )  # fmt: skip
        await self._ask(
            ctx, self.data_site, TRAIN_TASK, ForwardRequest("train", None, gradient),
            type(None), "the last gradient",
        )  # fmt: skip
        metrics = await self._evaluate(ctx, counts["validate"])
        ctx.logger.info("%s validation: %s", ctx.node, metrics)
        return FLModel(
            metrics=metrics,
            current_round=self.epochs - 1,
            total_rounds=self.epochs,
            meta={
                "history": history,
                "bytes_per_batch": total.per_batch(),
                "ms_per_batch": total.ms_per_batch(),
                "validation": metrics,
            },
        )

    async def _setup(self, ctx: ControllerContext) -> dict[str, int]:
        task_props = {"seed": self.seed}
        data, label = await asyncio.gather(
            self._ask(ctx, self.data_site, SETUP_TASK, None, SiteSamples, "setup", task_props),
            self._ask(ctx, self.label_site, SETUP_TASK, None, SiteSamples, "setup", task_props),
        )
        owner = f"{type(self).__name__} node {ctx.node!r}"
        for site, reply, role in (
            (self.data_site, data, "data"),
            (self.label_site, label, "label"),
        ):
            if not (isinstance(reply.counts, dict) and isinstance(reply.digests, dict)):
                raise ProtocolError(f"{site} answered setup without per-split counts and digests")
            if reply.role != role:
                raise ConfigError(
                    f"{owner}: {site} should be the {role} site but runs the {reply.role} "
                    "executor; check the executor bindings"
                )
        counts: dict[str, int] = {}
        for split in SPLITS:
            n_data, n_label = data.counts.get(split), label.counts.get(split)
            if not isinstance(n_data, int) or isinstance(n_data, bool) or n_data < 1:
                raise ConfigError(f"{owner}: {self.data_site} has no {split!r} samples")
            if n_data > _MAX_ROWS:
                raise ConfigError(f"{owner}: {n_data} {split!r} samples; at most {_MAX_ROWS}")
            if n_data != n_label or data.digests.get(split) != label.digests.get(split):
                raise ConfigError(
                    f"{owner}: {self.data_site} and {self.label_site} hold different {split!r} "
                    f"samples ({n_data} vs {n_label} ids, or the same number of different ids); "
                    "both must load the same sample ids"
                )
            counts[split] = n_data
        ctx.logger.info("%s: aligned samples %s", ctx.node, counts)
        return counts

    async def _train_epoch(
        self, ctx: ControllerContext, epoch: int, n_train: int, gradient: Any
    ) -> tuple[_Traffic, Any]:
        traffic = _Traffic()
        order = batch_order(self.seed, epoch, n_train).astype(_ROW_DTYPE)
        started = time.perf_counter()
        for batch, start in enumerate(range(0, n_train, self.batch_size)):
            rows = order[start : start + self.batch_size]
            step = f"epoch {epoch} batch {batch}"
            forward = ForwardRequest("train", rows, gradient)
            cut = await self._ask(ctx, self.data_site, TRAIN_TASK, forward, CutActivations, step)
            backward = LabelRequest("train", rows, cut.activations)
            reply = await self._ask(ctx, self.label_site, TRAIN_TASK, backward, CutGradient, step)
            if not _is_number(reply.loss):
                raise ProtocolError(f"{self.label_site} sent loss {reply.loss!r:.40} for {step}")
            gradient = reply.gradient
            traffic.batches += 1
            traffic.loss_sum += float(reply.loss)
            traffic.sent["data_site"] += wire_size(cut)
            traffic.sent["label_site"] += wire_size(reply)
            traffic.sent["server"] += wire_size(forward) + wire_size(backward)
        traffic.seconds = time.perf_counter() - started
        return traffic, gradient

    async def _evaluate(self, ctx: ControllerContext, n_validate: int) -> dict[str, float]:
        correct = count = 0
        loss_sum = 0.0
        for start in range(0, n_validate, self.eval_batch_size):
            rows = np.arange(start, min(start + self.eval_batch_size, n_validate), dtype=_ROW_DTYPE)
            step = f"evaluation rows {start}..{rows[-1]}"
            forward = ForwardRequest("validate", rows)
            cut = await self._ask(ctx, self.data_site, EVALUATE_TASK, forward, CutActivations, step)
            request = LabelRequest("validate", rows, cut.activations)
            counts = await self._ask(ctx, self.label_site, EVALUATE_TASK, request, EvalCounts, step)
            if not (
                _is_number(counts.loss_sum)
                and isinstance(counts.correct, int)
                and counts.count == len(rows)
                and 0 <= counts.correct <= counts.count
            ):
                raise ProtocolError(
                    f"{self.label_site} evaluated {step} as {counts.correct!r:.20}/"
                    f"{counts.count!r:.20} correct (loss sum {counts.loss_sum!r:.20}); the "
                    f"batch has {len(rows)} samples"
                )
            correct += counts.correct
            count += counts.count
            loss_sum += float(counts.loss_sum)
        return {"accuracy": correct / count, "loss": loss_sum / count}

    async def _ask(
        self,
        ctx: ControllerContext,
        site: str,
        task_name: str,
        data: Any,
        expected: type[T],
        step: str,
        props: dict[str, Any] | None = None,
    ) -> T:
        task = Task(task_name, data, props=dict(props or {}), timeout=self.step_timeout)
        try:
            (result,) = await ctx.dispatcher.broadcast_and_wait(task, [site])
        except TooFewResultsError as exc:
            raise TooFewResultsError(
                f"{type(self).__name__} node {ctx.node!r}, {step}: {exc}", exc.results
            ) from exc
        if not isinstance(result.data, expected):
            raise ProtocolError(
                f"{site} answered {task_name!r} ({step}) with {type(result.data).__name__}, "
                f"not {expected.__name__}"
            )
        return result.data


def _epoch_record(epoch: int, traffic: _Traffic) -> dict[str, Any]:
    per_batch = traffic.per_batch()
    return {
        "round": epoch,
        "batches": traffic.batches,
        "seconds": traffic.seconds,
        "metrics": {
            "train_loss": traffic.loss_sum / max(traffic.batches, 1),
            "ms_per_batch": traffic.ms_per_batch(),
            "data_site_bytes_per_batch": per_batch["data_site"],
            "label_site_bytes_per_batch": per_batch["label_site"],
            "server_bytes_per_batch": per_batch["server"],
        },
    }
