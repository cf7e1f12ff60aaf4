"""One training process under torchrun: rank `RANK` of `WORLD_SIZE`, running the same loop as one process does
(`training.loop`), with the model wrapped in DDP (or sharded with FSDP2) and its own rows of every global batch.

    python -m torch.distributed.run --standalone --nproc-per-node 2 -m training.worker runs/x/train/distributed/job.json

`train()` starts it through `training.distributed`; the job file holds the recipe reference, its options and the
training config. Rank 0 alone writes the checkpoints, the weights and `result.json`; every rank resumes from
rank 0's checkpoint, whose tensors rank 0 reads and broadcasts (the other machines need no copy of it).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record

from core.files import atomic_write_json
from core.results import WEIGHTS_FILE
from recipes import Recipe, build_recipe
from recipes.evaluation import torch_predictor
from training.distributed import LINE_PREFIX, PROGRESS_PREFIX, RANKS_FOLDER, RESULT_FILE, Job, job_folder
from training.loop import Progress, TrainingConfig, _load_checkpoint, _Trainer, pick_device

_MODEL_PREFIX = "model."  # the model's place inside the wrapped loss module


class _ProgressLines(Progress):
    """Rank 0's progress as lines on stdout, for the calling process to show (at most about one a second)."""

    def __init__(self, steps: int):
        self.steps, self.last_sent = steps, 0.0

    def start(self, step: int) -> None:
        _say(PROGRESS_PREFIX + json.dumps({"step": step, "start": True}))
        self.last_sent = time.monotonic()

    def advance(self, step: int, loss: float | None) -> None:
        now = time.monotonic()
        if loss is not None or step == self.steps or now - self.last_sent >= 1.0:
            _say(PROGRESS_PREFIX + json.dumps({"step": step, "loss": loss}))
            self.last_sent = now

    def line(self, text: str) -> None:
        _say(LINE_PREFIX + text)


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")  # one write: a line shorter than the pipe buffer is never split by another rank's
    sys.stdout.flush()


class _DistributedTrainer(_Trainer):
    """`_Trainer` as one of torchrun's processes."""

    def __init__(self, recipe: Recipe, config: TrainingConfig, out_dir: Path, launch_id: str):
        self.launch_id = launch_id
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        self.sharded = config.strategy == "fsdp"
        self.status_path = job_folder(out_dir) / RANKS_FOLDER / f"rank-{self.rank}.json"
        self.checkpoints_saved = 0
        super().__init__(recipe, config, out_dir)
        if self.rank:  # dropout and the like draw differently on each process
            torch.manual_seed(config.seed + 1_000_003 * self.rank + self.step)
        self.resumed_from = self.step
        self.write_status(checkpoint_step=self.step)

    # --- placement and wrapping ----------------------------------------------------------------------------------
    def _pick_device(self) -> torch.device:
        device = pick_device(self.config.device)
        if device.type == "cuda":
            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
        return device

    def _parallel(self, module: torch.nn.Module) -> torch.nn.Module:
        if self.sharded:
            return _fully_shard(module)
        from torch.nn.parallel import DistributedDataParallel

        # DDP copies rank 0's parameters to every rank here, and averages gradients in backward
        return DistributedDataParallel(module, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def _accumulating(self, active: bool) -> AbstractContextManager:
        if not active:
            return nullcontext()
        return _no_gradient_sync(self.loss_module) if self.sharded else self.loss_module.no_sync()

    # --- checkpoints: rank 0 reads and writes, every rank resumes --------------------------------------------------
    def _read_checkpoint(self) -> dict | None:
        """Rank 0's choice for every rank: the folder's checkpoint when resuming, and after a restart the one this
        launch wrote (even with resume=false, which only refuses what was there before the launch)."""
        state = None
        if self.is_main and self.checkpoint_path.exists():
            state = _load_checkpoint(self.checkpoint_path, self.recipe)
            if not (self.config.resume or (self.restarts and state.get("launch_id") == self.launch_id)):
                state = None
        # the small fields travel as one object; DDP's tensors too, FSDP's are broadcast tensor by tensor in _restore
        travelling = None if state is None else state if not self.sharded else _without_tensors(state)
        box = [travelling]
        dist.broadcast_object_list(box, src=0)
        if box[0] is None:
            return None
        if self.sharded:
            return {**box[0], **({k: state[k] for k in ("model", "optimizer")} if self.is_main else {})}
        return box[0]

    def _restore(self, state: dict) -> None:
        if not self.sharded:
            return super()._restore(state)
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        options = _full_state_options(broadcast=True)
        model = {_MODEL_PREFIX + k: v for k, v in state.get("model", {}).items()}
        set_model_state_dict(self.loss_module, model, options=options)
        optimizer = _by_name(state.get("optimizer", {}), self._parameter_names())
        set_optimizer_state_dict(self.loss_module, self.optimizer, optimizer, options=options)
        torch.set_rng_state(state["torch_rng"])
        self.step, self.elapsed, self.history = state["step"], state["elapsed_s"], state["history"]

    def _full_model_state(self) -> dict[str, torch.Tensor]:
        if not self.sharded:
            return super()._full_model_state()
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        state = get_model_state_dict(self.loss_module, options=_full_state_options())  # {} on ranks but 0
        return {k.removeprefix(_MODEL_PREFIX): v for k, v in state.items()}

    def _full_optimizer_state(self) -> dict[str, Any]:
        if not self.sharded:
            return super()._full_optimizer_state()
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        state = get_optimizer_state_dict(self.loss_module, self.optimizer, options=_full_state_options())
        return _by_index(state, self._parameter_names()) if self.is_main else {}

    def _parameter_names(self) -> list[str]:
        """Parameter names in `optimizer.state_dict()`'s index order, so a sharded run's checkpoint has the same
        layout as a one-process run's and either resumes the other."""
        return [name for name, _ in self.loss_module.named_parameters()]

    def checkpoint(self) -> None:
        super().checkpoint()
        if self.is_main:
            self.checkpoints_saved += 1
        self.write_status(checkpoint_step=self.step)

    def write_status(self, **fields: Any) -> None:
        """This process's `rank-<n>.json`: who it is and how far its run's checkpoints got."""
        atomic_write_json(
            self.status_path,
            {
                "rank": self.rank,
                "local_rank": self.local_rank,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "attempt": self.restarts,
                "resumed_from": self.resumed_from,
                "checkpoints_saved": self.checkpoints_saved,
                **fields,
            },
        )

    # --- collectives -----------------------------------------------------------------------------------------------
    def mean(self, value: torch.Tensor) -> torch.Tensor:
        value = value.detach().clone()
        dist.all_reduce(value)
        return value / self.world_size

    def agree(self, flag: bool) -> bool:
        decided = torch.tensor([int(flag)], device=self.device)
        dist.broadcast(decided, src=0)
        return bool(decided.item())

    def synchronize(self) -> None:
        dist.barrier()

    @property
    def evaluates(self) -> bool:
        return self.is_main or self.sharded  # a sharded model's forward needs every rank

    def _predictor(self):
        if not self.sharded:
            return super()._predictor()
        return torch_predictor(lambda *tensors: self.loss_module(tensors), self.recipe, self.device)


def _fully_shard(module: torch.nn.Module) -> torch.nn.Module:
    """FSDP2: each layer of every ModuleList (a transformer's blocks) is its own shard group, gathered just for its
    forward and backward; the rest of the model is the root group."""
    from torch.distributed.fsdp import fully_shard

    for child in list(module.modules()):
        if isinstance(child, torch.nn.ModuleList):
            for layer in child:
                fully_shard(layer)
    return fully_shard(module)


@contextmanager
def _no_gradient_sync(module) -> Iterator[None]:
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)


