"""Model scaling: one decoder family (stdlib-gpt, random weights) at about 1 M, 10 M, 100 M and 1 B parameters,
through export, int8-dynamic, openvino-int8, deploy and served requests; each stage's wall time and peak memory.

    .venv/bin/python benchmarks/model_scaling.py --sizes 1m,10m                  # a few minutes
    .venv/bin/python benchmarks/model_scaling.py --sizes 1b --json 1b.json       # 4 GB in FP32: external data
    .venv/bin/python benchmarks/model_scaling.py --json scaling.json --plot scaling.png   # every size

1 B parameters is 4 GB in FP32, past the 2 GB a protobuf file can hold: the export writes `model.onnx` beside
`model.onnx.data`, the variants their own `<variant>.onnx.data`, and the repository writer copies and checksums every
data file into the version folders, which the served model verifies before it loads them.

Each size runs in a child process of its own, so that its peak memory is its own. Per size, in order:

1. build: the model with random weights (speed does not depend on them); context 64 bytes for every size.
2. export: torch.onnx.export (dynamo), the ONNX checker, verification against torch on held-out windows.
3. int8-dynamic and openvino-int8 (static QDQ with symmetric activations, run by OpenVINO): the precision stage's own
   builders. With random weights the recipe's accuracy means nothing, so a variant is accepted when its next-byte
   choice agrees with FP32's on at least 90% of held-out windows and its logits are within 10% of FP32's (relative
   L2); the pipeline's accuracy gate is for trained models.
4. timing: samples/s at batch 8 on the same held-out windows, round-robin in blocks (the first call of a block not
   counted): torch eager FP32, torch.compile FP32, ONNX Runtime FP32 and OpenVINO with its defaults (the peers), and
   each variant with each of its runtime settings (the fastest kept, as the precision stage does). Below 1 GiB of
   FP32 weights everything takes turns in one round-robin. Above, in three groups, each freed before the next loads
   the weights again: the torch peers (right after the export), the two FP32 ONNX peers, then the variants (built
   after the FP32 groups are freed, with their runtime's default settings only).
5. deploy: FP32 and both variants written to a private Triton's repository and loaded.
6. served: one request per variant (compared with in-process), then p50 at batch 1 over a few requests (gRPC).

Peak memory is this process's peak resident set during each stage (Linux's VmHWM, reset before each stage through
`/proc/self/clear_refs`) and, for deploy and served, the Triton server's process tree, sampled every 0.1 s.
Goal: from 10 M parameters up, the best accepted variant is at least 2.5x the best peer in samples/s.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.files import model_companions  # noqa: E402
from core.runtimes import open_session, runtime_of, settings_candidates  # noqa: E402
from export import dynamic_quant, quantize  # noqa: E402
from export.onnx_export import ExportConfig, export_onnx  # noqa: E402
from recipes import build_recipe  # noqa: E402
from serving import client, triton  # noqa: E402
from serving.deploy import Deployable, deploy  # noqa: E402
from serving.repository import ServingConfig  # noqa: E402

CONTEXT, BATCH = 64, 8
# name -> (stdlib-gpt options, timed rounds, timed calls per runner and round, retries of a block with a busy
# neighbour, served requests for the p50); a 1 B block takes about a minute, so it is retried less
SIZES: dict[str, tuple[dict, int, int, int, int]] = {
    "1m": ({"n_layer": 4, "n_embd": 144, "n_head": 4}, 3, 8, 10, 30),
    "10m": ({"n_layer": 6, "n_embd": 384, "n_head": 6}, 3, 6, 10, 30),
    "100m": ({"n_layer": 14, "n_embd": 768, "n_head": 12}, 3, 3, 6, 10),
    "1b": ({"n_layer": 20, "n_embd": 2048, "n_head": 16}, 2, 2, 2, 5),
}
VARIANTS = ("int8-dynamic", "openvino-int8")
PEERS = ("torch eager fp32", "torch.compile fp32", "onnxruntime fp32", "openvino defaults")
INTERLEAVE_BELOW_BYTES = 2**30  # FP32 weights; above, the torch peers are timed and freed before the variants
MIN_AGREEMENT, MAX_RELATIVE_ERROR = 0.9, 0.1
GOAL, GOAL_FROM_PARAMETERS = 2.5, 9e6
PLOTTED_STAGES = ("export", "int8-dynamic", "openvino-int8", "deploy", "served")


# --- measuring ----------------------------------------------------------------------------------------------------
def _peak_rss_mb() -> float:
    with open("/proc/self/status", encoding="ascii") as status:
        return next(int(line.split()[1]) / 1024 for line in status if line.startswith("VmHWM:"))


def _reset_peak() -> float:
    """Reset the peak to the current resident set (Linux 4.0+), which it returns, in MB."""
    with open("/proc/self/clear_refs", "w", encoding="ascii") as clear:
        clear.write("5")
    return _peak_rss_mb()


class _TreeSampler:
    """The largest resident set of a process and its children, sampled every 0.1 s in a thread."""

    def __init__(self, pid: int):
        self.process, self.peak_mb, self._stop = psutil.Process(pid), 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        self._sample()
        while not self._stop.wait(0.1):
            self._sample()

    def _sample(self) -> None:
        with contextlib.suppress(psutil.Error):
            tree = [self.process, *self.process.children(recursive=True)]
            self.peak_mb = max(self.peak_mb, sum(p.memory_info().rss for p in tree) / 2**20)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        self._sample()
        return self.peak_mb


class Stages:
    """Wall time and peak memory of each stage, in the order they ran."""

    def __init__(self) -> None:
        self.records: dict[str, dict[str, float]] = {}

    @contextlib.contextmanager
    def stage(self, name: str, server_pid: int | None = None) -> Iterator[None]:
        gc.collect()
        start_rss_mb = _reset_peak()
        sampler = _TreeSampler(server_pid) if server_pid else None
        start = time.perf_counter()
        print(f"  {name} ...", flush=True)
        try:
            yield
        finally:
            record = {
                "seconds": time.perf_counter() - start,
                "peak_rss_mb": _peak_rss_mb(),
                "start_rss_mb": start_rss_mb,  # what earlier stages left: the peak less this is the stage's own
            }
            if sampler:
                record["triton_peak_rss_mb"] = sampler.stop()
            self.records[name] = record
            extra = f", Triton {record['triton_peak_rss_mb']:.0f} MB" if sampler else ""
            print(f"  {name}: {record['seconds']:.1f} s, peak {record['peak_rss_mb']:.0f} MB{extra}", flush=True)


def _busy_seconds() -> tuple[float, float]:
    """(CPU seconds of the whole machine, of this process) so far; steal counts as busy (another VM had the core)."""
    machine, own = psutil.cpu_times(), psutil.Process().cpu_times()
    busy = machine.user + machine.nice + machine.system + machine.irq + machine.softirq + machine.steal
    return busy, own.user + own.system


def round_robin(
    runners: dict[str, Callable], feeds: dict, rounds: int, calls: int, max_foreign: float = 0.15, retries: int = 10
) -> tuple[dict[str, list[float]], dict[str, int]]:
    """Seconds per call of each runner, and how many of its blocks ran with a busy neighbour (retried, or kept
    when every retry was busy too: `rounds * (retries + 1)` means none was quiet). Runners take turns in blocks;
    before each block the process rests and the first call is not counted (the runtime that ran before may still
    spin-wait on the cores). A block during which other processes used more than `max_foreign` of a core is
    measured again (up to `retries` times): these machines are shared, and torch's OpenMP threads lose far more to
    a busy neighbour than ONNX Runtime's or OpenVINO's thread pools do, which would flatter the variants."""
    times: dict[str, list[float]] = {name: [] for name in runners}
    repeated = dict.fromkeys(runners, 0)
    for _ in range(rounds):
        for name, run in runners.items():
            for attempt in range(retries + 1):
                time.sleep(0.2 + 0.5 * attempt)
                run(feeds)
                block, (machine, own), start_wall = [], _busy_seconds(), time.perf_counter()
                for _ in range(calls):
                    start = time.perf_counter()
                    run(feeds)
                    block.append(time.perf_counter() - start)
                machine_after, own_after = _busy_seconds()
                foreign = ((machine_after - machine) - (own_after - own)) / (time.perf_counter() - start_wall)
                if foreign <= max_foreign:
                    break
                repeated[name] += 1  # the last attempt is kept anyway: counted, so the output can say so
            times[name] += block
    return times, repeated


# --- one size, in a child process ---------------------------------------------------------------------------------
def _torch_runners(model: torch.nn.Module, feeds: dict, warmups: dict) -> dict[str, Callable]:
    compiled = torch.compile(model)

    def runner(module):
        def run(inputs):
            with torch.inference_mode():
                return [module(torch.from_numpy(inputs["tokens"])).numpy()]

        return run

    runners = {"torch eager fp32": runner(model), "torch.compile fp32": runner(compiled)}
    for name, run in runners.items():  # torch.compile compiles on its first call
        start = time.perf_counter()
        run(feeds)
        warmups[name] = time.perf_counter() - start
    return runners


def _free_torch(runners: dict) -> dict:
    runners.clear()
    torch._dynamo.reset()  # the compiled graph holds the weights too
    gc.collect()
    return {}


def _fp32_runners(fp32_path: Path) -> dict[str, Callable]:
    """ONNX Runtime FP32, and OpenVINO as a user gets it (nothing set: bf16 where the CPU has it)."""
    import openvino as ov

    session = open_session(fp32_path)
    compiled = ov.Core().compile_model(str(fp32_path), "CPU")
    request = compiled.create_infer_request()
    return {
        "onnxruntime fp32": lambda feeds: session.run(None, feeds),
        "openvino defaults": lambda feeds: [np.array(request.infer(feeds)[compiled.outputs[0]])],
    }


def _variant_runners(paths: dict[str, Path], tune: bool) -> tuple[dict[str, Callable], dict[str, tuple]]:
    """Every variant with each of its runtime settings (only the first unless `tune`); runner name -> (variant,
    runtime, precision, settings)."""
    runners: dict[str, Callable] = {}
    candidates: dict[str, tuple] = {}
    for variant in VARIANTS:
        runtime, precision = runtime_of(variant)
        tried = settings_candidates(runtime, precision)
        for precision, settings in tried if tune else tried[:1]:
            name = f"{variant} ({runtime} {precision or ''} {settings.label()})".replace("  ", " ")
            session = open_session(paths[variant], runtime, precision, settings=settings)
            runners[name] = lambda feeds, s=session: s.run(None, feeds)
            candidates[name] = (variant, runtime, precision, settings)
    return runners, candidates


class _Timing:
    """Samples/s, outputs on the held-out windows and the batch-1 output of every runner, one group at a time."""

    def __init__(self, check: list[dict], rounds: int, calls: int, retries: int):
        self.check, self.single = check, {"tokens": check[0]["tokens"][:1]}
        self.rounds, self.calls, self.retries = rounds, calls, retries
        self.times: dict[str, list[float]] = {}
        self.repeated: dict[str, int] = {}
        self.outputs: dict[str, list[np.ndarray]] = {}
        self.expected: dict[str, np.ndarray] = {}

    def run(self, runners: dict[str, Callable]) -> None:
        for name, run in runners.items():
            self.outputs[name] = [run(inputs)[0] for inputs in self.check]
            self.expected[name] = run(self.single)[0]
        times, repeated = round_robin(runners, self.check[0], self.rounds, self.calls, retries=self.retries)
        self.times.update(times)
        self.repeated.update(repeated)

    def samples_per_s(self) -> dict[str, float]:
        return {name: BATCH / statistics.median(values) for name, values in self.times.items()}

    def quality(self) -> dict[str, dict[str, float]]:
        reference = self.outputs["onnxruntime fp32"]
        return {name: _agreement(outputs, reference) for name, outputs in self.outputs.items()}


def _agreement(outputs: list[np.ndarray], reference: list[np.ndarray]) -> dict[str, float]:
    got, want = np.concatenate(outputs).astype(np.float64), np.concatenate(reference).astype(np.float64)
    return {
        "top1_agreement": float((got.argmax(-1) == want.argmax(-1)).mean()),
        "relative_error": float(np.linalg.norm(got - want) / np.linalg.norm(want)),
    }


def _onnx_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in [path, *model_companions(path)])


def run_size(size: str, work: Path) -> dict:
    options, rounds, calls, retries, served_requests = SIZES[size]
    recipe = build_recipe("stdlib-gpt", {**options, "block_size": CONTEXT})
    stages, result = Stages(), {"size": size, "options": options, "context": CONTEXT, "batch": BATCH}
    with stages.stage("build"):
        torch.manual_seed(0)
        model = recipe.build_model().eval()
    parameters = sum(p.numel() for p in model.parameters())
    interleaved = 4 * parameters < INTERLEAVE_BELOW_BYTES
    result.update(parameters=parameters, fp32_weight_bytes=4 * parameters, interleaved=interleaved)
    print(f"{size}: {parameters / 1e6:.1f} M parameters, {4 * parameters / 1e9:.2f} GB in FP32", flush=True)
    check = [b.inputs for b in recipe.eval_batches(BATCH, max_samples=4 * BATCH if interleaved else BATCH)]
    timing, warmups = _Timing(check, rounds, calls, retries), {}

    with stages.stage("export"):
        config = ExportConfig(verify_batch_sizes=(1, 2), verify_samples=2)
        paths = {"fp32": Path(export_onnx(recipe, model, work, config).output.onnx)}
    with stages.stage("torch warm-up"):
        torch_runners = _torch_runners(model, check[0], warmups)
    del model  # the runners hold it
    if not interleaved:  # one group at a time, each freed before the next loads the weights again
        with stages.stage("timing torch"):
            timing.run(torch_runners)
        torch_runners = _free_torch(torch_runners)
        with stages.stage("timing fp32"):
            timing.run(_fp32_runners(paths["fp32"]))
    with stages.stage("int8-dynamic"):
        paths["int8-dynamic"] = dynamic_quant.build_int8_dynamic(paths["fp32"], work)
    with stages.stage("openvino-int8"):
        calibration = recipe.calibration_inputs(32 if interleaved else 8)
        paths["openvino-int8"] = quantize.build_int8_static(
            paths["fp32"], work, calibration, name="openvino-int8", symmetric_activations=True
        )
    result["onnx_bytes"] = {name: _onnx_bytes(path) for name, path in paths.items()}
    result["external_data"] = {name: [p.name for p in model_companions(path)] for name, path in paths.items()}
    with stages.stage("timing variants" if not interleaved else "timing"):
        runners, candidates = _variant_runners(paths, tune=interleaved)
        if interleaved:
            runners = {**torch_runners, **_fp32_runners(paths["fp32"]), **runners}
        timing.run(runners)
        del runners
        torch_runners = _free_torch(torch_runners)

    speed, quality = timing.samples_per_s(), timing.quality()
    best = _best_settings(candidates, speed, quality)
    result.update(
        samples_per_s=speed, quality=quality, torch_warmup_s=warmups, variants=best, blocks_repeated=timing.repeated
    )
    _goal(result, speed, best)
    expected = {variant: timing.expected[best[variant]["runner"]] for variant in VARIANTS}
    deployables = _deployables(paths, best, candidates)
    result["served"] = _deploy_and_serve(deployables, expected, timing.single, served_requests, stages, work)
    result["stages"] = stages.records
    return result


def _best_settings(candidates: dict, speed: dict, quality: dict) -> dict[str, dict]:
    """Per variant: its fastest setting among those accepted (agreement with FP32), else its fastest, rejected."""
    best: dict[str, dict] = {}
    for name, (variant, *_) in candidates.items():
        accepted = (
            quality[name]["top1_agreement"] >= MIN_AGREEMENT and quality[name]["relative_error"] <= MAX_RELATIVE_ERROR
        )
        entry = {"runner": name, "samples_per_s": speed[name], "accepted": accepted, **quality[name]}
        held = best.get(variant)
        if held is None or (accepted, speed[name]) > (held["accepted"], held["samples_per_s"]):
            best[variant] = entry
    return best


def _goal(result: dict, speed: dict, best: dict) -> None:
    """The goal's ratio (best accepted variant over the best peer), and the same over the FP32 peers alone: on a CPU
    with bf16 kernels, OpenVINO's defaults already run in bf16."""
    peer = max(PEERS, key=lambda name: speed.get(name, 0.0))
    fp32_peer = max(PEERS[:3], key=lambda name: speed.get(name, 0.0))
    accepted = [v for v in best.values() if v["accepted"]]
    top = max(accepted, key=lambda v: v["samples_per_s"]) if accepted else None
    ratio = top["samples_per_s"] / speed[peer] if top else 0.0
    result["goal"] = {
        "best_peer": peer,
        "best_variant": top["runner"] if top else None,
        "ratio": ratio,
        "best_fp32_peer": fp32_peer,
        "ratio_vs_fp32_peers": top["samples_per_s"] / speed[fp32_peer] if top else 0.0,
        "applies": result["parameters"] >= GOAL_FROM_PARAMETERS,
        "met": ratio >= GOAL,
    }


