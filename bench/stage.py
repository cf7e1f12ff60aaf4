"""The benchmark stage: in-process baselines, load sweeps over HTTP and gRPC, a small server configuration sweep,
and the outputs (JSON, CSV, markdown, PNG) of a deployed model on any Triton.

    tes bench stdlib-gpt                      # short sweep against the stack's Triton
    tes bench stdlib-gpt --thorough --sweep-configs --apply-best
    prefect deployment run 'benchmark/default' --watch --param model=digits-cnn

The caller resolves which Triton to measure (`serving.triton.Endpoint`) and passes it in.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt

from bench import loadgen, output, system
from bench.loadgen import LoadPoint
from core import paths
from core.results import Artifact, RunDir, StageOutput, StageResult, Status, new_run_id, timed
from core.runtimes import RuntimeSettings, measure_speed, open_session
from recipes import Recipe, build_recipe
from recipes.evaluation import load_trained, torch_predictor
from serving import client, repository
from serving.repository import ServingConfig
from serving.targets import Target, open_target
from serving.triton import Endpoint

SHORT = {"concurrencies": (1, 4), "rates": (), "window_s": 1.0, "max_windows": 4}
THOROUGH = {"concurrencies": (1, 2, 4, 8, 16, 32), "rates": (25, 50, 100, 200, 400), "window_s": 3.0, "max_windows": 10}
CONFIG_GRID = [
    (False, 0, 1),
    (True, 0, 1),
    (True, 1000, 1),
    (True, 5000, 1),
    (True, 1000, 2),
]  # batching, delay us, instances


class BenchmarkOptions(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = Field(True, description="run the benchmark as the pipeline's last stage")
    thorough: bool = Field(
        False, description="long sweep (6 concurrencies, 5 Poisson rates, 3 s windows) instead of the short one"
    )
    protocols: tuple[Literal["grpc", "http"], ...] = ("grpc", "http")
    concurrencies: tuple[PositiveInt, ...] | None = Field(None, description="None: 1,4 (short) or 1..32 (thorough)")
    rates: tuple[PositiveFloat, ...] | None = Field(
        None, description="Poisson request rates per second; None: by thoroughness"
    )
    p99_budget_ms: float = Field(
        50.0, gt=0, description="the open-loop result is the highest rate whose p99 stays under this"
    )
    stability: float = Field(0.10, gt=0, le=1)
    samples: int = Field(64, ge=1, description="held-out samples the load cycles through")
    sweep_configs: bool = Field(False, description="also try dynamic batching on/off, queue delays and instance counts")
    apply_best: bool = Field(False, description="write the best configuration found as the model's next version")


class Baseline(StageOutput):
    model: str
    runtime: str
    latency_p50_ms: float  # batch 1
    throughput_per_s: float  # samples/s at `batch`
    batch: int


class BenchmarkOutput(StageOutput):
    outputs: dict[str, str]  # kind (json, csv, markdown, plot) -> path
    points: tuple[LoadPoint, ...]
    baselines: tuple[Baseline, ...]
    best_rate_under_budget: LoadPoint | None = None
    config_sweep: tuple[dict, ...] = ()
    applied: dict | None = None  # the configuration written as the model's next version (--apply-best)


class _TorchRunner:
    """torch eager with ONNX Runtime's `run` signature, for `measure_speed`."""

    def __init__(self, model, recipe: Recipe):
        self._predict = torch_predictor(model, recipe)

    def run(self, _names, feeds):
        return [self._predict(feeds)]


def baselines(
    recipe: Recipe, provenance: dict, version_dir: Path, config: ServingConfig, batch: int = 8
) -> list[Baseline]:
    """In-process latency (batch 1) and throughput (batch `batch`) of the served file and of torch eager."""
    settings = RuntimeSettings(**config.runtime_settings)
    label = config.runtime + (f" {config.runtime_precision}" if config.runtime_precision else "")
    if config.runtime_settings:
        label += f" ({settings.label()})"
    sessions = {
        label: open_session(
            version_dir / config.model_file, config.runtime, config.runtime_precision or None, settings=settings
        )
    }
    run_dir = provenance.get("run_dir")  # absent for a model deployed by hand
    weights = RunDir(run_dir, create=False).weights if run_dir and Path(run_dir).is_dir() else None
    if weights is not None and weights.is_file():
        sessions["torch eager fp32"] = _TorchRunner(load_trained(recipe, weights), recipe)
    inputs = recipe.example_inputs(batch)
    single = {name: array[:1] for name, array in inputs.items()}
    measured = measure_speed(sessions, single, inputs, repeats=30)
    return [
        Baseline(
            model=version_dir.parent.name,
            runtime=name,
            latency_p50_ms=latency,
            throughput_per_s=throughput,
            batch=batch,
        )
        for name, (latency, throughput, _) in measured.items()
    ]


