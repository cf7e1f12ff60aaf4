from pathlib import Path

import pytest
import torch

from core.errors import TrainingError
from core.results import CHECKPOINT_FILE as CHECKPOINT
from recipes import build_recipe
from recipes.evaluation import load_trained
from tests.conftest import TINY_DIGITS, TINY_GPT
from training import loop
from training.loop import TrainingConfig, train


def tiny(**overrides) -> TrainingConfig:
    return TrainingConfig(
        **{
            "steps": 40,
            "batch_size": 32,
            "eval_every": 20,
            "eval_samples": 128,
            "checkpoint_every": 10,
            "learning_rate": 1e-2,
            "warmup_steps": 5,
            **overrides,
        }
    )


def test_training_learns_digits_and_writes_weights(tmp_path: Path):
    result = train(build_recipe("digits-cnn", TINY_DIGITS), tiny(steps=80), tmp_path, progress=False)
    assert result.status.value == "ok" and result.output.device == "cpu"
    assert result.output.validation["accuracy"] > 0.5  # chance is 0.1
    assert [step["step"] for step in result.output.history] == [20, 40, 60, 80]
    assert {Path(a.path).name for a in result.artifacts} == {"model.pt", CHECKPOINT}
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_resumed_run_matches_an_uninterrupted_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    recipe = build_recipe("digits-cnn", TINY_DIGITS)
    whole = train(recipe, tiny(steps=30), tmp_path / "whole", progress=False)

    original = loop._save_checkpoint

    def killed_after_step_20(path, state):
        original(path, state)
        if state["step"] == 20:
            raise KeyboardInterrupt("simulated kill")

    monkeypatch.setattr(loop, "_save_checkpoint", killed_after_step_20)
    with pytest.raises(KeyboardInterrupt):
        train(recipe, tiny(steps=30), tmp_path / "split", progress=False)
    monkeypatch.setattr(loop, "_save_checkpoint", original)
    resumed = train(recipe, tiny(steps=30), tmp_path / "split", progress=False)
    assert resumed.output.steps == 30
    a, b = load_trained(recipe, whole.output.weights), load_trained(recipe, resumed.output.weights)
    for (name, left), (_, right) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.allclose(left, right, atol=1e-6), name


def test_checkpoint_of_another_recipe_is_refused(tmp_path: Path):
    train(build_recipe("digits-cnn", TINY_DIGITS), tiny(steps=10), tmp_path, progress=False)
    with pytest.raises(TrainingError, match="resume=false"):
        train(build_recipe("digits-cnn", {"channels": 4, "hidden": 16}), tiny(steps=20), tmp_path, progress=False)


def test_time_budget_stops_training_early(tmp_path: Path):
    result = train(
        build_recipe("digits-cnn", TINY_DIGITS), tiny(steps=100_000, max_seconds=1.0), tmp_path, progress=False
    )
    assert result.output.stopped_early_by_time and result.output.steps < 100_000


def test_cuda_request_without_gpu_is_a_clear_error(tmp_path: Path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(TrainingError, match="no CUDA GPU"):
        train(build_recipe("digits-cnn", TINY_DIGITS), tiny(device="cuda"), tmp_path, progress=False)


@pytest.mark.gpu
def test_gpu_training_uses_bf16_autocast(tmp_path: Path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    result = train(build_recipe("digits-cnn", TINY_DIGITS), tiny(steps=40), tmp_path, progress=False)
    assert result.output.device.startswith("cuda") and result.output.autocast_bf16
    assert result.output.validation["accuracy"] > 0.5


def test_training_progress_is_logged_for_flow_runs(tmp_path, caplog):
    """What a Prefect flow run's logger shows: step, loss, steps/s and ETA, about ten lines per run."""
    import logging

    recipe = build_recipe("stdlib-gpt", TINY_GPT)
    config = TrainingConfig(steps=20, eval_every=1000, eval_samples=16, batch_size=4)
    with caplog.at_level(logging.INFO, logger="training.loop"):
        train(recipe, config, tmp_path, progress=False)
    lines = [r.getMessage() for r in caplog.records if "steps/s" in r.getMessage()]
    assert 5 <= len(lines) <= 12 and lines[-1].startswith("train stdlib-gpt: step 20/20, loss ")
    assert "ETA" in lines[0]