def _deployables(paths: dict[str, Path], best: dict, candidates: dict) -> list[Deployable]:
    """FP32, and each variant with the runtime settings that won, with every file each needs beside it."""
    deployables = [Deployable("fp32", str(paths["fp32"]), files=tuple(map(str, model_companions(paths["fp32"]))))]
    for variant in VARIANTS:
        _, runtime, precision, settings = candidates[best[variant]["runner"]]
        files = tuple(map(str, model_companions(paths[variant])))
        settings = settings.model_dump(exclude_defaults=True)
        deployables.append(Deployable(variant, str(paths[variant]), runtime, precision or "", settings, files))
    return deployables


def _deploy_and_serve(
    deployables: list[Deployable], expected: dict, single: dict, requests: int, stages: Stages, work: Path
) -> dict:
    """Deploy into a private Triton, then per variant: the first request (checked against `expected`, the
    in-process output) and the p50 of `requests` more, batch 1 over gRPC."""
    server = triton.start(work / "repository", work / "triton")
    try:
        with stages.stage("deploy", server.pid):
            serving = ServingConfig(max_batch_size=BATCH)
            deploy(server.repository, "scaling", deployables, "fp32", serving, {}, server.endpoint())
        served: dict[str, dict] = {}
        connection = client.connect(server.grpc_url, "grpc")

        def ask(variant: str) -> tuple[np.ndarray, float]:
            start = time.perf_counter()
            got = client.infer(server.grpc_url, f"scaling-{variant}", single, "grpc", client=connection)["logits"]
            return got, (time.perf_counter() - start) * 1e3

        with stages.stage("served", server.pid):
            for variant in VARIANTS:  # the first request a client sends after the load
                got, milliseconds = ask(variant)
                served[variant] = {
                    "first_request_ms": milliseconds,
                    "max_abs_diff_vs_in_process": float(np.abs(got - expected[variant]).max()),
                }
        for variant in VARIANTS:
            served[variant]["p50_ms_batch1"] = statistics.median(ask(variant)[1] for _ in range(requests))
        connection.close()
        return served
    finally:
        triton.stop(server.pid)