def config_sweep(
    target: Target,
    model: str,
    version_dir: Path,
    base: ServingConfig,
    endpoint: Endpoint,
    inputs: list,
    settings: loadgen.LoadSettings,
    concurrency: int = 16,
) -> list[dict]:
    """Throughput at `concurrency` for each server configuration, on a scratch copy `<model>-sweep` that is removed
    afterwards (measured on the first replica only)."""
    scratch, results = f"{model}-sweep", []
    try:
        for batching, delay, instances in CONFIG_GRID:
            trial = dataclasses.replace(
                base, dynamic_batching=batching, max_queue_delay_microseconds=delay, instance_count=instances
            )
            target.write_version(scratch, version_dir / "model.onnx", trial)
            client.load_model(endpoint.http, scratch, admin_key=endpoint.admin_key)
            point = loadgen.measure(endpoint.grpc, "grpc", scratch, inputs, concurrency=concurrency, settings=settings)
            results.append(
                {
                    "dynamic_batching": batching,
                    "max_queue_delay_microseconds": delay,
                    "instance_count": instances,
                    "throughput": point.throughput,
                    "p99_ms": point.latency_ms.get("p99"),
                    "stable": point.stable,
                }
            )
    finally:
        try:
            client.connect(endpoint.http, "http").unload_model(
                scratch, headers=client.admin_headers(endpoint.admin_key)
            )
        except Exception:  # best effort: the folder goes either way
            pass
        target.remove_model(scratch)
    return sorted(results, key=lambda r: -r["throughput"])


def run_benchmark(
    model: str,
    options: BenchmarkOptions,
    endpoint: Endpoint,
    *,
    repository_path: str | None = None,
    out_dir: Path | None = None,
    progress: Callable[[str], None] = print,
) -> BenchmarkOutput:
    """Benchmark `model` on the Triton at `endpoint` (every replica of it, requests spread round robin); returns
    the figures and the paths of the files written. The repository (a folder or an s3:// URL) tells what the model
    was made from; default: the one the endpoint's server reads, else the project's model_repository."""
    target = open_target(repository_path or endpoint.repository or "model_repository")
    with target.served_copy(model) as (provenance, version_dir):
        return _run_benchmark(model, options, endpoint, target, provenance, version_dir, out_dir, progress)


def _run_benchmark(
    model: str,
    options: BenchmarkOptions,
    endpoint: Endpoint,
    target: Target,
    provenance: dict,
    version_dir: Path,
    out_dir: Path | None,
    progress: Callable[[str], None],
) -> BenchmarkOutput:
    recipe = build_recipe(provenance["recipe"], provenance.get("options", {}))
    config = repository.serving_config_of(
        repository.parse_config((version_dir.parent / "config.pbtxt").read_text(encoding="utf-8"))
    )
    preset = THOROUGH if options.thorough else SHORT
    settings = loadgen.LoadSettings(
        window_s=preset["window_s"],
        warmup_s=min(2.0, preset["window_s"]),
        stability=options.stability,
        max_windows=preset["max_windows"],
    )
    inputs = [batch.inputs for batch in recipe.eval_batches(1, options.samples)]
    out_dir = out_dir or paths.resolve("runs") / "benchmarks" / new_run_id(model)
    progress(f"in-process baselines of '{model}' ...")
    base = baselines(recipe, provenance, version_dir, config)
    points = _sweeps(model, options, endpoint, inputs, settings, preset, progress)
    best = loadgen.best_rate_under(points, options.p99_budget_ms)
    notes = [
        f"Highest Poisson rate with p99 <= {options.p99_budget_ms} ms: "
        + (f"{best.load:.0f}/s ({best.protocol})" if best else "none measured")
    ]
    swept, applied = [], None
    if options.sweep_configs and endpoint.grpc:
        progress("server configuration sweep ...")
        swept = config_sweep(target, model, version_dir, config, endpoint, inputs, settings)
        notes.append("Configuration sweep (gRPC, concurrency 16): " + "; ".join(map(_sweep_line, swept)))
        if options.apply_best:
            applied = _apply_best(target, version_dir, config, swept[0], endpoint, provenance)
    extra = {
        "model": model,
        "options": options.model_dump(mode="json"),
        "best_rate_under_budget": best.to_dict() if best else None,
        "config_sweep": swept,
        "applied": applied,
        "notes": "\n\n".join(notes),
    }
    files = output.write_all(out_dir, points, [b.model_dump() for b in base], system.describe(endpoint.http), extra)
    return BenchmarkOutput(
        outputs=files,
        points=tuple(points),
        baselines=tuple(base),
        best_rate_under_budget=best,
        config_sweep=tuple(swept),
        applied=applied,
    )


