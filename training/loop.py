"""The training loop: seeded, on CUDA with bf16 autocast when present (else CPU), with periodic validation
and atomic, resumable checkpoints (model + optimizer + step + RNG state).

    from training.loop import TrainingConfig, train
    result = train(build_recipe("digits-cnn"), TrainingConfig(steps=200), "runs/x/train")

One process trains here, in this process. With `nproc_per_node` above 1 (or `nnodes` above 1) `train` launches
torchrun instead (`training.distributed`), whose processes run this same loop through `training.worker`.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any, Iterator, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
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
    grad_accum_steps: int = Field(
        1,
        ge=1,
        le=4096,
        description="micro-batches per optimizer step: each process splits its share of batch_size into this many "
        "to save memory; batch_size stays the global batch",
    )
    nproc_per_node: int = Field(
        1,
        ge=1,
        le=512,
        description="training processes on this machine (one per GPU on a GPU host); above 1, or nnodes above 1, "
        "trains under torchrun with DDP: gloo on CPU, NCCL on GPU",
    )
    nnodes: int = Field(1, ge=1, le=1024, description="machines in the run, each running nproc_per_node processes")
    node_rank: int = Field(
        0,
        ge=0,
        le=1023,
        description="this machine's index, 0 to nnodes-1; node 0 holds rank 0, which alone writes the checkpoints, "
        "the weights and the result",
    )
    rdzv_endpoint: str | None = Field(
        None,
        pattern=r"^\S+:\d{1,5}$",
        description="host:port on node 0 where the processes of every machine meet (required when nnodes > 1); "
        "None on one machine: a free local port",
    )
    max_restarts: int = Field(
        2,
        ge=0,
        le=100,
        description="times torchrun restarts the processes after one dies; they resume from the last checkpoint. "
        "0: the stage fails at the first death",
    )
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="ddp: every process holds the whole model; fsdp: parameters, gradients and optimizer state "
        "sharded across the processes (FSDP2), for models that do not fit one device",
    )

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc_per_node

    @property
    def distributed(self) -> bool:
        """True when training runs in torchrun's processes rather than in the calling one."""
        return self.world_size > 1

    @model_validator(mode="after")
    def _processes_fit(self) -> "TrainingConfig":
        problems = []
        pieces = self.world_size * self.grad_accum_steps
        if self.batch_size % pieces:
            fits = max(pieces, round(self.batch_size / pieces) * pieces)
            problems.append(
                f"batch_size: {self.batch_size} does not split evenly into nnodes x nproc_per_node x "
                f"grad_accum_steps = {self.nnodes} x {self.nproc_per_node} x {self.grad_accum_steps} = {pieces} "
                f"micro-batches (batch_size is the global batch whatever the process count); use a multiple of "
                f"{pieces} such as {fits}, or fewer processes or accumulation steps"
            )
        if self.nnodes > 1 and self.rdzv_endpoint is None:
            problems.append(
                "rdzv_endpoint: required when nnodes > 1: host:port on node 0 that every machine reaches, "
                "such as 10.0.0.1:29500"
            )
        if self.node_rank >= self.nnodes:
            problems.append(
                f"node_rank: {self.node_rank} is not below nnodes ({self.nnodes}); use 0 to {self.nnodes - 1}"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self


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
    processes: int = 1  # world size: every machine's training processes
    restarts: int = 0  # times torchrun restarted the processes after one died


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


def _load_checkpoint(path: Path, recipe: Recipe, mmap: bool = False) -> dict:
    """The checkpoint's state, refused when another recipe wrote it; `mmap` maps the tensors instead of reading
    them (enough to check the recipe)."""
    state = torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    if state.get("recipe") != recipe.describe():
        raise TrainingError(
            f"checkpoint {path} was written for {state.get('recipe')}, not {recipe.describe()}; "
            "train into another folder or set training.resume=false to start over"
        )
    return state


class LossModule(torch.nn.Module):
    """The recipe's loss as one module, so a parallel wrapper (DDP, FSDP) sees every forward that makes gradients:
    a recipe may compute its loss on part of its model (`model.gpt`), which would go around the wrapper's hooks.
    Without targets it returns the model's outputs (validation)."""

    def __init__(self, recipe: Recipe, model: torch.nn.Module):
        super().__init__()
        self.recipe, self.model = recipe, model

    def forward(self, inputs: tuple[torch.Tensor, ...], targets: torch.Tensor | None = None) -> torch.Tensor:
        if targets is None:
            return self.model(*inputs)
        return self.recipe.loss(self.model, inputs, targets)


def micro_batches(
    inputs: tuple[torch.Tensor, ...], targets: torch.Tensor, rank: int, world_size: int, accum_steps: int
) -> list[tuple[tuple[torch.Tensor, ...], torch.Tensor, float]]:
    """Process `rank`'s share of one global batch: its contiguous slice of the rows, cut into `accum_steps` pieces,
    each with the weight that makes the weighted per-piece mean losses, averaged over the processes (as DDP averages
    gradients), the mean loss of the whole batch: world_size x piece rows / batch rows."""
    total = len(targets)
    pieces = []
    for rows in torch.arange(total).tensor_split(world_size)[rank].tensor_split(accum_steps):
        # a short last batch (digits-cnn's epoch end) may leave a piece empty: a weightless stand-in row keeps the
        # processes' collectives in step
        start, stop, weight = (
            (int(rows[0]), int(rows[-1]) + 1, world_size * len(rows) / total) if len(rows) else (0, 1, 0.0)
        )
        pieces.append((tuple(t[start:stop] for t in inputs), targets[start:stop], weight))
    return pieces


class Progress:
    """Where the loop reports: nothing here; a tqdm bar in one process, progress lines from torchrun's rank 0."""

    def start(self, step: int) -> None:
        """Training starts (or resumes) at `step`: what came before was start-up."""

    def advance(self, step: int, loss: float | None) -> None: ...

    def line(self, text: str) -> None: ...

    def close(self) -> None: ...


class ProgressBar(Progress):
    """A tqdm bar on the terminal, and a log line (step, loss, steps/s, ETA) every tenth of the run or 30 s at the
    most, which is what a Prefect flow run's logger and `prefect deployment run --watch` show."""

    LOG_EVERY_S = 30.0

    def __init__(self, description: str, total: int, initial: int, enabled: bool):
        self.enabled, self.description = enabled, description
        self.bar = tqdm(total=total, initial=initial, desc=description, disable=not enabled, unit="step", leave=False)
        self._logged_at, self._logged_step, self._started, self._first = (
            time.monotonic(),
            initial,
            time.monotonic(),
            initial,
        )
        self._loss: float | None = None

    def start(self, step: int) -> None:
        self.bar.reset(total=self.bar.total)  # the rate counts from here, not from torchrun's start
        self.bar.initial = self.bar.n = step
        self.bar.refresh()
        self._started, self._first, self._logged_at, self._logged_step = time.monotonic(), step, time.monotonic(), step

    def advance(self, step: int, loss: float | None) -> None:
        if loss is not None:
            self.bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
            self._loss = loss
        self.bar.update(step - self.bar.n)
        self._log(step)

    def _log(self, step: int) -> None:
        now, total = time.monotonic(), self.bar.total or 0
        tenth = max(1, total // 10)
        if step < total and now - self._logged_at < self.LOG_EVERY_S and step - self._logged_step < tenth:
            return
        rate = (step - self._first) / max(now - self._started, 1e-9)
        eta = f", ETA {(total - step) / rate:.0f} s" if rate > 0 and step < total else ""
        loss = f", loss {self._loss:.4f}" if self._loss is not None else ""
        log.info("%s: step %d/%d%s, %.2f steps/s%s", self.description, step, total, loss, rate, eta)
        self._logged_at, self._logged_step = now, step

    def line(self, text: str) -> None:
        self.bar.write(text) if self.enabled else log.info(text)

    def close(self) -> None:
        self.bar.close()


class _Trainer:
    """One training run's state: model, optimizer, step, elapsed time and validation history, with the
    checkpoint that holds all of them (and the RNG state) so a killed run resumes where it stopped.

    This is the one-process trainer; `training.worker` subclasses it for torchrun's processes, overriding the
    methods under "what a distributed run changes"."""

    rank, world_size, restarts = 0, 1, 0
    launch_id: str | None = None  # set under torchrun: which launch wrote a checkpoint, so restarts resume from it

    def __init__(self, recipe: Recipe, config: TrainingConfig, out_dir: Path):
        self.recipe, self.config, self.checkpoint_path = recipe, config, out_dir / CHECKPOINT_FILE
        self.device = self._pick_device()
        self.autocast = self.device.type == "cuda"  # bf16 autocast on GPU; CPU trains in fp32
        torch.manual_seed(config.seed)
        self.model = recipe.build_model().to(self.device)
        self.parameters = sum(p.numel() for p in self.model.parameters())
        self.step, self.elapsed, self.history = 0, 0.0, []
        state = self._read_checkpoint()
        self.loss_module = self._parallel(LossModule(recipe, self.model))
        self.optimizer = torch.optim.AdamW(
            self.loss_module.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
        )
        if state is not None:
            self._restore(state)
            log.info("resuming from %s at step %d", self.checkpoint_path, self.step)

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes the checkpoints, the weights and the result."""
        return self.rank == 0

    # --- what a distributed run changes (training.worker) --------------------------------------------------------
    def _pick_device(self) -> torch.device:
        return pick_device(self.config.device)

    def _parallel(self, module: torch.nn.Module) -> torch.nn.Module:
        """The module that computes the loss, wrapped for data parallelism (DDP, FSDP) where there is any."""
        return module

    def _read_checkpoint(self) -> dict | None:
        """The checkpoint to resume from, if any."""
        if not (self.config.resume and self.checkpoint_path.exists()):
            return None
        return _load_checkpoint(self.checkpoint_path, self.recipe)

    def _restore(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        self.step, self.elapsed, self.history = state["step"], state["elapsed_s"], state["history"]

    def _full_model_state(self) -> dict[str, torch.Tensor]:
        """The whole model's state dict (on rank 0; a sharded run gathers it, and other ranks may get {})."""
        return self.model.state_dict()

    def _full_optimizer_state(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def _accumulating(self, active: bool) -> AbstractContextManager:
        """While active, gradients add up locally without being synchronized across processes."""
        return nullcontext()

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """`value` averaged over the processes."""
        return value

    def agree(self, flag: bool) -> bool:
        """Rank 0's `flag`, so that every process takes the same branch."""
        return flag

    def synchronize(self) -> None:
        """Wait until every process gets here."""

    @property
    def evaluates(self) -> bool:
        """Whether this process runs validation (rank 0 alone, unless the model is sharded)."""
        return True

    def _predictor(self):
        return torch_predictor(self.model, self.recipe, self.device)

    # --- the loop ------------------------------------------------------------------------------------------------
    def checkpoint(self) -> None:
        model_state, optimizer_state = self._full_model_state(), self._full_optimizer_state()
        if self.is_main:
            _save_checkpoint(
                self.checkpoint_path,
                {
                    "model": model_state,
                    "optimizer": optimizer_state,
                    "step": self.step,
                    "elapsed_s": self.elapsed,
                    "history": self.history,
                    "torch_rng": torch.get_rng_state(),
                    "recipe": self.recipe.describe(),
                    "config": self.config.model_dump(),
                    "launch_id": self.launch_id,
                },
            )
        self.synchronize()  # no process runs ahead of a checkpoint that is not on disk yet

    def validate(self) -> dict[str, float]:
        if not self.evaluates:
            return {}
        self.loss_module.eval()
        metrics = evaluate(self.recipe, self._predictor(), self.config.eval_samples)
        self.loss_module.train()
        self.history.append({"step": self.step, "elapsed_s": self.elapsed, **metrics})
        return metrics

    def batches(self) -> Iterator[Any]:
        """The seeded global batches, fast-forwarded past the steps already taken, so a resumed run sees what
        an uninterrupted one would. Every process draws the same global batches and trains on its own rows."""
        batches = self.recipe.train_batches(self.config.batch_size, torch.Generator().manual_seed(self.config.seed))
        for _ in range(self.step):
            next(batches)
        return batches

    def one_step(self, inputs: tuple[torch.Tensor, ...], targets: torch.Tensor) -> torch.Tensor:
        """One optimizer step over this process's rows of the global batch; returns its weighted loss (the
        batch's mean loss once averaged over the processes)."""
        for group in self.optimizer.param_groups:
            group["lr"] = _learning_rate(self.config, self.step)
        self.optimizer.zero_grad(set_to_none=True)
        pieces = micro_batches(inputs, targets, self.rank, self.world_size, self.config.grad_accum_steps)
        total = torch.zeros((), device=self.device)
        for index, (piece_inputs, piece_targets, weight) in enumerate(pieces):
            piece_inputs = tuple(t.to(self.device) for t in piece_inputs)
            with self._accumulating(index < len(pieces) - 1):  # the last piece's backward synchronizes
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                    loss = self.loss_module(piece_inputs, piece_targets.to(self.device))
                (loss * weight).backward()
            total += loss.detach().float() * weight
        torch.nn.utils.clip_grad_norm_(self.loss_module.parameters(), 1.0)
        self.optimizer.step()
        self.step += 1
        return total

    def run(self, progress: Progress) -> tuple[float, bool, dict[str, float]]:
        """Train to `config.steps` or the time budget; returns (last logged loss, stopped by time, final metrics)."""
        config = self.config
        batches = self.batches()
        self.loss_module.train()
        loss_value, stopped_early, started = float("nan"), False, time.perf_counter() - self.elapsed
        while self.step < config.steps:
            if config.max_seconds is not None and self.agree(self.elapsed >= config.max_seconds):
                stopped_early = True
                break
            loss = self.one_step(*next(batches))
            self.elapsed = time.perf_counter() - started
            logged = self.step % 10 == 0 or self.step == config.steps
            if logged:
                # a CPU-GPU sync point and, across processes, an all-reduce: only every 10 steps
                loss_value = self.mean(loss).item()
            progress.advance(self.step, loss_value if logged else None)
            if self.step % config.eval_every == 0 and self.step < config.steps:
                loss_now = loss_value if logged else self.mean(loss).item()
                metrics = self.validate()
                if metrics:
                    progress.line(
                        f"step {self.step}/{config.steps}: loss {loss_now:.4f}, "
                        + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "samples")
                    )
            if self.step % config.checkpoint_every == 0:
                self.checkpoint()
        final = self.validate()
        self.checkpoint()
        return loss_value, stopped_early, final

    def save_weights(self, path: Path) -> Path | None:
        """The final weights, written by rank 0 (None elsewhere)."""
        state = self._full_model_state()
        if not self.is_main:
            return None
        return atomic_write(path, lambda tmp: torch.save({k: v.detach().cpu() for k, v in state.items()}, tmp))

    def result(
        self, loss_value: float, stopped_early: bool, final: dict[str, float], weights_path: Path
    ) -> StageResult[TrainOutput]:
        output = TrainOutput(
            device=str(self.device),
            autocast_bf16=self.autocast,
            steps=self.step,
            stopped_early_by_time=stopped_early,
            final_loss=loss_value,
            parameters=self.parameters,
            validation=final,
            history=tuple(self.history),
            weights=str(weights_path),
            processes=self.world_size,
            restarts=self.restarts,
        )
        return StageResult(
            stage="train",
            status=Status.OK,
            seconds=self.elapsed,
            artifacts=(Artifact.of(weights_path), Artifact.of(self.checkpoint_path)),
            output=output,
        )


def train(
    recipe: Recipe, config: TrainingConfig, out_dir: str | Path, progress: bool = True
) -> StageResult[TrainOutput]:
    """Train `recipe`'s model; writes `checkpoint.pt` and the final weights `model.pt` into `out_dir`.

    With more than one process (`config.distributed`) this launches torchrun, streams its progress and returns
    rank 0's result (see `training.distributed`)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if config.distributed:
        from training.distributed import launch

        return launch(recipe, config, out_dir, progress)
    run = _Trainer(recipe, config, out_dir)
    bar = ProgressBar(f"train {recipe.name}", config.steps, run.step, progress)
    try:
        loss_value, stopped_early, final = run.run(bar)
    finally:
        bar.close()
    weights_path = run.save_weights(out_dir / WEIGHTS_FILE)
    return run.result(loss_value, stopped_early, final, weights_path)
