"""The two site halves of split learning: :class:`SplitDataExecutor` and :class:`SplitLabelExecutor`.

The protocol, the batch loop and the reasons behind them are in
:mod:`fedcell.controllers.split_learning`; this module is what runs at the sites.

Both executors answer the same three tasks (``split_setup``, ``split_train``,
``split_evaluate``), so one :class:`~fedcell.controllers.split_learning.SplitLearning` node finds
an executor at each of its two sites; which half a site runs is its binding
(``job.add_executor(SplitDataExecutor(...), sites=["site-1"])``), and setup reports it so a
swapped binding fails at once.

Configuration is plain values: ``model`` builds the site's half of the network (a module-level
function or class, exported by reference), ``features`` / ``labels`` load the site's part of a
split::

    features(split) -> (sample_ids, features)     split is "train" or "validate"
    labels(split)   -> (sample_ids, labels)

``sample_ids`` is a 1-D sequence of unique integers or strings, one per row; each site sorts its
rows by id so that row positions in the controller's requests mean the same sample at both sites.

Setup (per run) loads both splits, builds the half under ``torch.manual_seed(seed)`` (the seed
comes from the controller; the global RNG is restored afterwards, and a lock keeps sites that
share a process from seeding each other's build) and creates the optimizer
``torch.optim.<optimizer>(params, **optimizer_args)``. A rerun of setup starts from scratch.

When the job ends (``stop``), a site with ``save_as`` set saves its trained half's
``state_dict`` into its workspace: each half stays where it was trained.

State between tasks: the data site keeps the graph of its last training forward until the
matching gradient arrives (in the next request); the label site keeps nothing but its half and
optimizer. Every request from the network is checked (types, row ranges, tensor shapes and
dtypes, a gradient without a pending batch or a batch whose gradient never came) and refused with
:class:`~fedcell.errors.ProtocolError`, which the site runtime reports as a failed task while the
site keeps serving. The user's model and loss run on a worker thread, never on the event loop.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch.nn import functional

from fedcell.controllers.split_learning import (
    EVALUATE_TASK,
    SETUP_TASK,
    SPLITS,
    TRAIN_TASK,
    CutActivations,
    CutGradient,
    EvalCounts,
    ForwardRequest,
    LabelRequest,
    SiteSamples,
    SplitRole,
    ids_digest,
)
from fedcell.engine.dispatcher import Task
from fedcell.errors import ConfigError, ProtocolError, TaskFailedError
from fedcell.executors.base import Executor, SiteContext, user_code_failed

__all__ = ["SplitDataExecutor", "SplitLabelExecutor"]

logger = logging.getLogger(__name__)

SplitLoader = Callable[[str], tuple[Any, Any]]
"""``loader(split) -> (sample_ids, values)``: one site's part of a split."""

#: Seeded model building uses torch's process-wide RNG: sites sharing a process (the threads
#: simulator) build one at a time so each gets exactly its seed's weights.
_SEEDED_BUILD = threading.Lock()


def _aligned(loader: SplitLoader, split: str, what: str) -> tuple[torch.Tensor, str]:
    """Load ``split`` and return its values sorted by sample id, with the ids' digest."""
    try:
        ids, values = loader(split)
    except Exception as exc:
        raise user_code_failed(f"{what}({split!r})", exc) from exc
    id_array = np.asarray(ids)
    tensor = torch.as_tensor(values)
    if id_array.ndim != 1 or tensor.ndim == 0 or len(id_array) != len(tensor):
        raise ConfigError(
            f"{what}({split!r}) returned {id_array.shape} ids for {tuple(tensor.shape)} values; "
            "give one id per row"
        )
    order = np.argsort(id_array, kind="stable")
    sorted_ids = id_array[order]
    if len(sorted_ids) > 1 and bool(np.any(sorted_ids[1:] == sorted_ids[:-1])):
        raise ConfigError(f"{what}({split!r}) returned duplicate sample ids")
    return tensor[torch.from_numpy(order)], ids_digest(sorted_ids)


