"""Build, score and gate every precision variant, then pick the one that serves the plain model name.

Each variant is scored on the recipe's validation split with the recipe's own metric and compared with FP32
(max/mean |difference|, top-1 agreement). Two gates decide what may be deployed:

- accuracy: a primary metric more than `accuracy_budget` (relative) below FP32 rejects the variant; a rejected
  static INT8 variant is retried with the nodes that drift most excluded from quantization, a bounded number of times;
- speed: a variant that is not at least `min_speedup` times faster than FP32, measured in-process on the same
  inputs, interleaved, is rejected ("INT8 slower than FP32" is never deployed silently).

The scoring, the gates, the selection and the report table are in `export/gates.py`; this module builds the
variants and runs them through it.
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from core.errors import ExportError, StageTimeout
from core.files import atomic_write_json, model_companions
from core.results import VARIANTS_FILE, Artifact, StageOutput, StageResult, Status, timed
from core.runtimes import RuntimeSettings, measure_speed, open_session, runtime_of, settings_candidates
from export import dynamic_quant, openvino_quant, quantize
from export.gates import accuracy_gate, first_outputs, score, select, speed_gate
from export.quantize import ALL_VARIANTS
from export.torch_variants import TORCH_VARIANTS, build_torch_variant
from recipes import Recipe

log = logging.getLogger(__name__)

Policy = Literal["max-throughput", "min-latency"]


class PrecisionConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    variants: tuple[str, ...] = Field(ALL_VARIANTS, description="which of " + ", ".join(ALL_VARIANTS) + " to build")
    calibration_method: Literal["minmax", "entropy", "percentile"] = "minmax"
    calibration_samples: int = Field(128, ge=1, le=100_000, description="training-split samples for static INT8")
    per_channel: bool = Field(True, description="per-channel weight scales for static INT8")
    static_op_types: tuple[str, ...] = Field(
        ("MatMul", "Gemm", "Conv"), description="op types static INT8 quantizes; () for all"
    )
    static_weights_only: bool = Field(
        True,
        description="static INT8 quantizes only nodes with a constant weight, "
        "not products of two activations (attention)",
    )
    accuracy_budget: float = Field(
        0.01,
        ge=-1,
        le=1,
        description="largest relative drop of the primary metric vs FP32 "
        "(0.01: 1%; a negative budget demands an improvement)",
    )
    min_speedup: float = Field(
        1.05, ge=0, description="a variant must be this many times faster than FP32; 0 turns the gate off"
    )
    speed_batch_size: int = Field(8, ge=1, description="batch for the throughput measurement")
    speed_repeats: int = Field(20, ge=3, le=10_000, description="timed runs per variant and shape")
    score_samples: int = Field(
        2048,
        ge=1,
        description="validation samples scored per variant (the accuracy gate compares a few; 512 put 1% at 3 samples)",
    )
    exclusion_retries: int = Field(2, ge=0, le=10, description="retries of static INT8 with drifting nodes excluded")
    nodes_per_retry: int = Field(3, ge=1, le=100)
    policy: Policy = Field("max-throughput", description="which accepted variant serves the plain model name")
    nncf_model_type: openvino_quant.ModelKind = Field(
        "auto", description="NNCF's preset: transformer, default, or auto (transformer when the graph has attention)"
    )
    nncf_accuracy_control: bool = Field(
        True, description="when NNCF's plain INT8 fails the accuracy gate, retry with its accuracy control"
    )
    build_workers: int = Field(
        1,
        ge=1,
        le=64,
        description="variants built at once (threads, or processes of a temporary local Dask cluster; in a flow "
        "run, Prefect tasks); speed is measured after every build, one at a time, here",
    )
    task_runner: Literal["threads", "dask"] = Field(
        "threads",
        description="what builds the variants: threads of this process, or Dask (prefect-dask in a flow run; "
        "`pip install '.[dask]'`): the cluster at dask_address, else a temporary local one",
    )
    dask_address: str | None = Field(
        None,
        pattern=r"^(tcp|tls|inproc|ucx)://\S+$",
        description="scheduler of an existing Dask cluster (tcp://host:8786) whose workers run this project's "
        "environment and see the run folder at the same path; None: a local cluster of build_workers processes",
    )
    tune_settings: bool = Field(
        True,
        description="time each variant with its few runtime settings (f32/bf16 float layers, hints); keep the fastest",
    )

    @field_validator("variants")
    @classmethod
    def _known_variants(cls, variants: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [v for v in variants if v not in ALL_VARIANTS]
        if unknown:
            raise ValueError(f"unknown variant(s) {unknown}: expected some of {list(ALL_VARIANTS)}")
        return tuple(dict.fromkeys(("fp32", *variants)))  # FP32 is always the reference

    @model_validator(mode="after")
    def _address_needs_dask(self) -> "PrecisionConfig":
        if self.dask_address and self.task_runner != "dask":
            raise ValueError(
                f"dask_address {self.dask_address!r} is set but task_runner is {self.task_runner!r}: "
                "set task_runner to 'dask' as well, or drop dask_address"
            )
        return self


@dataclass
class VariantReport:
    name: str
    path: str | None = None
    runtime: str = "onnxruntime"
    runtime_precision: str | None = None
    bytes: int = 0
    sha256: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    metric_delta_relative: float = 0.0
    max_abs_diff: float = 0.0
    mean_abs_diff: float = 0.0
    top1_agreement: float = 1.0
    latency_p50_ms: float = 0.0  # batch 1
    throughput_per_s: float = 0.0  # samples/s at speed_batch_size
    speedup_vs_fp32: float = 1.0  # median over interleaved rounds of FP32's batch time over this variant's
    speedup_interval: tuple[float, float] | None = None  # 95% interval of that median (order statistics)
    status: Literal["accepted", "rejected", "skipped"] = "accepted"
    reason: str = ""
    excluded_nodes: list[str] = field(default_factory=list)
    drift: list[dict[str, str | float]] = field(default_factory=list)  # typed: an infinite SQNR stays infinite in JSON
    serves_alias: bool = False
    build_seconds: float = 0.0  # wall time to build, calibrate, retry and score this variant
    build_cpu_seconds: float = 0.0  # CPU time of this process over the same span (for the energy ledger)
    files: list[str] = field(default_factory=list)  # files the model file needs beside it: IR .bin, ONNX data
    method: str = ""  # how it was made, when a variant has more than one way (NNCF's accuracy control)
    settings: dict[str, Any] = field(default_factory=dict)  # the runtime settings it runs with (RuntimeSettings)
    settings_index: int = 0  # which of its settings candidates won
    settings_tried: list[dict[str, Any]] = field(default_factory=list)  # every candidate, timed or why not

    def runtime_settings(self) -> RuntimeSettings:
        return RuntimeSettings(**self.settings)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class PrecisionOutput(StageOutput):
    variants: tuple[VariantReport, ...]  # FP32 first; exactly one accepted variant has `serves_alias`
    selected: str  # the variant that serves the plain model name
    policy: Policy
    primary_metric: str

    def variant(self, name: str) -> VariantReport | None:
        return next((v for v in self.variants if v.name == name), None)

    @property
    def accepted(self) -> list[VariantReport]:
        return [v for v in self.variants if v.status == "accepted"]


def precision_stage(
    recipe: Recipe,
    onnx_path: str | Path,
    out_dir: str | Path,
    config: PrecisionConfig,
    weights: str | Path | None,
    map_builds: BuildMap | None = None,
) -> StageResult[PrecisionOutput]:
    """Every precision variant built, scored on validation data and gated against FP32; `variants.json` beside them.
    `weights` (the trained torch model) is what the torch-native candidates compile; None skips them."""
    with timed() as clock:
        reports = build_and_score(recipe, onnx_path, out_dir, config, weights, map_builds=map_builds)
    atomic_write_json(Path(out_dir) / VARIANTS_FILE, [r.to_dict() for r in reports])
    selected = next(r.name for r in reports if r.serves_alias)
    artifacts = tuple(
        artifact
        for r in reports
        if r.path and r.sha256
        for artifact in (
            Artifact(path=r.path, sha256=r.sha256, bytes=Path(r.path).stat().st_size),
            *map(Artifact.of, r.files),
        )
    )
    output = PrecisionOutput(
        variants=tuple(reports), selected=selected, policy=config.policy, primary_metric=recipe.primary_metric
    )
    return StageResult(
        stage="precision", status=Status.OK, seconds=clock["seconds"], artifacts=artifacts, output=output
    )


@dataclass
class _Context:
    """What building a variant needs besides its name."""

    recipe: Recipe
    fp32_path: Path
    out_dir: Path
    weights: Path | None
    calibration: list
    config: PrecisionConfig
    held_out: list  # validation batches beyond those the gate scores (NNCF's accuracy control validates on them)


def _build(name: str, context: _Context, exclude: list[str], attempt: int) -> Path:
    config, fp32_path, out_dir = context.config, context.fp32_path, context.out_dir
    if name in ("fp32", "openvino-bf16"):  # OpenVINO compiles the FP32 graph with bf16 inference precision
        return fp32_path
    if name == "int8-dynamic":
        return dynamic_quant.build_int8_dynamic(fp32_path, out_dir)
    if name in ("int8-static", "openvino-int8"):
        # OpenVINO runs a QDQ model with its own int8 kernels, best with S8 activations
        return quantize.build_int8_static(
            fp32_path,
            out_dir,
            context.calibration,
            config.calibration_method,
            config.per_channel,
            exclude,
            name=f"{name}-{attempt}" if attempt else name,
            op_types=config.static_op_types or None,
            weights_only=config.static_weights_only,
            symmetric_activations=name == "openvino-int8",
        )
    if name == "openvino-nncf":
        if attempt == 0:
            return openvino_quant.build_openvino_nncf(fp32_path, out_dir, context.calibration, config.nncf_model_type)
        recipe = context.recipe
        return openvino_quant.build_openvino_nncf_accuracy_control(
            fp32_path,
            out_dir,
            context.calibration,
            context.held_out,
            lambda predict, batches: recipe.score([predict(b.inputs) for b in batches], [b.targets for b in batches])[
                recipe.primary_metric
            ],
            max_drop=max(config.accuracy_budget, 0.0),
            kind=config.nncf_model_type,
        )
    if name in TORCH_VARIANTS:
        return build_torch_variant(context.recipe, context.weights, out_dir, name)
    return quantize.build_fp16(fp32_path, out_dir)


def _retries(name: str, config: PrecisionConfig) -> int:
    """How many rebuilds a variant rejected on accuracy gets: static INT8 excludes the drifting nodes, NNCF runs
    its accuracy-controlled quantization once."""
    if name in ("int8-static", "openvino-int8"):
        return config.exclusion_retries
    return 1 if name == "openvino-nncf" and config.nncf_accuracy_control else 0


def build_and_score(
    recipe: Recipe,
    fp32_path: str | Path,
    out_dir: str | Path,
    config: PrecisionConfig,
    weights: str | Path | None = None,
    measure: Callable[..., dict] = measure_speed,
    map_builds: BuildMap | None = None,
) -> list[VariantReport]:
    """Every configured variant, built, scored and gated; exactly one accepted variant has `serves_alias`.

    FP32 is built first (it is the reference); the others are built and scored by `map_builds(build, names)`, by
    default `config.build_workers` at a time in threads (the Prefect flow passes one that makes each build a task).
    Speed is measured only after every build, one session at a time: variants are never timed while they share the
    cores with a build.

    Each variant that passes the accuracy gate is then timed with each of its runtime settings
    (`settings_candidates`: float layers in f32 or bf16, OpenVINO's hint, ONNX Runtime's spinning and graph
    optimisation level), all sessions in the same interleaved rounds (`measure`, replaceable for tests); a
    setting that changes the precision is scored again and must pass the accuracy gate too. Each variant keeps its
    fastest setting (by the policy), and the speed gate compares that with FP32's fastest, round by round."""
    fp32_path, out_dir = Path(fp32_path), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    batches = list(recipe.eval_batches(32, config.score_samples))
    scored_samples = sum(len(b.targets) for b in batches)
    held_out = [b for i, b in enumerate(recipe.eval_batches(32, scored_samples + 512)) if i >= len(batches)]
    context = _Context(
        recipe,
        fp32_path,
        out_dir,
        Path(weights) if weights else None,
        recipe.calibration_inputs(config.calibration_samples),
        config,
        held_out,
    )
    reference = first_outputs(open_session(fp32_path), [b.inputs for b in batches])
    fp32_report, fp32_session = _timed_build(context, "fp32", batches, reference, [])
    if fp32_session is None:  # the reference every gate compares with
        raise ExportError(
            f"the FP32 model {fp32_path} cannot be scored, so no variant can be gated: {fp32_report.reason}"
        )

    def build(name: str) -> VariantReport:
        return _timed_build(context, name, batches, reference, [fp32_report])[0]

    mapper = map_builds or default_builds(config)
    reports = [fp32_report, *mapper(build, list(config.variants[1:]))]
    sessions: dict[tuple[str, int], Any] = {}
    candidates: dict[str, list] = {}
    for report in reports:
        if report.status == "accepted":
            session = fp32_session if report is fp32_report else open_session(*_session_args(report))
            candidates[report.name] = _settings_sessions(
                context, report, session, batches, reference, reports, sessions
            )
    speed_inputs = recipe.example_inputs(config.speed_batch_size)
    single = {key: value[:1] for key, value in speed_inputs.items()}
    speeds = measure(sessions, single, speed_inputs, config.speed_repeats)
    for report in reports:
        if report.name in candidates:
            _keep_fastest(report, candidates[report.name], speeds, config.policy)
    fp32 = reports[0]
    for report in reports[1:]:
        if report.status == "accepted":
            rounds = (
                speeds[report.name, report.settings_index].round_batch_s,
                speeds["fp32", fp32.settings_index].round_batch_s,
            )
            reason = speed_gate(report, fp32, config.min_speedup, rounds)
            if reason:
                report.status, report.reason = "rejected", reason
    select(reports, config.policy).serves_alias = True
    return reports


