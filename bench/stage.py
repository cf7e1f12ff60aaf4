"""The serving benchmark of a deployed model: in-process baselines, sweeps over HTTP and gRPC, a small server
configuration sweep, and the outputs (JSON, CSV, markdown, PNG).

    tes bench stdlib-gpt                      # short sweep against the stack's Triton
    tes bench stdlib-gpt --thorough --sweep-configs --apply-best
    prefect deployment run 'benchmark/default' --watch --param model=digits-cnn
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Callable, Literal

from pydantic import BaseModel, ConfigDict, Field

from core import paths
from core.errors import TesError
from core.results import new_run_id
from core.runtimes import open_session
from export.variants import measure_speed
from flows import stack
from bench import loadgen, output, system
from serving import client, repository
from training.loop import load_trained
from recipes import Recipe, build_recipe

SHORT = {"concurrencies": (1, 4), "rates": (), "window_s": 1.0, "max_windows": 4}
THOROUGH = {"concurrencies": (1, 2, 4, 8, 16, 32), "rates": (25, 50, 100, 200, 400), "window_s": 3.0, "max_windows": 10}
CONFIG_GRID = [(False, 0, 1), (True, 0, 1), (True, 1000, 1), (True, 5000, 1), (True, 1000, 2)]  # batching, delay us, instances


class BenchmarkOptions(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = Field(True, description="run the benchmark as the pipeline's last stage")
    thorough: bool = Field(False, description="long sweep (6 concurrencies, 5 Poisson rates, 3 s windows) instead of the short one")
    protocols: tuple[Literal["grpc", "http"], ...] = ("grpc", "http")
    concurrencies: tuple[int, ...] | None = Field(None, description="None: 1,4 (short) or 1..32 (thorough)")
    rates: tuple[float, ...] | None = Field(None, description="Poisson request rates per second; None: by thoroughness")
    p99_budget_ms: float = Field(50.0, gt=0, description="the open-loop result is the highest rate whose p99 stays under this")
    stability: float = Field(0.10, gt=0, le=1)
    samples: int = Field(64, ge=1, description="held-out samples the load cycles through")
    sweep_configs: bool = Field(False, description="also try dynamic batching on/off, queue delays and instance counts")
    apply_best: bool = Field(False, description="write the best configuration found as the model's next version")


def _model_recipe(repo: Path, model: str) -> tuple[Recipe, dict, Path]:
    """The recipe, provenance and version folder behind `model` (an alias is followed to its target)."""
    folder = repository.model_dir(repo, model)
    numbers = repository.versions(folder)
    if not numbers:
        raise TesError(f"model '{model}' has no version in {repo}; deploy it first (tes run / tes demo)")
    target = repository.alias_target(repo, model)
    version_dir = repository.model_dir(repo, target) / str(repository.versions(repository.model_dir(repo, target))[-1]) if target \
        else folder / str(numbers[-1])
    provenance = json.loads((version_dir / repository.VERSION_MANIFEST).read_text())["provenance"]
    return build_recipe(provenance["recipe"], provenance.get("options", {})), provenance, version_dir


class _TorchRunner:
    def __init__(self, model, recipe: Recipe):
        self._model, self._names = model, [spec.name for spec in recipe.inputs]

    def run(self, _names, feeds):
        import torch

        with torch.no_grad():
            return [self._model(*(torch.from_numpy(feeds[n]) for n in self._names)).numpy()]


def baselines(recipe: Recipe, provenance: dict, version_dir: Path, batch: int = 8) -> list[dict]:
    """In-process latency (batch 1) and throughput (batch `batch`) of the served file and of torch eager."""
    config = repository.serving_config_of(repository.parse_config((version_dir.parent / "config.pbtxt").read_text()))
    sessions = {config.runtime + (f" {config.runtime_precision}" if config.runtime_precision else ""):
                open_session(version_dir / "model.onnx", config.runtime, config.runtime_precision or None)}
    weights = Path(provenance.get("run_dir", "")) / "train" / "model.pt"
    if weights.is_file():
        sessions["torch eager fp32"] = _TorchRunner(load_trained(recipe, weights), recipe)
    inputs = recipe.example_inputs(batch)
    single = {name: array[:1] for name, array in inputs.items()}
    measured = measure_speed(sessions, single, inputs, repeats=30)
    return [{"model": version_dir.parent.name, "runtime": name, "latency_p50_ms": latency, "throughput_per_s": throughput, "batch": batch}
            for name, (latency, throughput) in measured.items()]


def config_sweep(repo: Path, model: str, version_dir: Path, url: str, grpc_url: str, inputs: list, admin_key: str | None,
                 settings: loadgen.LoadSettings, concurrency: int = 16) -> list[dict]:
    """Throughput at `concurrency` for each server configuration, on a scratch copy `<model>-sweep` that is removed after."""
    base = repository.serving_config_of(repository.parse_config((version_dir.parent / "config.pbtxt").read_text()))
    scratch, results = f"{model}-sweep", []
    try:
        for batching, delay, instances in CONFIG_GRID:
            trial = dataclasses.replace(base, dynamic_batching=batching, max_queue_delay_microseconds=delay, instance_count=instances)
            repository.write_version(repo, scratch, version_dir / "model.onnx", trial)
            client.load_model(url, scratch, admin_key=admin_key)
            point = loadgen.measure(grpc_url, "grpc", scratch, inputs, concurrency=concurrency, settings=settings)
            results.append({"dynamic_batching": batching, "max_queue_delay_microseconds": delay, "instance_count": instances,
                            "throughput": point.throughput, "p99_ms": point.latency_ms.get("p99"), "stable": point.stable})
    finally:
        try:
            client.connect(url, "http").unload_model(scratch, headers=client.admin_headers(admin_key))
        except Exception:  # best effort: the folder goes either way
            pass
        shutil.rmtree(repository.model_dir(repo, scratch), ignore_errors=True)
    return sorted(results, key=lambda r: -r["throughput"])


def run_benchmark(model: str, options: BenchmarkOptions, *, http_url: str | None = None, grpc_url: str | None = None,
                  admin_key: str | None = None, repository_path: str = "model_repository", out_dir: Path | None = None,
                  progress: Callable[[str], None] = print) -> dict:
    """Benchmark `model` on the stack's Triton (or the given URLs); returns the summary with the output paths."""
    http_url = http_url or stack.triton_url("http")
    grpc_url = grpc_url or (stack.triton_url("grpc") if not http_url or http_url == stack.triton_url("http") else None)
    if not http_url:
        raise TesError("no Triton to benchmark: start the stack with `tes up`, or pass its URL")
    admin_key = admin_key or stack.triton_admin_key()
    repo = paths.resolve(repository_path)
    recipe, provenance, version_dir = _model_recipe(repo, model)
    preset = THOROUGH if options.thorough else SHORT
    settings = loadgen.LoadSettings(window_s=preset["window_s"], warmup_s=min(2.0, preset["window_s"]),
                                    stability=options.stability, max_windows=preset["max_windows"])
    inputs = [batch.inputs for batch in recipe.eval_batches(1, options.samples)]
    out_dir = out_dir or paths.resolve("runs") / "benchmarks" / new_run_id(model)
    progress(f"in-process baselines of '{model}' ...")
    base = baselines(recipe, provenance, version_dir)
    urls = {"http": http_url, "grpc": grpc_url}
    points: list[loadgen.LoadPoint] = []
    for protocol in options.protocols:
        if not urls.get(protocol):
            progress(f"skipping {protocol}: no URL for it")
            continue
        points += loadgen.sweep(urls[protocol], protocol, model, inputs, settings=settings, server_pid=_local_server_pid(http_url),
                                concurrencies=options.concurrencies or preset["concurrencies"], rates=options.rates or preset["rates"],
                                progress=lambda p: progress(_one_line(p)))
    extra: dict = {"model": model, "options": options.model_dump(mode="json")}
    best = loadgen.best_rate_under(points, options.p99_budget_ms)
    extra["best_rate_under_budget"] = best.to_dict() if best else None
    notes = [f"Highest Poisson rate with p99 <= {options.p99_budget_ms} ms: " + (f"{best.load:.0f}/s ({best.protocol})" if best else "none measured")]
    if options.sweep_configs and grpc_url:
        progress("server configuration sweep ...")
        extra["config_sweep"] = config_sweep(repo, model, version_dir, http_url, grpc_url, inputs, admin_key, settings)
        notes.append("Configuration sweep (gRPC, concurrency 16): " + "; ".join(
            f"batching={r['dynamic_batching']} delay={r['max_queue_delay_microseconds']}us instances={r['instance_count']}: "
            f"{r['throughput']:.0f}/s" for r in extra["config_sweep"]))
        if options.apply_best:
            extra["applied"] = _apply_best(repo, version_dir, extra["config_sweep"][0], http_url, admin_key)
    extra["notes"] = "\n\n".join(notes)
    outputs = output.write_all(out_dir, points, base, system.describe(http_url), extra)
    return {"outputs": outputs, "points": [p.to_dict() for p in points], "baselines": base, **extra}


