"""Training across processes and machines: `train()` hands a run with more than one process to torchrun.

The calling process writes the job (recipe reference, its options, the training config) to
`<out_dir>/distributed/job.json`, starts this module as a child process, streams its progress, and reads rank 0's
result back. This module, run as a program, is torchrun for one machine (torch's own `torch.distributed.run`,
called in-process so that a failure comes back as data: which rank, its exit code or signal, its last error):

    python -m training.distributed runs/x/train/distributed/job.json                 # what train() starts
    python -m training.distributed job.json --node-rank 1                            # another machine's share

The equivalent plain command is logged when a run starts, for example
`python -m torch.distributed.run --standalone --nproc-per-node 2 --max-restarts 2 -m training.worker job.json`.
Each process runs `training.worker`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections import deque
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict

from core.errors import TrainingError
from core.files import atomic_write_json
from core.results import CHECKPOINT_FILE, StageResult
from recipes import BUILTIN_RECIPES, Recipe
from training.loop import ProgressBar, TrainingConfig, TrainOutput, _load_checkpoint

log = logging.getLogger(__name__)

JOB_FOLDER = "distributed"  # inside the training stage's folder
JOB_FILE, RESULT_FILE, FAILURE_FILE = "job.json", "result.json", "failure.json"
RANKS_FOLDER = "ranks"  # rank-<n>.json: each process's pid, attempt and last checkpointed step
PROGRESS_PREFIX, LINE_PREFIX = "tes-progress ", "tes-line "  # what rank 0 prints for the calling process to show
_STOP_GRACE_S = 30.0


class Job(BaseModel):
    """Everything a training process needs to rebuild the run: the recipe by reference, its options, the config."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    recipe: str
    options: dict[str, Any]
    training: TrainingConfig
    out_dir: str
    launch_id: str  # fresh for every launch: restarted processes resume only from checkpoints of this launch


def job_folder(out_dir: str | Path) -> Path:
    return Path(out_dir) / JOB_FOLDER


def recipe_reference(recipe: Recipe) -> str:
    """The reference `recipes.build_recipe` rebuilds `recipe` from in another process."""
    cls = type(recipe)
    if BUILTIN_RECIPES.get(recipe.name) is cls:
        return recipe.name
    if cls.__module__ == "__main__" or "<locals>" in cls.__qualname__:
        raise TrainingError(
            f"recipe {cls.__qualname__!r} is defined in {cls.__module__!r}, which torchrun's processes cannot "
            "import; move it into a module on PYTHONPATH and name it as 'package.module:Class'"
        )
    return f"{cls.__module__}:{cls.__qualname__}"


def torchrun_args(job_path: str | Path, config: TrainingConfig) -> list[str]:
    """torchrun's arguments for this machine's share of the job: one machine meets on a free local port
    (`--standalone`); several meet at node 0's `rdzv_endpoint`, where `node_rank` fixes which ranks each holds."""
    args = ["--nproc-per-node", str(config.nproc_per_node), "--max-restarts", str(config.max_restarts)]
    if config.nnodes == 1 and config.rdzv_endpoint is None:
        args.append("--standalone")
    else:
        args += ["--nnodes", str(config.nnodes), "--node-rank", str(config.node_rank)]
        args += ["--rdzv-backend", "static", "--rdzv-endpoint", str(config.rdzv_endpoint)]
    return [*args, "-m", "training.worker", str(job_path)]


def torchrun_command(job_path: str | Path, config: TrainingConfig) -> list[str]:
    """The plain torchrun command line that does what `python -m training.distributed job.json` does."""
    return [sys.executable, "-m", "torch.distributed.run", *torchrun_args(job_path, config)]