BuildMap = Callable[[Callable[[str], VariantReport], list[str]], list[VariantReport]]


def default_builds(config: PrecisionConfig) -> BuildMap:
    """Threads of this process, or Dask (a plain `distributed` client: there is no flow run to report tasks to)."""
    if config.task_runner == "dask":
        from export.dask_builds import dask_builds

        return functools.partial(dask_builds, address=config.dask_address, workers=config.build_workers)
    return functools.partial(threaded_builds, workers=config.build_workers)


def threaded_builds(build: Callable[[str], VariantReport], names: list[str], workers: int = 1) -> list:
    """`build` for every name, `workers` at a time (1: one after the other, here), in order."""
    if workers <= 1:
        return [build(name) for name in names]
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="variant") as pool:
        return list(pool.map(build, names))


def _timed_build(context: _Context, name: str, batches: list, reference: list, reports: list):
    """`_build_scored` with its wall and CPU time recorded (the CPU time is the whole process's over the span: with
    builds in parallel, each one's share is approximate)."""
    wall, cpu = time.perf_counter(), time.process_time()
    report, session = _build_scored(context, name, batches, reference, reports)
    report.build_seconds, report.build_cpu_seconds = time.perf_counter() - wall, time.process_time() - cpu
    return report, session


def _session_args(report: VariantReport) -> tuple:
    return report.path, report.runtime, report.runtime_precision