# --- the parent: every size, then the table and the plot ----------------------------------------------------------
def _table(results: list[dict]) -> str:
    lines = [
        "| size | parameters | ONNX FP32 | external data | export | int8-dynamic | openvino-int8 | deploy | "
        "served p50 b=1 (int8-dyn / ov-int8) | best peer | best variant | ratio |",
        "|" + " --- |" * 12,
    ]
    for r in results:
        s, goal, served = r["stages"], r["goal"], r["served"]

        def cell(name: str) -> str:
            return f"{s[name]['seconds']:.1f} s / {s[name]['peak_rss_mb'] / 1024:.2f} GB"

        peer, variant = goal["best_peer"], goal["best_variant"]
        lines.append(
            f"| {r['size']} | {r['parameters'] / 1e6:.1f} M | {r['onnx_bytes']['fp32'] / 1e9:.3f} GB | "
            f"{', '.join(r['external_data']['fp32']) or 'no'} | {cell('export')} | {cell('int8-dynamic')} | "
            f"{cell('openvino-int8')} | {s['deploy']['seconds']:.1f} s (Triton "
            f"{s['deploy']['triton_peak_rss_mb'] / 1024:.2f} GB) | "
            f"{served['int8-dynamic']['p50_ms_batch1']:.1f} / {served['openvino-int8']['p50_ms_batch1']:.1f} ms"
            f" | {peer} {r['samples_per_s'][peer]:.1f}/s | {variant} {r['samples_per_s'].get(variant, 0):.1f}/s | "
            f"{goal['ratio']:.2f}x{' (goal 2.5x)' if goal['applies'] else ''}; over the FP32 peers "
            f"{goal['ratio_vs_fp32_peers']:.2f}x |"
        )
    return "\n".join(lines)