def worker_environment(config: TrainingConfig, base: dict[str, str] | None = None) -> dict[str, str]:
    """The processes' environment: this one's, with the CPU cores split between the processes (unless
    OMP_NUM_THREADS is set already; torchrun alone would give each process one thread) and output unbuffered so
    progress streams."""
    env = dict(os.environ if base is None else base)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    env.setdefault("OMP_NUM_THREADS", str(max(1, cores // config.nproc_per_node)))
    env["PYTHONUNBUFFERED"] = "1"
    return env


# --- the calling process ----------------------------------------------------------------------------------------
def launch(recipe: Recipe, config: TrainingConfig, out_dir: Path, progress: bool = True) -> StageResult[TrainOutput]:
    """Train under torchrun; returns rank 0's result (on node_rank > 0: a skipped result, the weights are on
    node 0). Raises TrainingError naming the failed rank and its last error when restarts are exhausted."""
    folder = job_folder(out_dir)
    checkpoint = out_dir / CHECKPOINT_FILE
    if config.resume and config.node_rank == 0 and checkpoint.exists():
        _load_checkpoint(checkpoint, recipe, mmap=True)  # refuse another recipe's checkpoint before starting anything
    job = Job(
        recipe=recipe_reference(recipe),
        options=recipe.options.model_dump(mode="json"),
        training=config,
        out_dir=str(out_dir),
        launch_id=uuid.uuid4().hex,
    )
    job_path = atomic_write_json(folder / JOB_FILE, job.model_dump(mode="json"))
    for stale in (folder / RESULT_FILE, folder / FAILURE_FILE, *(folder / RANKS_FOLDER).glob("rank-*.json")):
        stale.unlink(missing_ok=True)
    log.info(
        "training %s on %d process(es) (%d per machine, %d machine(s)) under torchrun: %s",
        recipe.name,
        config.world_size,
        config.nproc_per_node,
        config.nnodes,
        shlex.join(torchrun_command(job_path, config)),
    )
    bar = ProgressBar(f"train {recipe.name} x{config.world_size}", config.steps, 0, progress)
    try:
        command = [sys.executable, "-m", "training.distributed", str(job_path), "--parent-pid", str(os.getpid())]
        code, tail = _stream(command, config, bar)
    finally:
        bar.close()
    result_path = folder / RESULT_FILE
    if code == 0 and result_path.is_file():
        return StageResult[TrainOutput].model_validate_json(result_path.read_text(encoding="utf-8"))
    if code == 0 and config.node_rank > 0:
        return StageResult.skipped(
            "train",
            f"node_rank {config.node_rank} of {config.nnodes} trained its share; rank 0 on node 0 wrote the "
            "checkpoint and the weights",
        )
    raise TrainingError(failure_message(folder, config, code, tail))


def _stream(command: list[str], config: TrainingConfig, bar: ProgressBar) -> tuple[int, str]:
    """Run `command`, showing rank 0's progress lines on `bar` and logging the rest; (exit code, last output).
    The child and every process under it are stopped if this process is interrupted."""
    tail: deque[str] = deque(maxlen=40)
    child = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        errors="replace",
        bufsize=1,
        env=worker_environment(config),
        start_new_session=True,  # its own process group: stopped as one below
    )
    try:
        for raw in child.stdout:
            line = raw.rstrip("\n")
            update = _progress_update(line)
            if update is not None and update.get("start"):
                bar.start(update["step"])
            elif update is not None:
                bar.advance(update["step"], update.get("loss"))
            elif line.startswith(LINE_PREFIX):
                bar.line(line[len(LINE_PREFIX) :])
            elif line.strip():
                tail.append(line)
                log.info("[torchrun] %s", line)
        return child.wait(), "\n".join(tail)
    finally:
        _stop(child)


def _progress_update(line: str) -> dict | None:
    if not line.startswith(PROGRESS_PREFIX):
        return None
    try:
        return json.loads(line[len(PROGRESS_PREFIX) :])
    except json.JSONDecodeError:  # interleaved with another process's output: show it as it came
        return None


def _stop(child: subprocess.Popen) -> None:
    """SIGTERM to the child's process group (torchrun passes it to its processes), SIGKILL after a grace period."""
    if child.poll() is None:
        for sig, wait_s in ((signal.SIGTERM, _STOP_GRACE_S), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(child.pid, sig)
            except ProcessLookupError:
                break
            try:
                child.wait(timeout=wait_s)
                break
            except subprocess.TimeoutExpired:
                continue
    if child.stdout:
        child.stdout.close()


def failure_message(folder: Path, config: TrainingConfig, code: int, tail: str) -> str:
    failures = json.loads((folder / FAILURE_FILE).read_text()) if (folder / FAILURE_FILE).is_file() else []
    if not failures:
        return f"torchrun exited with code {code} before any training process failed; its last output:\n{tail}"
    first = failures[0]  # the root cause: the first to fail; the others were usually stopped because of it
    how = (
        f"was killed by signal {first['signal']}" if first["exitcode"] < 0 else f"exited with code {first['exitcode']}"
    )
    others = ", ".join(f"rank {f['rank']} ({f['signal'] or 'exit code %d' % f['exitcode']})" for f in failures[1:])
    saved = _last_checkpoint_step(folder)
    return (
        f"training failed: rank {first['rank']} (local rank {first['local_rank']} on {first['host']}, "
        f"pid {first['pid']}) {how}, and torchrun had no restarts left (training.max_restarts="
        f"{config.max_restarts}). Its last error: {first['error']}"
        + (f". Then stopped: {others}" if others else "")
        + (
            f". The last checkpoint (step {saved}) is in {folder.parent}: run again to resume from it"
            if saved
            else ". No checkpoint was written"
        )
        + f"; tracebacks are in {folder / FAILURE_FILE}"
    )


def _last_checkpoint_step(folder: Path) -> int:
    status = folder / RANKS_FOLDER / "rank-0.json"
    return json.loads(status.read_text()).get("checkpoint_step", 0) if status.is_file() else 0


# --- the child: torchrun for this machine ----------------------------------------------------------------------
def run_node(job_path: Path, node_rank: int | None = None) -> int:
    """torchrun (torch.distributed.run) in this process for this machine's share of the job. On failure, writes
    `failure.json`: every failed rank, root cause first, with its exit code, signal and last error."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    job = Job.model_validate_json(job_path.read_text(encoding="utf-8"))
    config = job.training if node_rank is None else job.training.model_copy(update={"node_rank": node_rank})
    if config.node_rank >= config.nnodes:
        raise TrainingError(f"--node-rank {config.node_rank} is not below nnodes ({config.nnodes})")
    os.environ.update(worker_environment(config))
    try:
        torchrun.run(torchrun.parse_args(torchrun_args(job_path, config)))
    except ChildFailedError as error:
        root, _ = error.get_first_failure()
        ranks = [root, *sorted(rank for rank in error.failures if rank != root)]
        failures = [_describe(rank, error.failures[rank]) for rank in ranks]
        atomic_write_json(job_folder(job.out_dir) / FAILURE_FILE, failures)
        return 1
    return 0


def _describe(rank: int, failure) -> dict[str, Any]:
    """A torchrun ProcessFailure as data; the error is what the process recorded (`training.worker` records its
    exception), else how it died."""
    message = failure.message
    traceback = ""
    if isinstance(message, dict):
        traceback = message.get("extraInfo", {}).get("py_callstack", "")
        message = message.get("message", "")
    signal_name = failure.signal_name() if failure.exitcode < 0 else ""
    if failure.exitcode < 0:
        cause = "the kernel's out-of-memory killer or a kill -9" if signal_name == "SIGKILL" else "outside"
        message = f"killed by {signal_name}, not by a Python error: it was stopped by {cause}"
    return {
        "rank": rank,
        "local_rank": failure.local_rank,
        "host": socket.gethostname(),
        "pid": failure.pid,
        "exitcode": failure.exitcode,
        "signal": signal_name,
        "error": str(message).strip() or f"exit code {failure.exitcode}",
        "traceback": traceback,
        "time": failure.timestamp or int(time.time()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.distributed", description=__doc__.splitlines()[0])
    parser.add_argument("job", type=Path, help="the job.json that train() wrote (copy it to the other machines)")
    parser.add_argument("--node-rank", type=int, default=None, help="this machine's index (default: the job's)")
    parser.add_argument("--parent-pid", type=int, default=None, help="stop when this process dies (train() sets it)")
    args = parser.parse_args(argv)
    if args.parent_pid is not None:
        _stop_with_parent(args.parent_pid)
    torch.set_num_threads(1)  # this process only supervises
    return run_node(args.job, args.node_rank)


def _stop_with_parent(parent_pid: int) -> None:
    """SIGTERM to this process when the one that started it dies, even by SIGKILL (a Prefect worker killed hard), so
    that torchrun stops its processes instead of leaving them behind. Linux only (prctl PR_SET_PDEATHSIG)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
    if os.getppid() != parent_pid:  # it died before the line above
        os.kill(os.getpid(), signal.SIGTERM)


if __name__ == "__main__":
    sys.exit(main())