def _settings_sessions(context, report, session, batches, reference, reports, sessions) -> list:
    """Open a session per runtime setting of an accepted variant (into `sessions`, keyed (variant, index)); a
    setting that changes the precision is scored and gated first. Returns [(precision, settings, scores)] by index,
    `scores` being the report of that precision's scoring (None: the variant's own)."""
    tried = settings_candidates(report.runtime, report.runtime_precision)
    if not context.config.tune_settings:
        tried = tried[:1]
    sessions[report.name, 0] = session
    kept = [(*tried[0], None)]
    for index, (precision, settings) in enumerate(tried[1:], start=1):
        kept.append((precision, settings, None))
        try:
            candidate = open_session(report.path, report.runtime, precision, settings=settings)
        except StageTimeout:  # the stage's time limit, raised into this thread: never a variant's fault
            raise
        except Exception as error:  # a setting this machine cannot run is left out
            report.settings_tried.append({"precision": precision, "settings": settings.label(), "dropped": str(error)})
            continue
        if precision != report.runtime_precision:
            trial = VariantReport(name=report.name, runtime=report.runtime, runtime_precision=precision)
            score(context.recipe, trial, candidate, batches, reference)
            reason = accuracy_gate(context.recipe, trial, reports[0], context.config.accuracy_budget)
            if reason:
                report.settings_tried.append({"precision": precision, "settings": settings.label(), "dropped": reason})
                continue
            kept[index] = (precision, settings, trial)
        sessions[report.name, index] = candidate
    return kept


