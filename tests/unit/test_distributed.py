"""Training under torchrun: 2 gloo processes on CPU against one, restarts after a SIGKILL, failures named by rank.

Each torchrun test starts real processes (about 5-10 s each on 2 cores); the pure logic is tested without any.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from core.errors import TrainingError
from flows.params import parse_params
from recipes import DigitsCnnOptions, build_recipe
from recipes.digits_cnn import DigitsCnnRecipe
from recipes.evaluation import load_trained
from tests.conftest import TINY_GPT
from training import loop
from training.distributed import (
    JOB_FILE,
    RANKS_FOLDER,
    job_folder,
    recipe_reference,
    torchrun_args,
    worker_environment,
)
from training.loop import TrainingConfig, micro_batches, train

# The same global batch gives the same losses whatever the process count, up to float rounding: the gradient is
# summed in another order (per rank, then averaged). Measured over 60 steps of the tiny GPT: 2e-7 relative on the
# final loss; Adam turns the rounding in near-zero gradients into weight differences of up to 7e-4 (lr 1e-2).
LOSS_RTOL = 1e-4
WEIGHTS_ATOL = 2e-3
SAME_ARITHMETIC_ATOL = 1e-6  # a resumed run against an uninterrupted one with the same process count


def tiny(**overrides) -> TrainingConfig:
    return TrainingConfig(
        **{
            "steps": 40,
            "batch_size": 16,
            "eval_every": 20,
            "eval_samples": 64,
            "checkpoint_every": 10,
            "learning_rate": 1e-2,
            "warmup_steps": 5,
            "resume": False,
            **overrides,
        }
    )


@pytest.fixture(scope="module")
def gpt():
    return build_recipe("stdlib-gpt", TINY_GPT)


@pytest.fixture(scope="module")
def one_process(gpt, tmp_path_factory):
    return train(gpt, tiny(), tmp_path_factory.mktemp("one"), progress=False)


@pytest.fixture(scope="module")
def two_processes(gpt, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("two")
    return out_dir, train(gpt, tiny(nproc_per_node=2), out_dir, progress=False)


def assert_same_training(left, right, recipe, weights_atol: float = WEIGHTS_ATOL) -> None:
    assert left.output.steps == right.output.steps
    assert right.output.final_loss == pytest.approx(left.output.final_loss, rel=LOSS_RTOL)
    for before, after in zip(left.output.history, right.output.history, strict=True):
        assert after["bits_per_byte"] == pytest.approx(before["bits_per_byte"], rel=LOSS_RTOL)
    a, b = load_trained(recipe, left.output.weights), load_trained(recipe, right.output.weights)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.allclose(x, y, atol=weights_atol), name


def rank_status(out_dir: Path, rank: int) -> dict:
    return json.loads((job_folder(out_dir) / RANKS_FOLDER / f"rank-{rank}.json").read_text())


def kill_rank_after_first_checkpoint(out_dir: Path, rank: int) -> threading.Thread:
    """SIGKILL `rank`'s process once it has passed the first checkpoint (in its first attempt)."""

    def kill() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                status = rank_status(out_dir, rank)
            except (FileNotFoundError, json.JSONDecodeError):
                status = {}
            if status.get("attempt") == 0 and status.get("checkpoint_step", 0) >= 10:
                os.kill(status["pid"], signal.SIGKILL)
                return
            time.sleep(0.01)

    killer = threading.Thread(target=kill, daemon=True)
    killer.start()
    return killer


# --- with processes ---------------------------------------------------------------------------------------------
def test_two_gloo_processes_reach_the_losses_of_one_with_the_same_global_batch(gpt, one_process, two_processes):
    out_dir, result = two_processes
    assert result.ok and result.output.processes == 2 and result.output.restarts == 0
    assert_same_training(one_process, result, gpt)
    # rank 0 alone writes checkpoints: at steps 10, 20, 30, 40 and the final one
    assert rank_status(out_dir, 0)["checkpoints_saved"] == 5 and rank_status(out_dir, 1)["checkpoints_saved"] == 0
    assert {Path(a.path).name for a in result.artifacts} == {"model.pt", "checkpoint.pt"}
    assert all(a.intact() for a in result.artifacts)
    assert not [p for p in out_dir.rglob("*.tmp")]


