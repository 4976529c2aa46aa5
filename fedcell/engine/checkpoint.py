"""Job checkpoints: what a server needs to resume a job after a crash, written atomically.

What is saved, and when
-----------------------
A job run with a :class:`CheckpointStore` keeps its folder (``<workspace>/checkpoint/``) as::

    checkpoint/
        job.ckpt              {"format", "job_id", "saved_at", "scheduler"}: the scheduler's
                              snapshot (every node's state); the commit point of a DAG step
        outputs/<node>.ckpt   a finished node's output (e.g. its global model), written once
        nodes/<node>.ckpt     a running node's own resumable state (see "Controllers" below)

- The :class:`~fedcell.engine.job_runner.JobRunner` saves the scheduler snapshot whenever a node
  finishes or fails and when the job ends. The outputs of newly finished nodes are written
  *before* the snapshot that names them finished, so a snapshot never points at a missing output.
- A controller saves its own state after each completed round or step with
  ``await ctx.checkpoint(state)``.
- On resume (``JobRunner(..., checkpoint=store, resume=True)``) finished nodes are not rerun
  (their outputs are read back and feed their dependents), and nodes that were running start
  again with ``ctx.restored`` holding the state they saved last (``None`` if they saved none).
  A job that was already done ends at once with the same state. No checkpoint yet (the server
  died before the first step completed) means the job starts from the beginning.
- Timestamps are ``time.monotonic()`` seconds of the process that saved them; on load they are
  shifted so that the moment of the last job save becomes *now*. Durations stay consistent but
  leave out the downtime and whatever ran between that save and the crash; a restarted node's
  time limit starts again.

Controllers (the resume API)
----------------------------
A resumable controller does two things, as :class:`~fedcell.controllers.scatter_gather.
ScatterGather` does::

    async def run(self, ctx):
        if ctx.restored is not None:          # what this node saved last, before the crash
            step, model, history = ctx.restored["step"], ctx.restored["model"], ...
        else:
            step, model, history = 0, initial_model, []
        while step < self.steps:
            model = await one_step(ctx, model)
            step += 1
            await ctx.checkpoint({"step": step, "model": model, "history": history})
        return model

The state is any value the wire codec carries (plain data, numpy arrays, torch tensors,
``FLModel`` and other ``@wire_type`` dataclasses); it must describe *completed* work only, so a
step in flight at the crash is simply done again (its task is re-sent; a site's late reply to the
dead server is dropped, as every reply whose request is unknown is). ``ctx.checkpoint`` is a no-op
when the job runs without a store, so a controller calls it unconditionally. The state must not be
mutated while ``ctx.checkpoint`` is awaited (it is written from a worker thread). A controller
that never calls it simply restarts from its beginning after a crash.

File format (never pickle: checkpoints may be copied between machines)
----------------------------------------------------------------------
One file per value, the wire codec's tree plus its raw array buffers::

    b"FCCKPT01" | u32 header length | u64 xxh3_64(header) | header | tree | frame 0 | frame 1 ...

The header (msgpack) lists ``[length, xxh3_64]`` of the tree and of each frame. A reader checks
the magic, that the file is exactly as long as the header says, and every digest; arrays are read
straight into their final arrays (``readinto``), so loading an S-byte model costs about S of
memory. A file that fails any check raises :class:`~fedcell.errors.CheckpointError` naming the
file and the problem.

Atomicity: a value is written to a temporary file in the same folder, flushed and fsynced,
renamed over the old file with ``os.replace`` (atomic on POSIX), and the folder is fsynced so the
rename itself survives a power loss. A crash at any point leaves either the old file or the new
one, never a torn file under the real name; stray temporary files are swept when the store is
cleared or loaded.
"""

from __future__ import annotations

import contextlib
import io
import os
import struct
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import msgpack
import xxhash

from fedcell.errors import CheckpointError, EncodeError, FrameError, OversizedError
from fedcell.transports.codec import (
    ArraySpec,
    allocate_like,
    decode,
    encode,
    pack_tree,
    unpack_tree,
    writable_bytes,
)

__all__ = ["CHECKPOINT_FORMAT", "CheckpointStore", "read_checkpoint", "write_checkpoint"]

#: Version of the job checkpoint layout (``job.ckpt``'s ``format`` field).
CHECKPOINT_FORMAT = 1

_MAGIC = b"FCCKPT01"
_PREFIX = struct.Struct("<8sIQ")  # magic, header length, header digest
_SUFFIX = ".ckpt"
_TEMPORARY_SUFFIX = ".tmp"


def _digest(data: Any) -> int:
    return xxhash.xxh3_64_intdigest(data)