def _keep_fastest(report: VariantReport, tried: list, speeds: dict, policy: Policy) -> None:
    """Record every timed setting of `report` and keep the fastest by the policy: its speed, precision and (when
    the precision changed) its scores become the report's."""
    timed_ = {index: speeds[report.name, index] for index in range(len(tried)) if (report.name, index) in speeds}
    for index, speed in timed_.items():
        precision, settings, _ = tried[index]
        report.settings_tried.append(
            {
                "precision": precision,
                "settings": settings.label(),
                "throughput_per_s": speed.throughput_per_s,
                "latency_p50_ms": speed.latency_p50_ms,
            }
        )
    if policy == "max-throughput":
        best = max(timed_, key=lambda index: timed_[index].throughput_per_s)
    else:
        best = min(timed_, key=lambda index: timed_[index].latency_p50_ms)
    precision, settings, trial = tried[best]
    report.settings_index, report.runtime_precision = best, precision
    report.settings = settings.model_dump(exclude_defaults=True)
    report.latency_p50_ms, report.throughput_per_s = timed_[best].latency_p50_ms, timed_[best].throughput_per_s
    if trial is not None:
        for key in ("metrics", "metric_delta_relative", "max_abs_diff", "mean_abs_diff", "top1_agreement"):
            setattr(report, key, getattr(trial, key))