def test_a_rank_killed_mid_run_is_restarted_and_resumes_from_the_checkpoint(gpt, two_processes, tmp_path: Path):
    killer = kill_rank_after_first_checkpoint(tmp_path, rank=1)
    resumed = train(gpt, tiny(nproc_per_node=2, max_restarts=1), tmp_path, progress=False)
    killer.join(timeout=1)
    assert resumed.ok and resumed.output.restarts == 1 and resumed.output.steps == 40
    status = rank_status(tmp_path, 1)
    assert status["attempt"] == 1 and status["resumed_from"] >= 10  # from this launch's checkpoint (resume=false)
    assert_same_training(two_processes[1], resumed, gpt, SAME_ARITHMETIC_ATOL)  # the uninterrupted 2-process run


def test_with_no_restarts_left_a_killed_rank_fails_the_stage_naming_it(gpt, tmp_path: Path):
    kill_rank_after_first_checkpoint(tmp_path, rank=1)
    with pytest.raises(TrainingError, match=r"rank 1 .*killed by signal SIGKILL.*max_restarts=0") as failure:
        train(gpt, tiny(nproc_per_node=2, max_restarts=0, steps=2000), tmp_path, progress=False)
    assert "last checkpoint (step" in str(failure.value)


class FailsOnRank1(DigitsCnnRecipe):
    """digits-cnn whose rank 1 cannot read its data: a Python error in one process."""

    def train_batches(self, batch_size, generator):
        if os.environ.get("RANK") == "1":
            raise RuntimeError("rank 1 cannot read its data")
        return super().train_batches(batch_size, generator)


def test_a_python_error_in_one_rank_fails_the_stage_with_that_rank_and_error(tmp_path: Path):
    recipe = FailsOnRank1(DigitsCnnOptions(channels=4, hidden=16))
    with pytest.raises(TrainingError, match=r"rank 1 .*exited with code 1.*RuntimeError: rank 1 cannot read its data"):
        train(recipe, tiny(nproc_per_node=2, max_restarts=0), tmp_path, progress=False)
    failure = json.loads((job_folder(tmp_path) / "failure.json").read_text())
    assert failure[0]["rank"] == 1 and "train_batches" in failure[0]["traceback"]


