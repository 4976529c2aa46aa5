"""ScriptRunner end to end, in thread mode and (integration) in subprocess mode: a fake server
side dispatches tasks the way a controller does and checks what comes back."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fedcell.engine.dispatcher import Task, TaskResult
from fedcell.errors import ConfigError
from fedcell.executors import ScriptRunner, SiteContext, run_task
from fedcell.executors.script_process import ProcessScriptHost
from fedcell.executors.script_protocol import ENV_CELL, ENV_TOKEN, ENV_URL, SiteInfo
from fedcell.fl_model import FLModel, ParamsType

MODES = ["thread", pytest.param("subprocess", marks=pytest.mark.integration)]


def site(name: str = "site-1") -> SiteContext:
    return SiteContext(site_name=name, job_id="job-7", logger=logging.getLogger(f"fedcell.test.{name}"))


def initial_weights() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    shapes = {"hidden.weight": (16, 8), "hidden.bias": (16,), "out.weight": (2, 16), "out.bias": (2,)}
    return {name: torch.randn(shape, generator=generator) * 0.1 for name, shape in shapes.items()}


async def dispatch(runner: ScriptRunner, name: str, model: FLModel | None) -> TaskResult:
    return await asyncio.wait_for(run_task(runner, Task(name, model), "site-1"), 60)


@pytest.mark.parametrize("mode", MODES)
def test_hello_pytorch_script_trains_three_rounds(
    mode: str, scripts: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The NVFlare-style script runs unchanged: 3 train rounds and a validation, one script run."""
    caplog.set_level(logging.INFO, logger="fedcell.test")

    async def main() -> tuple[list[TaskResult], TaskResult, dict[str, torch.Tensor]]:
        # Prepare
        runner = ScriptRunner(
            script=scripts / "hello_pt_client.py", args=["--epochs", "2"], mode=mode  # type: ignore[arg-type]
        )
        await runner.start(site())
        global_weights = initial_weights()
        results = []
        try:
            # Execute
            for round_number in range(3):
                task_model = FLModel(
                    params=global_weights, current_round=round_number, total_rounds=3
                )
                result = await dispatch(runner, "train", task_model)
                results.append(result)
                assert result.ok, result.error
                global_weights = result.data.params  # one site: the aggregate is its model
            validation = await dispatch(runner, "validate", FLModel(params=global_weights))
        finally:
            await runner.stop()
        return results, validation, global_weights

    results, validation, final = asyncio.run(main())

    # Assert
    start = initial_weights()
    for round_number, result in enumerate(results):
        model = result.data
        assert isinstance(model, FLModel)
        assert model.current_round == round_number
        assert model.params_type == ParamsType.FULL
        assert model.meta["NUM_STEPS_CURRENT_ROUND"] == 16  # 64 samples / batch 8 × 2 epochs
        assert 0.0 <= model.metrics["accuracy"] <= 1.0
        assert set(model.params) == set(start)
        assert all(isinstance(v, torch.Tensor) and v.dtype == torch.float32 for v in model.params.values())
    assert not torch.equal(final["hidden.weight"], start["hidden.weight"])
    assert results[-1].data.metrics["accuracy"] > 0.6  # it learned the synthetic rule
    assert validation.ok and validation.data.params is None
    assert validation.data.metrics["accuracy"] == pytest.approx(results[-1].data.metrics["accuracy"])
    log_text = caplog.text
    assert "site-1: job job-7 started with 2 epoch(s)" in log_text
    assert "site-1: round 2 task train" in log_text
    assert "train_loss" in log_text
    assert "last_batch_loss" in log_text and "(SCALAR)" in log_text


@pytest.mark.parametrize("mode", MODES)
def test_script_that_raises_fails_its_tasks_with_the_traceback(mode: str, scripts: Path) -> None:
    async def main() -> list[TaskResult]:
        runner = ScriptRunner(script=scripts / "raising_script.py", mode=mode, params_format="native")  # type: ignore[arg-type]
        await runner.start(site())
        params = {"w": np.ones(3, dtype=np.float32)}
        try:
            return [
                await dispatch(runner, "train", FLModel(params=params, current_round=r))
                for r in range(3)
            ]
        finally:
            await runner.stop()

    first, second, third = asyncio.run(main())

    assert first.ok and np.array_equal(first.data.params["w"], np.ones(3))
    assert second.status == "failed"
    assert "ValueError: bad batch in round 1" in second.error
    assert "train_badly" in second.error and "raising_script.py" in second.error
    assert third.status == "failed" and "bad batch in round 1" in third.error