def _plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (times, memory) = plt.subplots(1, 2, figsize=(12, 4.5))
    parameters = [r["parameters"] for r in results]
    for stage in PLOTTED_STAGES:
        times.plot(parameters, [r["stages"][stage]["seconds"] for r in results], marker="o", label=stage)
        memory.plot(parameters, [r["stages"][stage]["peak_rss_mb"] / 1024 for r in results], marker="o", label=stage)
    memory.plot(parameters, [r["fp32_weight_bytes"] / 2**30 for r in results], "k--", label="FP32 weights (once)")
    for axis, label in ((times, "wall time (s)"), (memory, "peak resident set of the benchmark process (GiB)")):
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel("parameters")
        axis.set_ylabel(label)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle(f"stdlib-gpt, context {CONTEXT}: stage cost vs parameters (2-core CPU)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default=",".join(SIZES), help=f"comma-separated, of {', '.join(SIZES)}")
    parser.add_argument("--json", help="write every figure here")
    parser.add_argument("--plot", help="write the stage-time and memory plot here (PNG)")
    parser.add_argument("--work", help="folder for the files (default: a temporary one, removed after each size)")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # one size, in this process
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that `finally` stops this size's Triton
        Path(args.out).write_text(json.dumps(run_size(args.child, Path(args.work)), indent=2))
        return
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        parser.error(f"unknown size(s) {unknown}: expected some of {list(SIZES)}")
    results = []
    for size in sizes:
        with tempfile.TemporaryDirectory(prefix=f"tes-scaling-{size}-", dir=args.work) as work:
            out = Path(work) / "result.json"
            command = [sys.executable, __file__, "--child", size, "--work", work, "--out", str(out)]
            start = time.perf_counter()
            child = subprocess.run(command, env={**os.environ, "PYTHONUNBUFFERED": "1"})
            if child.returncode:
                print(f"{size}: failed (exit {child.returncode})", flush=True)
                continue
            result = json.loads(out.read_text())
            result["total_seconds"] = time.perf_counter() - start
            result["child_peak_rss_mb"] = max(record["peak_rss_mb"] for record in result["stages"].values())
            results.append(result)
            if args.json:  # after every size: a long run that dies keeps what it measured
                Path(args.json).write_text(json.dumps(results, indent=2))
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads, batch {BATCH}, context {CONTEXT}\n")
    print(_table(results))
    for r in results:
        print(f"\n{r['size']}: samples/s " + ", ".join(f"{k} {v:.1f}" for k, v in r["samples_per_s"].items()))
    if args.plot and results:
        _plot(results, args.plot)


if __name__ == "__main__":
    main()