def test_fsdp_resumes_a_one_process_checkpoint_and_trains_like_it(
    gpt, one_process, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    original = loop._save_checkpoint

    def stopped_after_step_20(path, state):
        original(path, state)
        if state["step"] == 20:
            raise KeyboardInterrupt("simulated stop")

    monkeypatch.setattr(loop, "_save_checkpoint", stopped_after_step_20)
    with pytest.raises(KeyboardInterrupt):
        train(gpt, tiny(), tmp_path, progress=False)  # one process, to step 20 of 40
    monkeypatch.undo()
    sharded = train(gpt, tiny(nproc_per_node=2, strategy="fsdp", resume=True), tmp_path, progress=False)
    assert sharded.ok and sharded.output.steps == 40
    assert_same_training(one_process, sharded, gpt)


def test_two_machines_meet_at_the_rendezvous_endpoint(gpt, one_process, tmp_path: Path):
    """Two 'machines' on this one, one process each: node 0 through train(), node 1 through the command the docs
    give for the other machines."""
    config = tiny(nnodes=2, rdzv_endpoint=f"127.0.0.1:{free_port()}")
    job = job_folder(tmp_path) / JOB_FILE
    node_1: list[subprocess.Popen] = []

    def start_node_1() -> None:
        deadline = time.monotonic() + 60
        while not job.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        command = [sys.executable, "-m", "training.distributed", str(job), "--node-rank", "1"]
        node_1.append(subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

    starter = threading.Thread(target=start_node_1, daemon=True)
    starter.start()
    try:
        result = train(gpt, config, tmp_path, progress=False)
        starter.join(timeout=60)
        assert node_1[0].wait(timeout=60) == 0
    finally:
        for process in node_1:
            process.kill() if process.poll() is None else None
    assert result.output.processes == 2
    assert_same_training(one_process, result, gpt)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# --- without processes ------------------------------------------------------------------------------------------
def test_gradient_accumulation_in_one_process_matches_the_whole_batch(gpt, one_process, tmp_path: Path):
    accumulated = train(gpt, tiny(grad_accum_steps=4), tmp_path, progress=False)
    assert_same_training(one_process, accumulated, gpt)


def test_micro_batches_cover_the_global_batch_once_with_weights_averaging_to_its_mean():
    targets = torch.arange(10)
    for world_size, accum in ((1, 1), (2, 1), (2, 2), (3, 2)):
        pieces = [p for rank in range(world_size) for p in micro_batches((targets,), targets, rank, world_size, accum)]
        rows = torch.cat([t for _, t, weight in pieces if weight])
        assert rows.tolist() == list(range(10))
        # DDP averages over ranks: sum of weights / world_size is 1, each row counted as 1/10 of the mean
        assert sum(weight for *_, weight in pieces) / world_size == pytest.approx(1.0)
    empty = micro_batches((targets[:1],), targets[:1], rank=1, world_size=2, accum_steps=1)
    assert empty[0][2] == 0.0 and len(empty[0][1]) == 1  # a weightless stand-in keeps the collectives in step


def test_a_batch_that_does_not_split_over_the_processes_is_refused_naming_the_fields():
    with pytest.raises(ValueError, match=r"batch_size: 30 .* 2 x 2 x 2 = 8 .* multiple of 8 such as 32"):
        TrainingConfig(batch_size=30, nnodes=2, nproc_per_node=2, grad_accum_steps=2, rdzv_endpoint="h:1")
    with pytest.raises(ValueError, match=r"rdzv_endpoint: required when nnodes > 1.*node_rank: 3 is not below"):
        TrainingConfig(nnodes=2, node_rank=3)


def test_the_pipeline_parameters_take_the_distributed_fields():
    params = parse_params({"training": {"nproc_per_node": 2, "rdzv_endpoint": "10.0.0.1:29500", "nnodes": 2}})
    assert params.training.world_size == 4 and params.training.distributed


def test_torchrun_arguments_for_one_machine_and_for_several():
    one = torchrun_args("job.json", TrainingConfig(nproc_per_node=2, max_restarts=3))
    assert one == ["--nproc-per-node", "2", "--max-restarts", "3", "--standalone", "-m", "training.worker", "job.json"]
    several = torchrun_args("job.json", TrainingConfig(nnodes=2, node_rank=1, rdzv_endpoint="10.0.0.1:29500"))
    assert several[several.index("--node-rank") + 1] == "1" and "--standalone" not in several
    assert several[several.index("--rdzv-endpoint") + 1] == "10.0.0.1:29500"


def test_processes_share_the_cores_unless_the_user_set_the_threads():
    cores = len(os.sched_getaffinity(0))
    assert worker_environment(TrainingConfig(nproc_per_node=2), base={})["OMP_NUM_THREADS"] == str(max(1, cores // 2))
    assert worker_environment(TrainingConfig(nproc_per_node=2), base={"OMP_NUM_THREADS": "3"})["OMP_NUM_THREADS"] == "3"


def test_recipes_are_rebuilt_in_the_processes_by_reference():
    assert recipe_reference(build_recipe("digits-cnn")) == "digits-cnn"
    assert recipe_reference(FailsOnRank1()) == "tests.unit.test_distributed:FailsOnRank1"
    local = type("Local", (DigitsCnnRecipe,), {"__module__": "__main__"})
    with pytest.raises(TrainingError, match="cannot import"):
        recipe_reference(local())
