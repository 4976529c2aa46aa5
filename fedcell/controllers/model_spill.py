"""The global model on disk while a round gathers: :class:`ModelSpill` and :func:`stand_ins`.

Why: during a FedAvg round the server holds the global model (broadcast, and needed again for
DIFF results, server optimizers and a restarted round) and the accumulator the results fold
into: 2·S for an S-byte model. Once the broadcast has been handed to the transport (which
keeps its own reference to each array only until that array's chunks are acked by every site),
the controller needs nothing of the global model but its keys, dtypes and shapes until the
round ends. A large model is therefore written to a spill file in the node's workspace while it
is being broadcast, the controller drops every reference to it, and the accumulator reuses its
memory (the run's :class:`~fedcell.transports.stream_receiver.ArrayPool` hands the global's
region back when its last view dies). The model is read back only where its values are needed:
a restarted round asks sites again, DIFF rounds add the mean diff to it, FedOpt steps from it.

The file is a checkpoint file (:func:`~fedcell.engine.checkpoint.write_checkpoint`: the codec's
tree and raw array bytes with digests, never pickle), written without fsync (``durable=False``):
it lives only as long as one run of the controller and is read only by the process that wrote
it (a write that must survive a crash is a checkpoint proper). Reading it back
(:func:`~fedcell.engine.checkpoint.read_checkpoint`) checks every size and digest and uses
plain ``readinto`` into fresh arrays, not ``mmap``: a mapping would keep the page cache's pages
in the process's RSS.

:func:`stand_ins` gives the aggregation what it needs of the model meanwhile: for each param a
read-only array of the same library, dtype and shape whose every element is one shared zero
(zero strides), costing no memory. Nothing may read a stand-in's values.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fedcell.engine.checkpoint import read_checkpoint, write_checkpoint
from fedcell.errors import CheckpointError

__all__ = ["SPILL_MIN_BYTES", "ModelSpill", "model_nbytes", "stand_ins"]

#: Global models of at least this many bytes are spilled during a round's gather. Below it the
#: second model fits the server budget's 256 MiB of slack (2·S + 256 MiB) and is not worth a
#: file write per round: rewriting a 1 GiB spill took 0.57-0.62 s of a worker thread on the
#: project's VM (the first write of a new file 2.4 s), so about 0.15 s for 256 MiB, and small
#: models (the 10 ms rounds of a 10k-parameter MLP) must not touch the disk at all.
SPILL_MIN_BYTES = 256 * 1024 * 1024


def model_nbytes(params: Mapping[str, Any]) -> int:
    """Bytes of the arrays and tensors among ``params``' values."""
    total = 0
    for value in params.values():
        if isinstance(value, np.ndarray):
            total += value.nbytes
        elif hasattr(value, "element_size") and hasattr(value, "numel"):
            total += int(value.element_size()) * int(value.numel())
    return total


def stand_ins(params: Mapping[str, Any]) -> dict[str, Any]:
    """Zero-stride arrays with each param's library, dtype and shape (see the module docstring)."""
    result: dict[str, Any] = {}
    for name, value in params.items():
        if isinstance(value, np.ndarray):
            result[name] = np.broadcast_to(np.zeros((), dtype=value.dtype), value.shape)
        else:  # a torch tensor (params are arrays or tensors)
            result[name] = value.new_zeros(()).expand(value.shape)
    return result


class ModelSpill:
    """One spill file of a parameter dict.

    Parameters
    ----------
    path:
        Where the file goes (its folder is created); replaced by each :meth:`write`.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    async def write(self, params: Mapping[str, Any]) -> None:
        """Write ``params`` in a worker thread (their arrays must not change meanwhile).

        Raises
        ------
        CheckpointError
            If the codec does not carry a value or the file cannot be written.
        """
        await asyncio.to_thread(self._write, dict(params))

    async def read(self) -> dict[str, Any]:
        """Read the parameters back into fresh arrays, in a worker thread.

        Raises
        ------
        CheckpointError
            If there is no file, or it is truncated or not a spill file.
        """
        return await asyncio.to_thread(self._read)

    def remove(self) -> None:
        """Delete the file (no error when it is not there)."""
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def _write(self, params: dict[str, Any]) -> None:
        try:
            write_checkpoint(self.path, params, durable=False)
        except CheckpointError as exc:
            self.remove()  # the last round's file must not be read back as this one's
            raise CheckpointError(f"cannot spill the global model to {self.path}: {exc}") from exc

    def _read(self) -> dict[str, Any]:
        try:
            params = read_checkpoint(self.path)
        except OSError as exc:
            raise CheckpointError(
                f"cannot read the spilled global model {self.path}: {exc}"
            ) from exc
        except CheckpointError as exc:
            raise CheckpointError(f"{self.path} is not a spill file of this run: {exc}") from exc
        if not isinstance(params, dict):
            raise CheckpointError(f"{self.path} is not a spill file of this run: no parameters")
        return params