def _local_server_pid(http_url: str) -> int | None:
    """The pid of the stack's Triton when that is the server being measured (its CPU use goes in the ledger)."""
    state = stack.read()
    return state["triton"]["pid"] if state and http_url == stack.triton_url("http") else None


def _apply_best(repo: Path, version_dir: Path, best: dict, url: str, admin_key: str | None) -> dict:
    model = version_dir.parent.name
    config = dataclasses.replace(repository.serving_config_of(repository.parse_config((version_dir.parent / "config.pbtxt").read_text())),
                                 dynamic_batching=best["dynamic_batching"], max_queue_delay_microseconds=best["max_queue_delay_microseconds"],
                                 instance_count=best["instance_count"])
    written = repository.write_version(repo, model, version_dir / "model.onnx", config)
    client.load_model(url, model, admin_key=admin_key)
    return {"model": model, "version": written.version, **{k: best[k] for k in ("dynamic_batching", "max_queue_delay_microseconds", "instance_count")}}


def _one_line(point: loadgen.LoadPoint) -> str:
    load = f"concurrency {point.load:.0f}" if point.mode == "concurrency" else f"{point.load:.0f} req/s offered"
    flag = "" if point.stable else "  (unstable)"
    return (f"  {point.protocol:4s} {load:22s} {point.throughput:8.1f} req/s  p50 {point.latency_ms.get('p50', float('nan')):7.2f} ms"
            f"  p99 {point.latency_ms.get('p99', float('nan')):7.2f} ms{flag}")

