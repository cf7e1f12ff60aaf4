"""The training loop: seeded, on CUDA with bf16 autocast when present (else CPU), with periodic validation
and atomic, resumable checkpoints (model + optimizer + step + RNG state).

    from training.loop import TrainingConfig, train
    result = train(build_recipe("digits-cnn"), TrainingConfig(steps=200), "runs/x/train")
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

from core.errors import TrainingError
from core.files import atomic_write
from core.results import Artifact, StageResult, Status
from recipes import Recipe

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
WEIGHTS = "model.pt"


class TrainingConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    steps: int = Field(600, ge=1, le=10_000_000, description="optimizer steps to train for")
    max_seconds: float | None = Field(None, gt=0, description="stop earlier once this much training time has passed")
    batch_size: int = Field(32, ge=1, le=65536)
    learning_rate: float = Field(2e-3, gt=0, le=1.0)
    weight_decay: float = Field(0.01, ge=0, le=1.0)
    warmup_steps: int = Field(20, ge=0)
    eval_every: int = Field(100, ge=1, description="validate every this many steps (and at the end)")
    eval_samples: int = Field(512, ge=1, description="held-out samples per validation")
    checkpoint_every: int = Field(100, ge=1)
    seed: int = Field(1337, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    resume: bool = Field(True, description="continue from the checkpoint in the output folder if there is one")


def pick_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise TrainingError("training.device is 'cuda' but no CUDA GPU is visible; use 'auto' or 'cpu'")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def torch_predictor(model: torch.nn.Module, recipe: Recipe, device: torch.device | str = "cpu") -> Callable[[dict[str, np.ndarray]], np.ndarray]:
    """A function from the recipe's named numpy inputs to the model's first output as numpy."""
    names = [spec.name for spec in recipe.inputs]

    @torch.no_grad()
    def predict(inputs: dict[str, np.ndarray]) -> np.ndarray:
        tensors = [torch.from_numpy(np.ascontiguousarray(inputs[name])).to(device) for name in names]
        return model(*tensors).float().cpu().numpy()

    return predict


def evaluate(recipe: Recipe, predict: Callable[[dict[str, np.ndarray]], np.ndarray], max_samples: int | None = None, batch_size: int = 32) -> dict[str, float]:
    """The recipe's metric over its validation split for any predictor (torch, ONNX Runtime, Triton)."""
    outputs, targets = [], []
    for batch in recipe.eval_batches(batch_size, max_samples):
        outputs.append(predict(batch.inputs))
        targets.append(batch.targets)
    return recipe.score(outputs, targets)


def _learning_rate(config: TrainingConfig, step: int) -> float:
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def _save_checkpoint(path: Path, state: dict) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def _load_checkpoint(path: Path, recipe: Recipe) -> dict:
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state.get("recipe") != recipe.describe():
        raise TrainingError(
            f"checkpoint {path} was written for {state.get('recipe')}, not {recipe.describe()}; "
            "train into another folder or set training.resume=false to start over"
        )
    return state


def train(recipe: Recipe, config: TrainingConfig, out_dir: str | Path, progress: bool = True) -> StageResult:
    """Train `recipe`'s model; writes `checkpoint.pt` and the final weights `model.pt` into `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = pick_device(config.device)
    autocast = device.type == "cuda"  # bf16 autocast on GPU; CPU trains in fp32
    torch.manual_seed(config.seed)
    model = recipe.build_model().to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    step, elapsed, history = 0, 0.0, []

    checkpoint_path = out_dir / CHECKPOINT
    if config.resume and checkpoint_path.exists():
        state = _load_checkpoint(checkpoint_path, recipe)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        step, elapsed, history = state["step"], state["elapsed_s"], state["history"]
        log.info("resuming from %s at step %d", checkpoint_path, step)

    def checkpoint() -> None:
        _save_checkpoint(checkpoint_path, {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "elapsed_s": elapsed,
            "history": history, "torch_rng": torch.get_rng_state(),
            "recipe": recipe.describe(), "config": config.model_dump(),
        })

    def validate() -> dict[str, float]:
        model.eval()
        metrics = evaluate(recipe, torch_predictor(model, recipe, device), config.eval_samples)
        model.train()
        history.append({"step": step, **metrics})
        return metrics

    batches = recipe.train_batches(config.batch_size, generator)
    for _ in range(step):  # replay the seeded data order, so a resumed run sees what an uninterrupted one would
        next(batches)
    parameters = sum(p.numel() for p in model.parameters())
    bar = tqdm(total=config.steps, initial=step, desc=f"train {recipe.name}", disable=not progress, unit="step", leave=False)
    model.train()
    loss_value, stopped_early, started = float("nan"), False, time.perf_counter() - elapsed
    while step < config.steps:
        if config.max_seconds is not None and elapsed >= config.max_seconds:
            stopped_early = True
            break
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(config, step)
        inputs, targets = next(batches)
        inputs, targets = tuple(t.to(device) for t in inputs), targets.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = recipe.loss(model, inputs, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        elapsed = time.perf_counter() - started
        if step % 10 == 0 or step == config.steps:
            loss_value = loss.item()  # a CPU-GPU sync point: only every 10 steps
            bar.set_postfix(loss=f"{loss_value:.3f}")
        bar.update(1)
        if step % config.eval_every == 0 and step < config.steps:
            metrics = validate()
            line = f"step {step}/{config.steps}: loss {loss.item():.4f}, " + ", ".join(
                f"{k} {v:.4f}" for k, v in metrics.items() if k != "samples")
            bar.write(line) if progress else log.info(line)
        if step % config.checkpoint_every == 0:
            checkpoint()
    bar.close()
    final = validate()
    checkpoint()
    model.eval()
    weights_path = atomic_write(out_dir / WEIGHTS, lambda tmp: torch.save(model.to("cpu").state_dict(), tmp))
    return StageResult(
        stage="train", status=Status.OK, seconds=elapsed,
        artifacts=[Artifact.of(weights_path), Artifact.of(checkpoint_path)],
        outputs={
            "device": str(device), "autocast_bf16": autocast, "steps": step, "stopped_early_by_time": stopped_early,
            "final_loss": loss_value, "parameters": parameters,
            "validation": final, "history": history, "weights": str(weights_path),
        },
    )


def load_trained(recipe: Recipe, weights_path: str | Path) -> torch.nn.Module:
    model = recipe.build_model()
    model.load_state_dict(torch.load(weights_path, map_location="cpu", weights_only=True))
    return model.eval()
