"""DDP scaling: samples/s, time-to-loss and the communication share of a step, 1 process against N.

    .venv/bin/python benchmarks/ddp_scaling.py                          # 1 vs 2 processes on this machine
    .venv/bin/python benchmarks/ddp_scaling.py --processes 1,2,4 --steps 400 --width 256

Across machines: run the same command on every machine, each with its own --node-rank, all naming node 0's
address; node 0 prints the figures (its processes hold rank 0):

    .venv/bin/python benchmarks/ddp_scaling.py --nnodes 2 --node-rank 0 --rdzv-endpoint 10.0.0.1:29500 \\
        --nproc-per-node 8 --device cuda
    .venv/bin/python benchmarks/ddp_scaling.py --nnodes 2 --node-rank 1 --rdzv-endpoint 10.0.0.1:29500 \\
        --nproc-per-node 8 --device cuda

Each configuration trains stdlib-gpt through `train()` with the same global batch (so the same loss curve: the
script checks it) and reports, from rank 0's result: samples/s of the training loop, the wall time including
torchrun's start, and the time to reach the validation bits/byte the 1-process run had at half its steps.
The communication share comes from a separate measurement under torchrun: the same model in DDP, steps with the
gradient all-reduce against steps without it (`no_sync`), alternated; share = 1 - without / with. A bare
all-reduce of the gradient's size is timed beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from recipes import build_recipe  # noqa: E402
from training.distributed import worker_environment  # noqa: E402
from training.loop import LossModule, TrainingConfig, micro_batches, pick_device, train  # noqa: E402

RESULT_PREFIX = "ddp-scaling "


def options(args) -> dict:
    return {
        "n_layer": args.layers,
        "n_embd": args.width,
        "n_head": max(1, args.width // 32),
        "block_size": args.context,
        "train_megabytes": 2.0,
        "validation_megabytes": 0.5,
    }


def config(args, processes: int, **overrides) -> TrainingConfig:
    return TrainingConfig(
        steps=args.steps,
        batch_size=args.batch,
        eval_every=max(1, args.steps // 8),
        eval_samples=256,
        checkpoint_every=args.steps,  # the checkpoints' cost is not what is measured
        warmup_steps=10,
        device=args.device,
        resume=False,
        nproc_per_node=processes,
        **overrides,
    )


def one_run(args, processes: int, work: Path, threads: int | None = None, **overrides) -> dict:
    """One training run; `threads` sets this process's torch threads for a 1-process run (it trains in here)."""
    recipe = build_recipe("stdlib-gpt", options(args))
    if threads:
        torch.set_num_threads(threads)
    started = time.perf_counter()
    folder = work / f"p{processes}-t{threads or 0}"
    result = train(recipe, config(args, processes, **overrides), folder, progress=False)
    wall = time.perf_counter() - started
    if result.output is None:  # a machine other than node 0
        return {}
    out = result.output
    return {
        "label": f"{out.processes} x {threads or worker_environment(config(args, processes))['OMP_NUM_THREADS']}",
        "processes": out.processes,
        "samples_per_s": out.steps * args.batch / result.seconds,
        "loop_s": result.seconds,
        "wall_s": wall,
        "final_loss": out.final_loss,
        "history": out.history,
    }


def time_to(history, target: float, overhead_s: float) -> float | None:
    """Seconds (training loop + torchrun start) to the first validation at or under `target` bits/byte."""
    for point in history:
        if point["bits_per_byte"] <= target * (1 + 1e-3):
            return point["elapsed_s"] + overhead_s
    return None