def _full_state_options(broadcast: bool = False):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    if broadcast:  # rank 0 holds the full state; the others pass {} and receive their shards
        return StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    return StateDictOptions(full_state_dict=True, cpu_offload=True)  # gathered on rank 0 only, in CPU memory


def _without_tensors(state: dict) -> dict:
    return {k: v for k, v in state.items() if k not in ("model", "optimizer")}


def _by_index(state: dict, names: list[str]) -> dict:
    """A name-keyed optimizer state (torch.distributed.checkpoint's) as `optimizer.state_dict()` keys it."""
    index = {name: i for i, name in enumerate(names)}
    return {
        "state": {index[name]: value for name, value in state.get("state", {}).items()},
        "param_groups": [{**g, "params": [index[name] for name in g["params"]]} for g in state.get("param_groups", [])],
    }


def _by_name(state: dict, names: list[str]) -> dict:
    """The inverse of `_by_index`; {} stays {} (the ranks that receive the state)."""
    if not state:
        return {}
    return {
        "state": {names[i]: value for i, value in state["state"].items()},
        "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]],
    }


def _join_process_group(backend: str) -> None:
    """`init_process_group` on torchrun's store, under a prefix of its own for each restart. torchrun keeps one
    store across restarts, and without the prefix a restarted process can read the addresses its peers published
    in the attempt before and fail connecting to them (seen with gloo: "connectFullMesh failed ... Connection
    refused"; pytorch/pytorch#167288 looks like the same with NCCL)."""
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    agent_hosts_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world_size,
        is_master=not agent_hosts_store and rank == 0,
        timeout=dist.default_pg_timeout,
        multi_tenant=not agent_hosts_store,
    )
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    device = None
    if backend == "nccl":  # bind this process to its GPU before NCCL sets up its communicators
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend,
        store=dist.PrefixStore(f"tes/attempt-{attempt}", store),
        rank=rank,
        world_size=world_size,
        device_id=device,
    )


@record  # a failure's exception lands in torchrun's error file: the calling process reports it with the rank
def main(argv: list[str] | None = None) -> None:
    job_path = Path((argv or sys.argv[1:])[0])
    job = Job.model_validate_json(job_path.read_text(encoding="utf-8"))
    recipe, config, out_dir = build_recipe(job.recipe, job.options), job.training, Path(job.out_dir)
    _join_process_group("nccl" if pick_device(config.device).type == "cuda" else "gloo")
    try:
        run = _DistributedTrainer(recipe, config, out_dir, job.launch_id)
        progress = _ProgressLines(config.steps) if run.is_main else Progress()
        progress.start(run.step)
        loss_value, stopped_early, final = run.run(progress)
        weights = run.save_weights(out_dir / WEIGHTS_FILE)
        if run.is_main:
            result = run.result(loss_value, stopped_early, final, weights)
            atomic_write_json(job_folder(out_dir) / RESULT_FILE, result.to_dict())
        run.write_status(checkpoint_step=run.step, finished=True)
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