def write_checkpoint(path: str | Path, value: Any, *, durable: bool = True) -> None:
    """Write ``value`` to ``path`` atomically (see the module docstring).

    ``durable=False`` writes ``path`` in place instead, without a temporary file or fsyncs: not
    atomic and not crash-safe, but read back with every check. It is for files that live only as
    long as the process that wrote them and is rewritten often (a spilled model): on the
    project's VM, writing a 1 GiB spill into a fresh file each round outlasted the sites'
    training, so FedAvg's server still held two models (peak 2159 MiB vs 1210 MiB in place,
    ``benchmarks/large_model.py --model-mib 1024 --sites 2``).

    Raises
    ------
    CheckpointError
        If the codec does not carry ``value`` (naming the offending path inside it), or the
        file cannot be written; with ``durable``, the previous file at ``path``, if any, is
        left as it was.
    """
    path = Path(path)
    try:
        tree, buffers = encode(value)
    except EncodeError as exc:
        raise CheckpointError(f"cannot checkpoint to {path}: {exc}") from exc
    tree_bytes = pack_tree(tree)
    header = msgpack.packb(
        {
            "tree": [len(tree_bytes), _digest(tree_bytes)],
            "frames": [[memoryview(b).nbytes, _digest(b)] for b in buffers],
        }
    )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if durable:
            fd, temporary = tempfile.mkstemp(
                dir=path.parent, prefix=f".{path.name}.", suffix=_TEMPORARY_SUFFIX
            )
        else:
            fd, temporary = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), None
    except OSError as exc:
        raise CheckpointError(f"cannot write checkpoint {path}: {exc}") from exc
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(_PREFIX.pack(_MAGIC, len(header), _digest(header)))
            fh.write(header)
            fh.write(tree_bytes)
            for buffer in buffers:
                fh.write(buffer)
            if temporary is not None:
                fh.flush()
                os.fsync(fh.fileno())
        if temporary is not None:
            os.replace(temporary, path)
            _fsync_folder(path.parent)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(temporary or path)
        raise CheckpointError(f"cannot write checkpoint {path}: {exc}") from exc


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_checkpoint(path: str | Path) -> Any:
    """Read back a value written by :func:`write_checkpoint`.

    Raises
    ------
    FileNotFoundError
        If there is no file at ``path``.
    CheckpointError
        If the file is torn, truncated, corrupt or not a checkpoint (the message says which).
    """
    path = Path(path)
    with path.open("rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        try:
            return _read(fh, size)
        except (FrameError, OversizedError, KeyError, ValueError, TypeError, struct.error) as exc:
            raise CheckpointError(f"checkpoint {path} is corrupt: {exc}") from exc
        except _Corrupt as exc:
            raise CheckpointError(f"checkpoint {path} is corrupt: {exc}") from None


class _Corrupt(Exception):
    """Internal: a failed check while reading, turned into CheckpointError with the path."""


def _read(fh: io.BufferedReader, size: int) -> Any:
    prefix = fh.read(_PREFIX.size)
    if len(prefix) < _PREFIX.size:
        raise _Corrupt(f"{size} bytes is too short for a checkpoint header")
    magic, header_length, header_digest = _PREFIX.unpack(prefix)
    if magic != _MAGIC:
        raise _Corrupt(f"not a fedcell checkpoint (magic {magic!r})")
    if _PREFIX.size + header_length > size:
        raise _Corrupt(f"truncated: the header needs {header_length} bytes")
    header_bytes = fh.read(header_length)
    if _digest(header_bytes) != header_digest:
        raise _Corrupt("the header's digest does not match")
    header = msgpack.unpackb(header_bytes, raw=False)
    tree_length, tree_digest = header["tree"]
    frames: list[tuple[int, int]] = [(int(n), int(d)) for n, d in header["frames"]]
    expected = _PREFIX.size + header_length + tree_length + sum(n for n, _ in frames)
    if size != expected:
        raise _Corrupt(f"the file has {size} bytes but its header describes {expected}")
    tree_bytes = fh.read(tree_length)
    if _digest(tree_bytes) != tree_digest:
        raise _Corrupt("the value tree's digest does not match")
    tree = unpack_tree(tree_bytes, max_tree_bytes=max(tree_length, 1))
    offsets = list(_offsets(_PREFIX.size + header_length + tree_length, frames))
    used: set[int] = set()

    def read_array(spec: ArraySpec) -> Any:
        if spec.frame >= len(frames):
            raise _Corrupt(f"the tree refers to frame {spec.frame}; the file has {len(frames)}")
        length, digest = frames[spec.frame]
        if spec.nbytes != length:
            raise _Corrupt(
                f"frame {spec.frame} has {length} bytes; {spec.dtype}{list(spec.shape)} "
                f"needs {spec.nbytes}"
            )
        array = allocate_like(spec)
        destination = writable_bytes(array)
        fh.seek(offsets[spec.frame])
        if fh.readinto(destination) != length or _digest(destination) != digest:
            raise _Corrupt(f"frame {spec.frame}'s digest does not match")
        used.add(spec.frame)
        return array

    value = decode(tree, (), arrays=read_array)
    if len(used) != len(frames):
        raise _Corrupt(f"the file has {len(frames)} frames but its tree uses {len(used)}")
    return value


def _offsets(start: int, frames: Sequence[tuple[int, int]]) -> Iterator[int]:
    for length, _ in frames:
        yield start
        start += length


class CheckpointStore:
    """A job's checkpoint folder: the scheduler snapshot, finished outputs, node states.

    Parameters
    ----------
    folder:
        Where the files go, conventionally ``<workspace>/checkpoint``; created on first save.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self._outputs_on_disk: set[str] = set()

    @property
    def job_file(self) -> Path:
        return self.folder / f"job{_SUFFIX}"

    def output_file(self, node: str) -> Path:
        return self.folder / "outputs" / f"{node}{_SUFFIX}"

    def node_file(self, node: str) -> Path:
        return self.folder / "nodes" / f"{node}{_SUFFIX}"

    def clear(self) -> None:
        """Delete every checkpoint (a fresh run of a job starts from nothing)."""
        for path in sorted(self.folder.rglob("*"), reverse=True):
            if path.is_dir():
                path.rmdir()
            else:
                path.unlink()
        self._outputs_on_disk.clear()

    def save_node(self, node: str, state: Any) -> None:
        """Persist a running node's resumable state (what ``ctx.checkpoint`` does).

        Raises
        ------
        CheckpointError
            If the state holds a value the codec does not carry, or the write failed.
        """
        write_checkpoint(self.node_file(node), {"node": node, "state": state})

    def load_node(self, node: str) -> Any:
        """The state ``node`` saved last, or ``None`` if it saved none.

        Raises
        ------
        CheckpointError
            If the file is corrupt or belongs to another node.
        """
        path = self.node_file(node)
        try:
            saved = read_checkpoint(path)
        except FileNotFoundError:
            return None
        if not (isinstance(saved, dict) and saved.get("node") == node and "state" in saved):
            raise CheckpointError(f"checkpoint {path} does not hold node {node!r}'s state")
        return saved["state"]

    def save_job(self, job_id: str, snapshot: Mapping[str, Any]) -> None:
        """Persist a :meth:`~fedcell.engine.scheduler.Scheduler.snapshot`: first the outputs of
        nodes that finished since the last save, then the snapshot itself (the commit point).

        Raises
        ------
        CheckpointError
            If an output or the snapshot holds a value the codec does not carry, or a write
            failed (the previous job checkpoint stays as it was).
        """
        outputs: Mapping[str, Any] = snapshot["outputs"]
        for node, output in outputs.items():
            if node not in self._outputs_on_disk:
                write_checkpoint(self.output_file(node), {"node": node, "output": output})
                self._outputs_on_disk.add(node)
        record = {
            "format": CHECKPOINT_FORMAT,
            "job_id": job_id,
            "saved_at": time.monotonic(),
            "scheduler": {**snapshot, "outputs": sorted(outputs)},
        }
        write_checkpoint(self.job_file, record)

    def load_job(self, job_id: str, nodes: Sequence[str]) -> dict[str, Any] | None:
        """The last saved scheduler snapshot, outputs read back and timestamps shifted to now,
        or ``None`` when no job checkpoint exists yet.

        Parameters
        ----------
        job_id, nodes:
            The job being resumed and its node names: a checkpoint of another job is refused.

        Raises
        ------
        CheckpointError
            If a file is corrupt, the format is unknown, or the checkpoint belongs to another
            job (other id or other nodes).
        """
        self._sweep_temporaries()
        path = self.job_file
        try:
            record = read_checkpoint(path)
        except FileNotFoundError:
            return None
        try:
            if record["format"] != CHECKPOINT_FORMAT:
                raise CheckpointError(
                    f"checkpoint {path} has format {record['format']!r}; this fedcell reads "
                    f"format {CHECKPOINT_FORMAT}"
                )
            snapshot = dict(record["scheduler"])
            saved_nodes = [node["name"] for node in snapshot["nodes"]]
            if record["job_id"] != job_id or saved_nodes != list(nodes):
                raise CheckpointError(
                    f"checkpoint {path} belongs to job {record['job_id']!r} with nodes "
                    f"{saved_nodes}, not to job {job_id!r} with nodes {list(nodes)}"
                )
            snapshot["outputs"] = {node: self._load_output(node) for node in snapshot["outputs"]}
            _shift_timestamps(snapshot, time.monotonic() - float(record["saved_at"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"checkpoint {path} is malformed: {exc!r}") from exc
        self._outputs_on_disk = set(snapshot["outputs"])
        return snapshot

    def _load_output(self, node: str) -> Any:
        path = self.output_file(node)
        try:
            saved = read_checkpoint(path)
        except FileNotFoundError as exc:
            raise CheckpointError(
                f"checkpoint {path} of finished node {node!r} is missing"
            ) from exc
        if not (isinstance(saved, dict) and saved.get("node") == node and "output" in saved):
            raise CheckpointError(f"checkpoint {path} does not hold node {node!r}'s output")
        return saved["output"]

    def _sweep_temporaries(self) -> None:
        """Remove what writes interrupted by a crash left (never a real checkpoint file)."""
        for path in self.folder.rglob(f".*{_TEMPORARY_SUFFIX}"):
            path.unlink(missing_ok=True)


def _shift_timestamps(snapshot: dict[str, Any], delta: float) -> None:
    """Move every timestamp of a scheduler snapshot by ``delta`` seconds (in place)."""
    for record in [snapshot["job"], *snapshot["nodes"]]:
        for key in ("started_at", "finished_at"):
            if record[key] is not None:
                record[key] = float(record[key]) + delta