# --- the communication share, measured under torchrun ------------------------------------------------------------
def measure_communication(args) -> None:
    """Run by every process under torchrun: timed DDP steps with and without the all-reduce."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    device = pick_device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    recipe = build_recipe("stdlib-gpt", options(args))
    torch.manual_seed(0)
    model = recipe.build_model().to(device)
    module = DistributedDataParallel(
        LossModule(recipe, model), device_ids=[device.index] if device.type == "cuda" else None
    )
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-3)
    inputs, targets = next(recipe.train_batches(args.batch, torch.Generator().manual_seed(0)))
    (piece, piece_targets, _), *_ = micro_batches(inputs, targets, rank, world, 1)
    piece, piece_targets = tuple(t.to(device) for t in piece), piece_targets.to(device)

    def step(synchronized: bool) -> float:
        started = time.perf_counter()
        with nullcontext() if synchronized else module.no_sync():
            module(piece, piece_targets).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dist.barrier()  # both kinds of step end together, so neither carries the other's waiting
        return time.perf_counter() - started

    for _ in range(5):
        step(True), step(False)
    with_sync, without_sync = [], []
    for _ in range(args.comm_steps):  # alternated, so drifting machine load falls on both alike
        with_sync.append(step(True))
        without_sync.append(step(False))
    gradient = torch.zeros(sum(p.numel() for p in model.parameters()), device=device)
    reduce_s = []
    for _ in range(args.comm_steps):
        started = time.perf_counter()
        dist.all_reduce(gradient)
        if device.type == "cuda":
            torch.cuda.synchronize()
        reduce_s.append(time.perf_counter() - started)
    if rank == 0:
        synced, unsynced = statistics.median(with_sync), statistics.median(without_sync)
        figures = {
            "processes": world,
            "step_ms": synced * 1e3,
            "step_without_allreduce_ms": unsynced * 1e3,
            "communication_share": max(0.0, 1 - unsynced / synced),
            "gradient_mb": gradient.numel() * 4 / 1e6,
            "bare_allreduce_ms": statistics.median(reduce_s) * 1e3,
        }
        print(RESULT_PREFIX + json.dumps(figures), flush=True)
    dist.destroy_process_group()


def communication(args, processes: int) -> dict:
    """The communication measurement on `processes` processes of this machine (or every machine's, when --nnodes)."""
    if args.nnodes > 1:
        rendezvous = ["--nnodes", str(args.nnodes), "--node-rank", str(args.node_rank)]
        rendezvous += ["--rdzv-backend", "static", "--rdzv-endpoint", args.rdzv_endpoint]
    else:
        rendezvous = ["--standalone"]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes), *rendezvous]
    command += [__file__, "--measure-communication", *sys.argv[1:]]
    environment = worker_environment(TrainingConfig(nproc_per_node=processes))
    done = subprocess.run(command, capture_output=True, text=True, env=environment)
    if done.returncode:
        raise SystemExit(f"the communication measurement failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    return json.loads(lines[0][len(RESULT_PREFIX) :]) if lines else {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", default="1,2", help="process counts on this machine, compared with the first")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=32, help="the global batch, the same for every process count")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--comm-steps", type=int, default=30, help="timed steps of each kind for the share")
    parser.add_argument("--nnodes", type=int, default=1)
    parser.add_argument("--node-rank", type=int, default=0)
    parser.add_argument("--rdzv-endpoint", default=None)
    parser.add_argument("--nproc-per-node", type=int, default=None, help="with --nnodes: processes per machine")
    parser.add_argument("--measure-communication", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure_communication:
        return measure_communication(args)
    work = Path(tempfile.mkdtemp(prefix="tes-ddp-scaling-"))
    cores = len(os.sched_getaffinity(0))
    print(f"stdlib-gpt {options(args)}, global batch {args.batch}, {args.steps} steps, {cores} cores, work in {work}")
    print(f"load average (1, 5, 15 min) at the start: {os.getloadavg()}")
    if args.nnodes > 1:
        return across_machines(args, work)
    counts = [int(count) for count in args.processes.split(",")]
    runs, shares = {}, {}
    for count in counts:
        # one process trains in this one: with every core's threads, and with one thread as each of N processes has
        for threads in (cores, 1) if count == 1 else (None,):
            runs[(count, threads)] = one_run(args, count, work, threads)
        shares[count] = communication(args, count) if count > 1 else {}
    report(args, runs, shares)
    print(f"load average (1, 5, 15 min) at the end: {os.getloadavg()}")


def across_machines(args, work: Path) -> None:
    per_node = args.nproc_per_node or 1
    run = one_run(args, per_node, work, nnodes=args.nnodes, node_rank=args.node_rank, rdzv_endpoint=args.rdzv_endpoint)
    share = communication(args, per_node)
    if run:
        report(args, {(run["processes"], None): run}, {run["processes"]: share})


def report(args, runs: dict[tuple[int, int | None], dict], shares: dict[int, dict]) -> None:
    """One row per run (processes x threads each), against the first."""
    base = next(iter(runs.values()))
    middle = base["history"][len(base["history"]) // 2 - 1]
    target = middle["bits_per_byte"]
    print(f"target: {target:.4f} bits/byte (the {base['label']} run at step {int(middle['step'])})")
    print(
        "proc x threads  samples/s  speed-up  loop s  wall s  time-to-loss s  final loss  comm share  step ms (no sync)"
    )
    for (count, _), run in runs.items():
        overhead = run["wall_s"] - run["loop_s"]
        reached = time_to(run["history"], target, overhead)
        share = shares.get(count) or {}
        speed_up = run["samples_per_s"] / base["samples_per_s"]
        print(
            f"{run['label']:>14}  {run['samples_per_s']:>9.1f}  {speed_up:>7.2f}x"
            f"  {run['loop_s']:>6.1f}  {run['wall_s']:>6.1f}  {reached if reached is None else f'{reached:.1f}':>14}"
            f"  {run['final_loss']:>10.4f}  {share.get('communication_share', 0.0):>10.1%}"
            + (f"  {share['step_ms']:.1f} ({share['step_without_allreduce_ms']:.1f})" if share else "")
        )
        if share:
            print(
                f"                all-reduce of the {share['gradient_mb']:.2f} MB gradient alone: "
                f"{share['bare_allreduce_ms']:.2f} ms"
            )
        drift = abs(run["final_loss"] - base["final_loss"]) / abs(base["final_loss"])
        print(f"                final loss differs from the {base['label']} run's by {drift:.1e} (relative)")


if __name__ == "__main__":
    main()
