"""Every controller's configuration survives a job-folder round trip in all three formats."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedcell.controllers import FedAdam, FedAvg, FedAvgM, FedYogi, PickBest
from fedcell.engine.dispatcher import Controller
from fedcell.engine.job import Job

CONTROLLERS: dict[str, Controller] = {
    "avg": FedAvg(
        rounds=3, min_clients=1, sites=["s1", "s2"], round_timeout=2.5, model="torch.nn:Identity",
        stop_when=("accuracy", ">=", 0.9), final_validation=True, task_props={"local_epochs": 2},
    ),
    "momentum": FedAvgM(initial_params={"w": [[1.0, 2.0]], "b": [0.5]}, momentum=0.5),
    "adam": FedAdam(rounds=2, server_lr=0.05, beta1=0.8, beta2=0.9, tau=0.01),
    "yogi": FedYogi(weigh_by="NUM_SAMPLES", train_task="fit"),
    "best": PickBest(metric="loss", mode="min"),
}  # fmt: skip


@pytest.mark.parametrize("config_format", ["json", "yaml", "toml"])
def test_controllers_round_trip_through_a_job_folder(tmp_path: Path, config_format: str) -> None:
    # Prepare
    job = Job("export")
    for name, controller in CONTROLLERS.items():
        job.add(controller, name=name, after=["avg", "adam"] if name == "best" else [])

    # Execute
    job.export(tmp_path / "job", format=config_format)  # type: ignore[arg-type]
    loaded = Job.load(tmp_path / "job")

    # Assert
    for name, controller in CONTROLLERS.items():
        assert loaded.nodes[name].controller == controller
    assert loaded.nodes["avg"].controller.task_names == ("train", "validate")


def test_a_hand_written_stop_when_list_becomes_a_tuple() -> None:
    controller = FedAvg(stop_when=["loss", "<", 0.1])  # type: ignore[arg-type]
    assert controller.stop_when == ("loss", "<", 0.1)