def _checked_rows(rows: object, n_rows: int, split: str) -> torch.Tensor:
    if not (isinstance(rows, np.ndarray) and rows.ndim == 1 and rows.dtype.kind in "iu"):
        raise ProtocolError(f"rows of {split!r} must be a 1-D integer array, not {rows!r:.80}")
    if rows.size == 0 or int(rows.min()) < 0 or int(rows.max()) >= n_rows:
        raise ProtocolError(f"rows of {split!r} must be non-empty and in 0..{n_rows - 1}")
    return torch.from_numpy(rows.astype(np.int64, copy=False))


def _checked_tensor(value: object, what: str) -> torch.Tensor:
    if not (isinstance(value, torch.Tensor) and value.is_floating_point()):
        raise ProtocolError(f"{what} must be a floating-point tensor, not {type(value).__name__}")
    return value


@dataclass(kw_only=True)
class _SplitSite(Executor):
    """What both halves share: the model half, its optimizer, the task dispatch."""

    model: Callable[[], torch.nn.Module]
    optimizer: str = "SGD"
    optimizer_args: dict[str, Any] = field(default_factory=lambda: {"lr": 0.1})
    device: str = "cpu"
    save_as: str | None = None
    _workspace: Path | None = field(default=None, init=False, repr=False, compare=False)
    _module: torch.nn.Module | None = field(default=None, init=False, repr=False, compare=False)
    _optim: torch.optim.Optimizer | None = field(
        default=None, init=False, repr=False, compare=False
    )
    _data: dict[str, torch.Tensor] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )
    _log: logging.Logger = field(
        default_factory=lambda: logger, init=False, repr=False, compare=False
    )

    ROLE: ClassVar[SplitRole]

    @property
    def task_names(self) -> tuple[str, ...]:
        return (SETUP_TASK, TRAIN_TASK, EVALUATE_TASK)

    @abc.abstractmethod
    def _loader(self) -> tuple[SplitLoader, str]:
        """This half's data loader and its name for messages."""

    @abc.abstractmethod
    def _step(self, train: bool, request: Any) -> Any:
        """One training or evaluation step on a request from the controller."""

    async def start(self, site: SiteContext) -> None:
        """Check the configuration (the model and data are built at setup, per run).

        Raises
        ------
        ConfigError
            If ``torch.optim`` has no optimizer named ``optimizer``, ``optimizer_args`` is not
            a dict with string keys, or ``save_as`` is not a plain file name or the site has no
            workspace to save it in.
        """
        if self.save_as is not None:
            if not isinstance(self.save_as, str) or Path(self.save_as).name != self.save_as:
                raise ConfigError(
                    f"{type(self).__name__}: save_as must be a file name, not {self.save_as!r}"
                )
            if site.workspace is None:
                raise ConfigError(
                    f"{type(self).__name__}: save_as={self.save_as!r} but site "
                    f"{site.site_name!r} has no workspace"
                )
        self._workspace = site.workspace
        self._log = site.logger
        optimizer_class = getattr(torch.optim, str(self.optimizer), None)
        if not (
            isinstance(optimizer_class, type) and issubclass(optimizer_class, torch.optim.Optimizer)
        ):
            raise ConfigError(
                f"{type(self).__name__}: torch.optim has no optimizer {self.optimizer!r}"
            )
        if not isinstance(self.optimizer_args, dict) or not all(
            isinstance(key, str) for key in self.optimizer_args
        ):
            raise ConfigError(f"{type(self).__name__}: optimizer_args must be a dict of str keys")

    async def execute(self, task: Task) -> Any:
        """Run one split-learning step.

        Raises
        ------
        ConfigError
            If the task is not a split-learning task or arrives before setup.
        ProtocolError
            If the request is malformed or out of order.
        TaskFailedError
            If the model, the loss or the data loader raised.
        """
        if task.name == SETUP_TASK:
            seed = task.props.get("seed")
            if not isinstance(seed, int) or isinstance(seed, bool):
                raise ProtocolError(f"setup needs an integer seed, not {seed!r}")
            return await asyncio.to_thread(self._setup, seed)
        if task.name not in (TRAIN_TASK, EVALUATE_TASK):
            raise ConfigError(f"{type(self).__name__} answers {self.task_names}, not {task.name!r}")
        if self._module is None:
            raise ConfigError(f"{type(self).__name__}: {task.name!r} before {SETUP_TASK!r}")
        return await asyncio.to_thread(self._step, task.name == TRAIN_TASK, task.data)

    def _setup(self, seed: int) -> SiteSamples:
        loader, what = self._loader()
        self._module = self._optim = None
        self._data = {}
        digests: dict[str, str] = {}
        for split in SPLITS:
            values, digests[split] = _aligned(loader, split, what)
            self._data[split] = values.to(self.device)
        try:
            with _SEEDED_BUILD, torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                module = self.model().to(self.device)
            self._optim = getattr(torch.optim, self.optimizer)(
                module.parameters(), **self.optimizer_args
            )
        except Exception as exc:
            raise user_code_failed(f"building the {self.ROLE} half", exc) from exc
        self._module = module
        counts = {split: len(values) for split, values in self._data.items()}
        return SiteSamples(self.ROLE, counts, digests)

    def _rows(self, split: object, rows: object, train: bool) -> torch.Tensor:
        if not isinstance(split, str) or split not in self._data:
            raise ProtocolError(f"unknown split {split!r}; expected one of {SPLITS}")
        if train and split != SPLITS[0]:
            raise ProtocolError(f"training uses the {SPLITS[0]!r} split only, not {split!r}")
        return _checked_rows(rows, len(self._data[split]), split).to(self.device)

    async def stop(self) -> None:
        """Save the trained half if ``save_as`` asks for it, then drop the half, its optimizer,
        the data and any pending batch."""
        module, self._module, self._optim, self._data = self._module, None, None, {}
        if self.save_as is not None and self._workspace is not None and module is not None:
            path = self._workspace / self.save_as
            state = {name: value.detach().cpu() for name, value in module.state_dict().items()}
            await asyncio.to_thread(torch.save, state, path)
            self._log.info("saved the %s half of the split model to %s", self.ROLE, path)