@pytest.mark.parametrize("mode", MODES)
def test_script_that_leaves_early_crashes_the_next_task(mode: str, scripts: Path) -> None:
    async def main() -> list[TaskResult]:
        runner = ScriptRunner(script=scripts / "early_exit_script.py", mode=mode, params_format="native")  # type: ignore[arg-type]
        await runner.start(site())
        try:
            return [
                await dispatch(runner, "train", FLModel(params={"w": np.zeros(2)}, current_round=r))
                for r in range(2)
            ]
        finally:
            await runner.stop()

    first, second = asyncio.run(main())

    assert first.ok
    assert second.status == "crashed"
    assert "early_exit_script.py" in second.error and "without answering task 'train'" in second.error


@pytest.mark.integration
def test_killed_script_process_crashes_its_task(scripts: Path) -> None:
    async def main() -> list[TaskResult]:
        runner = ScriptRunner(script=scripts / "dying_script.py", mode="subprocess", params_format="native")
        await runner.start(site())
        try:
            return [
                await dispatch(runner, "train", FLModel(params={"w": np.zeros(2)}, current_round=r))
                for r in range(2)
            ]
        finally:
            await runner.stop()

    first, second = asyncio.run(main())

    assert first.ok
    assert second.status == "crashed" and "SIGKILL" in second.error


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("params_format", "expected_kind"), [("pytorch", "torch"), ("numpy", "numpy")]
)
def test_params_reach_the_script_in_the_configured_format(
    mode: str, params_format: str, expected_kind: str, scripts: Path
) -> None:
    async def main() -> tuple[TaskResult, TaskResult]:
        runner = ScriptRunner(
            script=scripts / "echo_script.py",
            args=["--lr", "0.5"],
            mode=mode,  # type: ignore[arg-type]
            params_format=params_format,  # type: ignore[arg-type]
            config={"batch_size": 4},
        )
        await runner.start(site())
        sent = {"w": np.arange(4, dtype=np.float32), "b": torch.ones(2)}
        try:
            train = await dispatch(runner, "train", FLModel(params=sent, current_round=0))
            submit = await dispatch(runner, "submit_model", None)
        finally:
            await runner.stop()
        return train, submit

    train, submit = asyncio.run(main())

    assert train.ok, train.error
    metrics = train.data.metrics
    assert metrics["kinds"] == [expected_kind]
    assert metrics["argv"] == ["--lr", "0.5"]
    assert (metrics["task"], metrics["train"], metrics["evaluate"], metrics["submit"]) == (
        "train", True, False, False,
    )
    assert metrics["config"]["batch_size"] == 4
    assert metrics["config"]["site_name"] == "site-1" and metrics["config"]["job_id"] == "job-7"
    # The script zeroed its params right after sending: what it sent did not change.
    assert np.array_equal(np.asarray(train.data.params["w"]), np.arange(4))
    assert torch.equal(torch.as_tensor(train.data.params["b"]), torch.ones(2))
    assert submit.ok and submit.data.metrics["submit"] is True and submit.data.params is None


@pytest.mark.parametrize("mode", MODES)
def test_bfloat16_params_travel_unchanged(mode: str, scripts: Path) -> None:
    weights = {"w": torch.randn(5, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)}
    expected = weights["w"].clone()  # the script trains on (here: zeroes) what it receives

    async def main() -> TaskResult:
        runner = ScriptRunner(script=scripts / "echo_script.py", mode=mode, params_format="native")  # type: ignore[arg-type]
        await runner.start(site())
        try:
            return await dispatch(runner, "train", FLModel(params=weights))
        finally:
            await runner.stop()

    result = asyncio.run(main())

    assert result.ok, result.error
    assert result.data.params["w"].dtype == torch.bfloat16
    assert torch.equal(result.data.params["w"], expected)