def _build_scored(context: _Context, name: str, batches: list, reference: list, reports: list):
    """Build one variant and apply the accuracy gate; a rejected variant may be rebuilt (`_retries`)."""
    config, recipe = context.config, context.recipe
    excluded: list[str] = []
    drift: list[dict[str, str | float]] = []
    runtime, runtime_precision = runtime_of(name)
    retries = _retries(name, config)
    for attempt in range(retries + 1):
        report = VariantReport(
            name=name, excluded_nodes=list(excluded), drift=drift, runtime=runtime, runtime_precision=runtime_precision
        )
        try:
            path = _build(name, context, excluded, attempt)
            session = open_session(path, runtime, runtime_precision)
        except StageTimeout:  # the stage's time limit, raised into this thread: never a variant's fault
            raise
        except Exception as error:  # ORT raises plain exceptions for kernels it lacks; the variant is skipped
            report.status, report.reason = "skipped", f"cannot build or run {name} here: {error}"
            return report, None
        artifact = Artifact.of(path)
        report.path, report.bytes, report.sha256 = str(path), artifact.bytes, artifact.sha256
        report.files = [str(p) for p in model_companions(path)]  # an IR's .bin, an ONNX graph's external data
        report.bytes += sum(Path(p).stat().st_size for p in report.files)
        if name == "openvino-nncf" and attempt:
            report.method = "nncf accuracy control"
        try:
            score(recipe, report, session, batches, reference)
        except StageTimeout:  # the stage's time limit, raised into this thread: never a variant's fault
            raise
        except Exception as error:  # a runtime answering the wrong shape: this variant is skipped, not the stage
            report.status, report.reason = "skipped", f"cannot score {name}: {type(error).__name__}: {error}"
            return report, None
        reason = accuracy_gate(recipe, report, reports[0], config.accuracy_budget) if reports else None
        if reason is None:
            return report, session
        report.status, report.reason = "rejected", reason
        if attempt == retries:
            return report, None
        if name == "openvino-nncf":
            log.info("%s: %s; retrying with NNCF's accuracy control", name, reason)
            continue
        quantized = quantize.quantized_nodes(
            quantize.preprocess(context.fp32_path, context.out_dir),
            config.static_op_types or None,
            config.static_weights_only,
            excluded,
        )
        drift = quantize.qdq_drift(
            context.fp32_path,
            path,
            context.out_dir,
            context.calibration[:4],
            top=config.nodes_per_retry,
            quantized=quantized,
        )
        excluded += [item["node"] for item in drift if item["node"] not in excluded]
        log.info("%s: %s; retrying without %s", name, reason, excluded)
    return report, None