@dataclass(kw_only=True)
class SplitDataExecutor(_SplitSite):
    """The data site: features and the bottom of the network (input → cut layer).

    Attributes
    ----------
    model:
        Builds the bottom half (a module-level function or class).
    features:
        ``features(split) -> (sample_ids, features)`` for ``split`` in ``"train"``,
        ``"validate"``.
    optimizer, optimizer_args:
        ``torch.optim.<optimizer>(bottom.parameters(), **optimizer_args)``.
    device:
        Where the bottom and the features live.
    save_as:
        File name in the site's workspace where the trained bottom's ``state_dict`` is saved
        when the job ends (``torch.save``); ``None``: not saved.
    """

    features: SplitLoader
    _pending: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)

    ROLE: ClassVar[SplitRole] = "data"

    def _loader(self) -> tuple[SplitLoader, str]:
        return self.features, "features"

    def _setup(self, seed: int) -> SiteSamples:
        self._pending = None
        return super()._setup(seed)

    def _step(self, train: bool, request: Any) -> CutActivations | None:
        if not isinstance(request, ForwardRequest):
            raise ProtocolError(
                f"the data site expects a ForwardRequest, not {type(request).__name__}"
            )
        assert self._module is not None and self._optim is not None
        if train:
            self._apply(request.gradient)
        elif request.gradient is not None or self._pending is not None:
            raise ProtocolError(
                "an evaluation request must carry no gradient and come after the last one"
            )
        if request.rows is None:
            return None
        if train and self._pending is not None:
            raise ProtocolError("a new training batch before the previous batch's gradient")
        rows = self._rows(request.split, request.rows, train)
        inputs = self._data[request.split][rows]
        try:
            self._module.train(train)
            with torch.set_grad_enabled(train):
                activations = self._module(inputs)
        except Exception as exc:
            raise user_code_failed("the bottom model's forward", exc) from exc
        if train:
            self._pending = activations
        return CutActivations(activations.detach().to("cpu"))

    def _apply(self, gradient: object) -> None:
        if gradient is None:
            return
        if self._pending is None:
            raise ProtocolError("a gradient arrived but no training batch is pending")
        checked = _checked_tensor(gradient, "the cut gradient")
        if checked.shape != self._pending.shape:
            raise ProtocolError(
                f"the cut gradient has shape {tuple(checked.shape)}; the batch's activations "
                f"have {tuple(self._pending.shape)}"
            )
        assert self._optim is not None
        pending, self._pending = self._pending, None
        try:
            self._optim.zero_grad(set_to_none=True)
            torch.autograd.backward(pending, checked.to(device=pending.device, dtype=pending.dtype))
            self._optim.step()
        except Exception as exc:
            raise user_code_failed("the bottom model's backward", exc) from exc

    async def stop(self) -> None:
        """Drop the bottom, its optimizer, the features and any pending batch."""
        self._pending = None
        await super().stop()