def benchmark_stage(
    options: BenchmarkOptions,
    model: str,
    endpoint: Endpoint | None,
    not_loaded: str,
    repository_path: str,
    out_dir: Path,
    progress: Callable[[str], None],
) -> StageResult[BenchmarkOutput]:
    """The pipeline's benchmark of the plain model name (short by default); SKIPPED when it is off or nothing was
    loaded (`not_loaded` says why)."""
    if not options.enabled:
        return StageResult.skipped("benchmark", "benchmark.enabled is false")
    if endpoint is None:
        return StageResult.skipped("benchmark", not_loaded or "model not loaded")
    with timed() as clock:
        result = run_benchmark(
            model, options, endpoint, repository_path=repository_path, out_dir=out_dir, progress=progress
        )
    return StageResult(
        stage="benchmark",
        status=Status.OK,
        seconds=clock["seconds"],
        artifacts=tuple(Artifact.of(path) for path in result.outputs.values()),
        output=result,
    )


def _sweeps(
    model: str,
    options: BenchmarkOptions,
    endpoint: Endpoint,
    inputs: list,
    settings: loadgen.LoadSettings,
    preset: dict,
    progress: Callable[[str], None],
) -> list[LoadPoint]:
    points: list[LoadPoint] = []
    replicas = endpoint.every()
    for protocol in options.protocols:
        urls = [replica.urls[protocol] for replica in replicas if protocol in replica.urls]
        if len(urls) < len(replicas):
            progress(f"skipping {protocol}: no URL for it" + (" on every replica" if urls else ""))
            continue
        pids = [replica.server_pid for replica in replicas]
        points += loadgen.sweep(
            urls,
            protocol,
            model,
            inputs,
            settings=settings,
            server_pid=pids if all(pids) else None,
            concurrencies=options.concurrencies or preset["concurrencies"],
            rates=options.rates or preset["rates"],
            progress=lambda p: progress(_one_line(p)),
        )
    return points


def _apply_best(
    target: Target, version_dir: Path, base: ServingConfig, best: dict, endpoint: Endpoint, provenance: dict
) -> dict:
    """The best configuration as the model's next version, with the same file and provenance, loaded on every
    replica in turn."""
    model = version_dir.parent.name
    config = dataclasses.replace(
        base,
        dynamic_batching=best["dynamic_batching"],
        max_queue_delay_microseconds=best["max_queue_delay_microseconds"],
        instance_count=best["instance_count"],
    )
    written = target.write_version(model, version_dir / "model.onnx", config, provenance=provenance)
    for replica in endpoint.every():
        client.load_model(replica.http, model, admin_key=endpoint.admin_key or replica.admin_key)
    return {
        "model": model,
        "version": written.version,
        **{k: best[k] for k in ("dynamic_batching", "max_queue_delay_microseconds", "instance_count")},
    }


def _sweep_line(row: dict) -> str:
    return (
        f"batching={row['dynamic_batching']} delay={row['max_queue_delay_microseconds']}us "
        f"instances={row['instance_count']}: {row['throughput']:.0f}/s"
    )


def _one_line(point: LoadPoint) -> str:
    load = f"concurrency {point.load:.0f}" if point.mode == "concurrency" else f"{point.load:.0f} req/s offered"
    flag = "" if point.stable else "  (unstable)"
    return (
        f"  {point.protocol:4s} {load:22s} {point.throughput:8.1f} req/s  p50 "
        f"{point.latency_ms.get('p50', float('nan')):7.2f} ms"
        f"  p99 {point.latency_ms.get('p99', float('nan')):7.2f} ms{flag}"
    )