def test_concurrent_thread_scripts_keep_their_own_argv_and_site(scripts: Path) -> None:
    """The simulator runs every site's script in one process: argv and identity stay per site."""

    async def one_site(name: str) -> TaskResult:
        runner = ScriptRunner(script=scripts / "echo_script.py", args=[f"--site={name}"], params_format="native")
        await runner.start(site(name))
        try:
            results = [
                await run_task(runner, Task("train", FLModel(params={"w": np.zeros(1)})), name)
                for _ in range(3)
            ]
        finally:
            await runner.stop()
        return results[-1]

    async def main() -> list[TaskResult]:
        return list(await asyncio.gather(*(one_site(f"site-{i}") for i in range(4))))

    argv_before = list(sys.argv)
    results = asyncio.run(main())

    for i, result in enumerate(results):
        assert result.ok, result.error
        assert result.data.metrics["argv"] == [f"--site=site-{i}"]
        assert result.data.metrics["config"]["site_name"] == f"site-{i}"
    assert sys.argv == argv_before and type(sys.argv) is list


@pytest.mark.integration
def test_process_with_a_wrong_token_is_refused_and_the_site_keeps_serving(scripts: Path) -> None:
    async def main() -> tuple[int, str, TaskResult]:
        # Prepare: a running script host
        info = SiteInfo(site_name="site-1", job_id="job-7", params_format="native")
        host = ProcessScriptHost(scripts / "echo_script.py", [], info, logging.getLogger("fedcell.test"))
        await host.start()
        try:
            # Execute: an intruder presents a wrong token
            env = {**os.environ, ENV_URL: host.url, ENV_TOKEN: "not-the-token", ENV_CELL: "script"}
            intruder = await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                "import fedcell.client as flare\n"
                "try:\n    flare.init()\n"
                "except Exception as exc:\n    print(type(exc).__name__, exc)\n    raise SystemExit(3)\n",
                env=env,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
            output, _ = await asyncio.wait_for(intruder.communicate(), 60)
            code = intruder.returncode
            assert code is not None
            result = await asyncio.wait_for(
                host.exchange.run_task(Task("train", FLModel(params={"w": np.ones(2)}))), 60
            )
            return code, output.decode(), TaskResult("site-1", "train", data=result)
        finally:
            await host.stop(10.0)

    code, output, result = asyncio.run(main())

    # Assert
    assert code == 3
    last_line = output.strip().splitlines()[-1]
    assert last_line.startswith("AuthenticationError")
    assert "refused this script process" in last_line and "wrong script token" in last_line
    assert np.array_equal(result.data.params["w"], np.ones(2))


@pytest.mark.integration
def test_stop_terminates_a_script_that_ignores_the_end(tmp_path: Path) -> None:
    script = tmp_path / "stubborn.py"
    script.write_text(
        "import time\nimport fedcell.client as flare\nflare.init()\n"
        "while True:\n    time.sleep(0.05)\n"
    )

    async def main() -> float:
        runner = ScriptRunner(script=script, mode="subprocess", stop_grace=0.5)
        await runner.start(site())
        await asyncio.sleep(0.5)
        loop = asyncio.get_running_loop()
        started = loop.time()
        await runner.stop()
        return loop.time() - started

    assert asyncio.run(main()) < 5.0


def test_runner_refuses_bad_configuration_and_unknown_tasks(scripts: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="mode"):
        ScriptRunner(script="train.py", mode="fork")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="params_format"):
        ScriptRunner(script="train.py", params_format="jax")  # type: ignore[arg-type]

    async def main() -> None:
        with pytest.raises(ConfigError, match="does not exist"):
            await ScriptRunner(script="missing.py").start(site())
        runner = ScriptRunner(script=scripts / "echo_script.py")
        with pytest.raises(ConfigError, match="before start"):
            await runner.execute(Task("train", FLModel()))
        await runner.start(site())
        try:
            with pytest.raises(ConfigError, match="not 'aggregate'"):
                await runner.execute(Task("aggregate", FLModel()))
            with pytest.raises(ConfigError, match="receives an FLModel"):
                await runner.execute(Task("train", {"w": 1}))
        finally:
            await runner.stop()

    asyncio.run(main())


