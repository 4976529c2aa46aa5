"""The global model spilled to disk while a round gathers (``ScatterGather(spill_global=...)``).

Rounds run over real cells (inproc, streams of 16 KiB chunks), so the task is encoded and handed
to the stream layer and the controller can let go of its global model. Checked: spilling gives
the same models as keeping the model in memory (FULL, DIFF, FedAdam), the global model really
is dropped while sites work, a restart after a broken result stream re-asks the sites with the
model read back from the spill, the spill file goes away at the end and on failure, and small
models never touch the disk. :class:`ModelSpill` and :func:`stand_ins` are tested on their own.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import os
import weakref
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from stream_faults import flip_a_bit_in_chunk

from fedcell.controllers import FedAvg, scatter_gather
from fedcell.controllers.fedopt import FedAdam
from fedcell.controllers.model_spill import ModelSpill, model_nbytes, stand_ins
from fedcell.controllers.scatter_gather import ScatterGather
from fedcell.engine.cell_dispatcher import TASK_CHANNEL, CellDispatcher
from fedcell.engine.dispatcher import ControllerContext, TaskResult
from fedcell.errors import CheckpointError, ConfigError, TooFewResultsError
from fedcell.fl_model import FLModel, ParamsType
from fedcell.transports.cell import Cell, CellConfig
from fedcell.transports.message import Message
from fedcell.transports.stream import StreamConfig
from fedcell.transports.stream_sender import PayloadSource

KiB = 1024
CELL_CONFIG = CellConfig(
    heartbeat_interval=0.1,
    peer_timeout=3.0,
    stream=StreamConfig(threshold=16 * KiB, chunk_size=16 * KiB, window=64 * KiB, codec="none"),
)
_urls = itertools.count()
ELEMENTS = 50_000  # float32 per layer: 200 KB, 13 chunks

#: Weak references to the arrays of the last model ``make_model`` built.
made: list[weakref.ref[np.ndarray]] = []


def make_model() -> dict[str, np.ndarray]:
    """The first global model (``model="test_global_spill:make_model"``: nothing else keeps it)."""
    rng = np.random.default_rng(7)
    params = {
        "w": rng.random(ELEMENTS, dtype=np.float32),
        "b": rng.random(ELEMENTS, dtype=np.float32),
    }
    made[:] = [weakref.ref(array) for array in params.values()]
    return params


async def first_model_dropped(seconds: float = 5.0) -> bool:
    """Whether every array of the first global model dies within ``seconds``."""
    for _ in range(int(seconds / 0.01)):
        gc.collect()
        if all(ref() is None for ref in made):
            return True
        await asyncio.sleep(0.01)
    return False


Handler = Callable[[Message], Awaitable[TaskResult]]


def trainer(site: str, calls: dict[str, int], *, diff: bool = False) -> Handler:
    """A site that adds ``10·k + call`` (site-k) to every param, FULL or as a DIFF."""

    async def on_task(message: Message) -> TaskResult:
        task = message.payload["task"]
        calls[site] += 1
        offset = 10.0 * int(site[-1]) + calls[site]
        params = {
            name: np.full_like(value, offset) if diff else value + offset
            for name, value in task.data.params.items()
        }
        model = FLModel(
            params=params,
            params_type=ParamsType.DIFF if diff else ParamsType.FULL,
            meta={"NUM_STEPS_CURRENT_ROUND": int(site[-1])},
        )
        return TaskResult(site, task.name, "ok", model)

    return on_task


async def run_over_cells(
    controller: ScatterGather,
    handlers: dict[str, Handler],
    workspace: Path,
    tamper: Callable[[Cell], None] | None = None,
) -> FLModel:
    """Run ``controller`` with a server cell and one cell per handler (inproc)."""
    async with AsyncExitStack() as stack:
        url = f"inproc://global-spill-{os.getpid()}-{next(_urls)}"
        server = await stack.enter_async_context(Cell("server", listen=url, config=CELL_CONFIG))
        for name, handler in handlers.items():
            site = await stack.enter_async_context(Cell(name, parent=url, config=CELL_CONFIG))
            site.register(TASK_CHANNEL, handler)
            if tamper is not None:
                tamper(site)
        dispatcher = CellDispatcher(server, "job-1", list(handlers))
        ctx = ControllerContext("job-1", "train", dispatcher, workspace=workspace)
        output: FLModel = await controller.run(ctx)
        return output


def spill_files(workspace: Path) -> list[Path]:
    return sorted(workspace.glob(".global-model-*.spill"))


@pytest.mark.parametrize("algorithm", ["full", "diff", "fedadam"])
def test_spilling_gives_the_same_models_as_keeping_the_global_in_memory(
    tmp_path: Path, algorithm: str
) -> None:
    def controller(spill: bool) -> ScatterGather:
        kind = FedAdam if algorithm == "fedadam" else FedAvg
        return kind(rounds=3, model="test_global_spill:make_model", spill_global=spill)

    async def main(spill: bool) -> tuple[FLModel, list[int]]:
        calls = {"site-1": 0, "site-2": 0}
        spilled_while_training: list[int] = []

        def watching(site: str) -> Handler:
            train = trainer(site, calls, diff=algorithm == "diff")

            async def on_task(message: Message) -> TaskResult:
                spilled_while_training.append(len(spill_files(tmp_path / str(spill))))
                return await train(message)

            return on_task

        handlers = {site: watching(site) for site in calls}
        output = await run_over_cells(controller(spill), handlers, tmp_path / str(spill))
        return output, spilled_while_training

    # Execute
    kept, kept_files = asyncio.run(main(spill=False))
    spilled, spilled_files = asyncio.run(main(spill=True))

    # Assert: identical models, one spill file while sites trained (none when kept), none after
    assert kept.params.keys() == spilled.params.keys() == {"w", "b"}
    for name in kept.params:
        np.testing.assert_array_equal(kept.params[name], spilled.params[name])
        assert spilled.params[name].dtype == np.float32
    assert not np.array_equal(kept.params["w"], make_model()["w"])  # the rounds did move it
    assert kept_files == [0] * 6 and spilled_files == [1] * 6
    assert spill_files(tmp_path / "True") == [] and spill_files(tmp_path / "False") == []


def test_the_global_model_is_dropped_while_sites_train_only_when_spilled(tmp_path: Path) -> None:
    async def main(spill: bool) -> list[bool]:
        dropped: list[bool] = []
        calls = {"site-1": 0, "site-2": 0}

        def waiting(site: str) -> Handler:
            train = trainer(site, calls)

            async def on_task(message: Message) -> TaskResult:
                if message.payload["task"].data.current_round == 0:
                    dropped.append(await first_model_dropped(5.0 if spill else 0.3))
                return await train(message)

            return on_task

        handlers = {site: waiting(site) for site in calls}
        controller = FedAvg(rounds=2, model="test_global_spill:make_model", spill_global=spill)
        await run_over_cells(controller, handlers, tmp_path)
        return dropped

    # Execute / Assert: the server held the first model until the results came in when it
    # was kept; spilled, it let it go while the sites trained
    assert asyncio.run(main(spill=False)) == [False, False]
    assert asyncio.run(main(spill=True)) == [True, True]


def test_a_restart_after_a_broken_stream_re_asks_sites_with_the_spilled_global(
    tmp_path: Path,
) -> None:
    # Prepare: three sites; site-2's first reply gets a bit flipped in its fourth chunk (after
    # three chunks were folded), so the round restarts without it. Each site's first call
    # waits until the server dropped the global model: the restart must read it back.
    calls = {"site-1": 0, "site-2": 0, "site-3": 0}
    received: dict[str, list[np.ndarray]] = {site: [] for site in calls}

    def recording(site: str) -> Handler:
        train = trainer(site, calls)

        async def on_task(message: Message) -> TaskResult:
            received[site].append(message.payload["task"].data.params["w"].copy())
            if calls[site] == 0:
                assert await first_model_dropped()
            return await train(message)

        return on_task

    def corrupt_site_2(cell: Cell) -> None:
        if cell.name == "site-2":
            flip_a_bit_in_chunk(cell, 3, when=lambda: calls["site-2"] == 1)

    controller = FedAvg(
        rounds=1, min_clients=2, model="test_global_spill:make_model", spill_global=True
    )
    handlers = {site: recording(site) for site in calls}

    # Execute
    output = asyncio.run(run_over_cells(controller, handlers, tmp_path, corrupt_site_2))

    # Assert: site-1 and site-3 were asked twice, both times with the first global model; the
    # result is the mean of their second answers (weights 1 and 3); the spill file is gone
    first = make_model()["w"]
    assert calls == {"site-1": 2, "site-2": 1, "site-3": 2}
    for site in ("site-1", "site-3"):
        assert len(received[site]) == 2
        for got in received[site]:
            np.testing.assert_array_equal(got, first)
    expected = first + np.float32((1 * 12.0 + 3 * 32.0) / 4)
    np.testing.assert_allclose(output.params["w"], expected, rtol=1e-6)
    dropped = output.meta["history"][0]["dropped"]
    assert [d["site"] for d in dropped] == ["site-2"]
    assert spill_files(tmp_path) == []


def test_the_spill_file_is_removed_when_a_round_fails(tmp_path: Path) -> None:
    # Prepare: every site fails its task
    async def failing(message: Message) -> TaskResult:
        raise RuntimeError("training diverged")

    controller = FedAvg(rounds=2, model="test_global_spill:make_model", spill_global=True)

    # Execute
    with pytest.raises(TooFewResultsError, match="training diverged"):
        asyncio.run(run_over_cells(controller, {"site-1": failing}, tmp_path))

    # Assert
    assert spill_files(tmp_path) == []


def test_small_models_are_not_spilled_and_large_ones_are_by_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def main(workspace: Path) -> list[int]:
        seen: list[int] = []
        calls = {"site-1": 0}
        train = trainer("site-1", calls)

        async def on_task(message: Message) -> TaskResult:
            seen.append(len(spill_files(workspace)))
            return await train(message)

        controller = FedAvg(rounds=2, model="test_global_spill:make_model")
        await run_over_cells(controller, {"site-1": on_task}, workspace)
        return seen

    # Execute / Assert: 400 KB is far below SPILL_MIN_BYTES: no file; with the threshold at
    # 400 KB the same model is spilled
    assert asyncio.run(main(tmp_path / "small")) == [0, 0]
    monkeypatch.setattr(scatter_gather, "SPILL_MIN_BYTES", 2 * ELEMENTS * 4)
    assert asyncio.run(main(tmp_path / "large")) == [1, 1]
    assert spill_files(tmp_path / "large") == []


def test_spill_global_must_be_a_bool_or_none() -> None:
    with pytest.raises(ConfigError, match="spill_global"):
        FedAvg(initial_params={"w": [0.0]}, spill_global="yes").validate()  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------
# ModelSpill and stand-ins


def test_a_spill_reads_back_numpy_and_torch_params_exactly(tmp_path: Path) -> None:
    # Prepare
    params: dict[str, Any] = {
        "w": np.arange(12, dtype=np.float32).reshape(3, 4),
        "steps": np.array(7, dtype=np.int64),
        "t": torch.arange(6, dtype=torch.bfloat16).reshape(2, 3),
        "empty": np.zeros((0, 5), dtype=np.float64),
    }
    spill = ModelSpill(tmp_path / "sub" / "model.spill")

    # Execute
    async def main() -> dict[str, Any]:
        await spill.write(params)
        return await spill.read()

    restored = asyncio.run(main())

    # Assert
    assert restored.keys() == params.keys()
    np.testing.assert_array_equal(restored["w"], params["w"])
    assert restored["steps"].dtype == np.int64 and int(restored["steps"]) == 7
    assert restored["t"].dtype == torch.bfloat16 and torch.equal(restored["t"], params["t"])
    assert restored["empty"].shape == (0, 5)
    spill.remove()
    spill.remove()  # twice: no error
    assert not spill.path.exists()


def test_a_truncated_or_foreign_spill_file_fails_clearly(tmp_path: Path) -> None:
    spill = ModelSpill(tmp_path / "model.spill")
    asyncio.run(spill.write({"w": np.ones(1000, np.float32)}))
    data = spill.path.read_bytes()
    spill.path.write_bytes(data[:-10])
    with pytest.raises(CheckpointError, match="header describes"):
        asyncio.run(spill.read())
    spill.path.write_bytes(b"NOTASPIL" + data[8:])
    with pytest.raises(CheckpointError, match="not a spill file"):
        asyncio.run(spill.read())
    spill.remove()
    with pytest.raises(CheckpointError, match="cannot read"):
        asyncio.run(spill.read())


def test_stand_ins_have_each_params_library_dtype_and_shape_and_cost_nothing() -> None:
    params = {
        "w": np.ones((1000, 1000), np.float32),
        "t": torch.ones(500, 300, dtype=torch.bfloat16),
    }
    shapes = stand_ins(params)
    assert isinstance(shapes["w"], np.ndarray) and shapes["w"].shape == (1000, 1000)
    assert shapes["w"].dtype == np.float32 and shapes["w"].strides == (0, 0)
    assert isinstance(shapes["t"], torch.Tensor) and tuple(shapes["t"].shape) == (500, 300)
    assert shapes["t"].dtype == torch.bfloat16 and shapes["t"].stride() == (0, 0)
    assert shapes["t"].untyped_storage().nbytes() == 2
    assert model_nbytes(params) == 4_000_000 + 300_000


def test_a_streamed_payload_lets_go_of_each_array_once_every_peer_acked_it() -> None:
    # Prepare: a payload source over two arrays that nothing else references
    first, second = np.ones(1000, np.float32), np.zeros(500, np.float32)
    alive = [weakref.ref(first), weakref.ref(second)]
    source = PayloadSource([first, second], [4, 4])
    del first, second

    # Execute / Assert: acked part of the first array: both kept; all of it: the first goes;
    # the second is still read whole
    source.release_through(3999)
    assert [ref() is not None for ref in alive] == [True, True]
    source.release_through(4000)
    assert [ref() is not None for ref in alive] == [False, True]
    assert b"".join(bytes(piece) for piece in source.read(4000, 2000)) == bytes(2000)
    source.release_through(6000)
    assert alive[1]() is None


def test_a_spill_that_cannot_be_written_keeps_the_global_model_in_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: every spill write fails (a full disk)
    def full_disk(self: ModelSpill, params: dict[str, Any]) -> None:
        raise CheckpointError(f"cannot spill the global model to {self.path}: disk full")

    monkeypatch.setattr(ModelSpill, "_write", full_disk)

    async def main(spill: bool) -> FLModel:
        calls = {"site-1": 0, "site-2": 0}
        handlers = {site: trainer(site, calls) for site in calls}
        controller = FedAvg(rounds=2, model="test_global_spill:make_model", spill_global=spill)
        return await run_over_cells(controller, handlers, tmp_path / str(spill))

    # Execute
    kept = asyncio.run(main(spill=False))
    spilled = asyncio.run(main(spill=True))

    # Assert: the same model, a warning per round, no file left
    np.testing.assert_array_equal(kept.params["w"], spilled.params["w"])
    warnings = [r for r in caplog.records if "stays in memory" in r.getMessage()]
    assert len(warnings) == 2 and "disk full" in warnings[0].getMessage()
    assert spill_files(tmp_path / "True") == []
