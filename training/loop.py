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
from typing import Any, Iterator, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

from core.errors import TrainingError
from core.files import atomic_write
from core.results import CHECKPOINT_FILE, WEIGHTS_FILE, Artifact, StageOutput, StageResult, Status
from recipes import Recipe
from recipes.evaluation import evaluate, torch_predictor

log = logging.getLogger(__name__)


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


class TrainOutput(StageOutput):
    device: str
    autocast_bf16: bool
    steps: int
    stopped_early_by_time: bool
    final_loss: float
    parameters: int
    validation: dict[str, float]
    history: tuple[dict[str, float], ...]
    weights: str


def pick_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise TrainingError("training.device is 'cuda' but no CUDA GPU is visible; use 'auto' or 'cpu'")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


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


class _Trainer:
    """One training run's state: model, optimizer, step, elapsed time and validation history, with the
    checkpoint that holds all of them (and the RNG state) so a killed run resumes where it stopped."""

    def __init__(self, recipe: Recipe, config: TrainingConfig, out_dir: Path):
        self.recipe, self.config, self.checkpoint_path = recipe, config, out_dir / CHECKPOINT_FILE
        self.device = pick_device(config.device)
        self.autocast = self.device.type == "cuda"  # bf16 autocast on GPU; CPU trains in fp32
        torch.manual_seed(config.seed)
        self.model = recipe.build_model().to(self.device)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
        )
        self.step, self.elapsed, self.history = 0, 0.0, []
        if config.resume and self.checkpoint_path.exists():
            state = _load_checkpoint(self.checkpoint_path, recipe)
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            torch.set_rng_state(state["torch_rng"])
            self.step, self.elapsed, self.history = state["step"], state["elapsed_s"], state["history"]
            log.info("resuming from %s at step %d", self.checkpoint_path, self.step)

    def checkpoint(self) -> None:
        _save_checkpoint(
            self.checkpoint_path,
            {
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "step": self.step,
                "elapsed_s": self.elapsed,
                "history": self.history,
                "torch_rng": torch.get_rng_state(),
                "recipe": self.recipe.describe(),
                "config": self.config.model_dump(),
            },
        )

    def validate(self) -> dict[str, float]:
        self.model.eval()
        metrics = evaluate(self.recipe, torch_predictor(self.model, self.recipe, self.device), self.config.eval_samples)
        self.model.train()
        self.history.append({"step": self.step, **metrics})
        return metrics

    def batches(self) -> Iterator[Any]:
        """The seeded training batches, fast-forwarded past the steps already taken, so a resumed run sees what
        an uninterrupted one would."""
        batches = self.recipe.train_batches(self.config.batch_size, torch.Generator().manual_seed(self.config.seed))
        for _ in range(self.step):
            next(batches)
        return batches

    def one_step(self, inputs: tuple[torch.Tensor, ...], targets: torch.Tensor) -> torch.Tensor:
        for group in self.optimizer.param_groups:
            group["lr"] = _learning_rate(self.config, self.step)
        inputs, targets = tuple(t.to(self.device) for t in inputs), targets.to(self.device)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            loss = self.recipe.loss(self.model, inputs, targets)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.step += 1
        return loss


def train(
    recipe: Recipe, config: TrainingConfig, out_dir: str | Path, progress: bool = True
) -> StageResult[TrainOutput]:
    """Train `recipe`'s model; writes `checkpoint.pt` and the final weights `model.pt` into `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    run = _Trainer(recipe, config, out_dir)
    batches = run.batches()
    bar = tqdm(
        total=config.steps,
        initial=run.step,
        desc=f"train {recipe.name}",
        disable=not progress,
        unit="step",
        leave=False,
    )
    run.model.train()
    loss_value, stopped_early, started = float("nan"), False, time.perf_counter() - run.elapsed
    while run.step < config.steps:
        if config.max_seconds is not None and run.elapsed >= config.max_seconds:
            stopped_early = True
            break
        loss = run.one_step(*next(batches))
        run.elapsed = time.perf_counter() - started
        if run.step % 10 == 0 or run.step == config.steps:
            loss_value = loss.item()  # a CPU-GPU sync point: only every 10 steps
            bar.set_postfix(loss=f"{loss_value:.3f}")
        bar.update(1)
        if run.step % config.eval_every == 0 and run.step < config.steps:
            metrics = run.validate()
            line = f"step {run.step}/{config.steps}: loss {loss.item():.4f}, " + ", ".join(
                f"{k} {v:.4f}" for k, v in metrics.items() if k != "samples"
            )
            bar.write(line) if progress else log.info(line)
        if run.step % config.checkpoint_every == 0:
            run.checkpoint()
    bar.close()
    final = run.validate()
    run.checkpoint()
    run.model.eval()
    weights_path = atomic_write(out_dir / WEIGHTS_FILE, lambda tmp: torch.save(run.model.to("cpu").state_dict(), tmp))
    output = TrainOutput(
        device=str(run.device),
        autocast_bf16=run.autocast,
        steps=run.step,
        stopped_early_by_time=stopped_early,
        final_loss=loss_value,
        parameters=sum(p.numel() for p in run.model.parameters()),
        validation=final,
        history=tuple(run.history),
        weights=str(weights_path),
    )
    return StageResult(
        stage="train",
        status=Status.OK,
        seconds=run.elapsed,
        artifacts=(Artifact.of(weights_path), Artifact.of(run.checkpoint_path)),
        output=output,
    )
