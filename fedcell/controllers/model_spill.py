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

The file is the codec's own layout, never pickle: a fixed prefix (magic, tree length, frame
count), the frame lengths, the packed value tree (:func:`~fedcell.transports.codec.encode`),
then each array's raw bytes. It lives only as long as one run of the controller and is read
only by the process that wrote it, so it is not fsynced (a write that must survive a crash is a
checkpoint, :mod:`fedcell.engine.checkpoint`) and carries no digests; its sizes are checked on
the way back. Reading uses plain ``readinto`` into fresh arrays, not ``mmap``: a mapping would
keep the page cache's pages in the process's RSS.

:func:`stand_ins` gives the aggregation what it needs of the model meanwhile: for each param a
read-only array of the same library, dtype and shape whose every element is one shared zero
(zero strides), costing no memory. Nothing may read a stand-in's values.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fedcell.errors import CheckpointError, EncodeError
from fedcell.transports.codec import (
    ArraySpec,
    allocate_like,
    decode,
    encode,
    pack_tree,
    unpack_tree,
    writable_bytes,
)

__all__ = ["SPILL_MIN_BYTES", "ModelSpill", "model_nbytes", "stand_ins"]

#: Global models of at least this many bytes are spilled during a round's gather. Below it the
#: second model fits the server budget's 256 MiB of slack (2·S + 256 MiB) and is not worth a
#: file write per round: rewriting a 1 GiB spill took 0.57-0.62 s of a worker thread on the
#: project's VM (the first write of a new file 2.4 s), so about 0.15 s for 256 MiB, and small
#: models (the 10 ms rounds of a 10k-parameter MLP) must not touch the disk at all.
SPILL_MIN_BYTES = 256 * 1024 * 1024

_MAGIC = b"FCSPILL1"
_PREFIX = struct.Struct("<8sQI")  # magic, tree length, frame count
_LENGTH = struct.Struct("<Q")


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
            tree, buffers = encode(params)
        except EncodeError as exc:
            raise CheckpointError(f"cannot spill the global model to {self.path}: {exc}") from exc
        tree_bytes = pack_tree(tree)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("wb") as fh:
                fh.write(_PREFIX.pack(_MAGIC, len(tree_bytes), len(buffers)))
                for buffer in buffers:
                    fh.write(_LENGTH.pack(memoryview(buffer).nbytes))
                fh.write(tree_bytes)
                for buffer in buffers:
                    fh.write(buffer)
        except OSError as exc:
            self.remove()
            raise CheckpointError(f"cannot spill the global model to {self.path}: {exc}") from exc

    def _read(self) -> dict[str, Any]:
        try:
            with self.path.open("rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                magic, tree_length, count = _PREFIX.unpack(fh.read(_PREFIX.size))
                if magic != _MAGIC:
                    raise CheckpointError(f"{self.path} is not a spill file")
                lengths = [_LENGTH.unpack(fh.read(_LENGTH.size))[0] for _ in range(count)]
                expected = _PREFIX.size + _LENGTH.size * count + tree_length + sum(lengths)
                if size != expected:
                    raise CheckpointError(
                        f"spill file {self.path} has {size} bytes, its header describes {expected}"
                    )
                tree = unpack_tree(fh.read(tree_length), max_tree_bytes=max(tree_length, 1))

                def read_array(spec: ArraySpec) -> Any:
                    if spec.frame >= count or spec.nbytes != lengths[spec.frame]:
                        raise CheckpointError(f"spill file {self.path}: frame {spec.frame} is bad")
                    array = allocate_like(spec)
                    fh.seek(
                        _PREFIX.size
                        + _LENGTH.size * count
                        + tree_length
                        + sum(lengths[: spec.frame])
                    )
                    if fh.readinto(writable_bytes(array)) != spec.nbytes:
                        raise CheckpointError(
                            f"spill file {self.path}: frame {spec.frame} is short"
                        )
                    return array

                params: dict[str, Any] = decode(tree, (), arrays=read_array)
        except (OSError, struct.error) as exc:
            raise CheckpointError(
                f"cannot read the spilled global model {self.path}: {exc}"
            ) from exc
        return params