def test_relative_script_resolves_against_the_job_workspace(scripts: Path) -> None:
    async def main() -> TaskResult:
        runner = ScriptRunner(script="echo_script.py", params_format="native")
        await runner.start(SiteContext("site-1", "job-7", workspace=scripts))
        try:
            return await dispatch(runner, "train", FLModel(params={"w": np.ones(1)}))
        finally:
            await runner.stop()

    assert asyncio.run(main()).ok


@pytest.mark.parametrize("mode", MODES)
def test_script_output_becomes_site_log_lines(
    mode: str, scripts: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)

    async def main() -> TaskResult:
        runner = ScriptRunner(script=scripts / "chatty_script.py", mode=mode, params_format="native")  # type: ignore[arg-type]
        await runner.start(site())
        try:
            return await dispatch(runner, "train", FLModel(params={"w": np.ones(1)}))
        finally:
            await runner.stop()

    stdout_before = sys.stdout
    assert asyncio.run(main()).ok

    site_lines = {
        (record.levelno, record.getMessage())
        for record in caplog.records
        if record.name == "fedcell.test.site-1"
    }
    prefix = "[script chatty_script.py] "
    assert (logging.INFO, prefix + "hello from the script") in site_lines
    assert (logging.INFO, prefix + "100%") in site_lines  # only the progress bar's final state
    assert (logging.WARNING, prefix + "something went sideways") in site_lines
    assert (logging.WARNING, prefix + "logged by the script") in site_lines
    assert (logging.INFO, prefix + "last words without a newline") in site_lines
    assert not any("10%" in message for _, message in site_lines)
    assert sys.stdout is stdout_before


@pytest.mark.integration
def test_a_task_the_wire_cannot_carry_fails_alone(scripts: Path) -> None:
    async def main() -> tuple[TaskResult, TaskResult]:
        runner = ScriptRunner(script=scripts / "echo_script.py", mode="subprocess", params_format="native")
        await runner.start(site())
        try:
            unencodable = await dispatch(runner, "train", FLModel(params={"w": {1, 2}}))
            fine = await dispatch(runner, "train", FLModel(params={"w": np.ones(2)}))
        finally:
            await runner.stop()
        return unencodable, fine

    unencodable, fine = asyncio.run(main())

    assert unencodable.status == "failed" and "cannot be sent to script echo_script.py" in unencodable.error
    assert fine.ok and np.array_equal(fine.data.params["w"], np.ones(2))


def test_stop_gives_up_waiting_for_a_thread_script_that_ignores_the_end(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    script = tmp_path / "slow_to_leave.py"
    script.write_text(
        "import time\nimport fedcell.client as flare\nflare.init()\n"
        "while flare.is_running():\n    pass\ntime.sleep(0.5)\n"
    )

    async def main() -> None:
        runner = ScriptRunner(script=script, stop_grace=0.1)
        await runner.start(site())
        await runner.stop()

    asyncio.run(main())

    assert "did not end within 0.1 s" in caplog.text
    # The script's thread leaves by itself a moment later (the leak check waits for it).


def test_summary_writer_records_reach_the_site_log(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="fedcell.test")
    script = tmp_path / "tracked.py"
    script.write_text(
        "import fedcell.client as flare\n"
        "from fedcell.client.tracking import SummaryWriter\n"
        "flare.init()\n"
        "writer = SummaryWriter()\n"
        "while flare.is_running():\n"
        "    model = flare.receive()\n"
        "    writer.add_scalars('loss', {'train': 0.5, 'val': 0.75}, global_step=2)\n"
        "    writer.flush()\n"
        "    flare.send(flare.FLModel(metrics={}))\n"
    )

    async def main() -> TaskResult:
        runner = ScriptRunner(script=script)
        await runner.start(site())
        try:
            return await dispatch(runner, "train", FLModel())
        finally:
            await runner.stop()

    assert asyncio.run(main()).ok
    records = [r.fedcell_log for r in caplog.records if hasattr(r, "fedcell_log")]
    assert [(r.key, r.value, r.data_type, r.extras) for r in records] == [
        ("loss", {"train": 0.5, "val": 0.75}, "SCALARS", {"global_step": 2})
    ]