@dataclass(kw_only=True)
class SplitLabelExecutor(_SplitSite):
    """The label site: labels and the top of the network (cut layer → logits → loss).

    Attributes
    ----------
    model:
        Builds the top half (a module-level function or class).
    labels:
        ``labels(split) -> (sample_ids, labels)`` for ``split`` in ``"train"``, ``"validate"``.
    loss:
        ``loss(logits, labels) -> scalar tensor`` (mean over the batch); default cross-entropy.
        Evaluation counts ``argmax(logits) == label`` as correct.
    optimizer, optimizer_args:
        ``torch.optim.<optimizer>(top.parameters(), **optimizer_args)``.
    device:
        Where the top and the labels live.
    save_as:
        File name in the site's workspace where the trained top's ``state_dict`` is saved when
        the job ends (``torch.save``); ``None``: not saved.
    """

    labels: SplitLoader
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = functional.cross_entropy

    ROLE: ClassVar[SplitRole] = "label"

    def _loader(self) -> tuple[SplitLoader, str]:
        return self.labels, "labels"

    def _step(self, train: bool, request: Any) -> CutGradient | EvalCounts:
        if not isinstance(request, LabelRequest):
            raise ProtocolError(
                f"the label site expects a LabelRequest, not {type(request).__name__}"
            )
        assert self._module is not None and self._optim is not None
        rows = self._rows(request.split, request.rows, train)
        activations = _checked_tensor(request.activations, "the cut activations")
        if activations.ndim < 1 or len(activations) != len(rows):
            raise ProtocolError(f"{tuple(activations.shape)} cut activations for {len(rows)} rows")
        activations = activations.to(self.device).requires_grad_(train)
        targets = self._data[request.split][rows]
        try:
            self._module.train(train)
            with torch.set_grad_enabled(train):
                logits = self._module(activations)
                loss = self.loss(logits, targets)
            if not train:
                correct = int((logits.argmax(dim=1) == targets).sum())
                return EvalCounts(correct, len(rows), float(loss) * len(rows))
            self._optim.zero_grad(set_to_none=True)
            torch.autograd.backward(loss)
            self._optim.step()
        except Exception as exc:
            raise user_code_failed("the top model or loss", exc) from exc
        if activations.grad is None:
            raise TaskFailedError("the top model does not depend on the cut activations")
        return CutGradient(activations.grad.to("cpu"), float(loss.detach()))
