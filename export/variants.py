"""Build, score and gate every precision variant, then pick the one that serves the plain model name.

Each variant is scored on the recipe's validation split with the recipe's own metric and compared with FP32
(max/mean |difference|, top-1 agreement). Two gates decide what may be deployed:

- accuracy: a primary metric more than `accuracy_budget` (relative) below FP32 rejects the variant; a rejected
  static INT8 variant is retried with the nodes that drift most excluded from quantization, a bounded number of times;
- speed: a variant that is not at least `min_speedup` times faster than FP32, measured in-process on the same
  inputs, interleaved, is rejected ("INT8 slower than FP32" is never deployed silently).
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from core.files import atomic_write_json
from core.results import VARIANTS_FILE, Artifact, StageOutput, StageResult, Status, timed
from core.runtimes import measure_speed, open_session, runtime_of
from core.stats import percentile_ci
from export import quantize
from export.quantize import ALL_VARIANTS
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

    @field_validator("variants")
    @classmethod
    def _known_variants(cls, variants: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [v for v in variants if v not in ALL_VARIANTS]
        if unknown:
            raise ValueError(f"unknown variant(s) {unknown}: expected some of {list(ALL_VARIANTS)}")
        return tuple(dict.fromkeys(("fp32", *variants)))  # FP32 is always the reference


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
    recipe: Recipe, onnx_path: str | Path, out_dir: str | Path, config: PrecisionConfig
) -> StageResult[PrecisionOutput]:
    """Every precision variant built, scored on validation data and gated against FP32; `variants.json` beside them."""
    with timed() as clock:
        reports = build_and_score(recipe, onnx_path, out_dir, config)
    atomic_write_json(Path(out_dir) / VARIANTS_FILE, [r.to_dict() for r in reports])
    selected = next(r.name for r in reports if r.serves_alias)
    artifacts = tuple(Artifact(path=r.path, sha256=r.sha256, bytes=r.bytes) for r in reports if r.path and r.sha256)
    output = PrecisionOutput(
        variants=tuple(reports), selected=selected, policy=config.policy, primary_metric=recipe.primary_metric
    )
    return StageResult(
        stage="precision", status=Status.OK, seconds=clock["seconds"], artifacts=artifacts, output=output
    )


def _first_outputs(session, batches: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
    return [session.run(None, inputs)[0].astype(np.float32) for inputs in batches]


def score(recipe: Recipe, report: VariantReport, session, batches: list, reference: list[np.ndarray]) -> None:
    """The recipe's metric on validation batches, and the distance of the outputs to FP32's."""
    outputs = _first_outputs(session, [b.inputs for b in batches])
    report.metrics = recipe.score(outputs, [b.targets for b in batches])
    differences = np.concatenate([np.abs(o.astype(np.float64) - r).ravel() for o, r in zip(outputs, reference)])
    report.max_abs_diff, report.mean_abs_diff = float(differences.max()), float(differences.mean())
    agree = np.concatenate([o.argmax(-1) == r.argmax(-1) for o, r in zip(outputs, reference)])
    report.top1_agreement = float(agree.mean())


def accuracy_gate(recipe: Recipe, report: VariantReport, fp32: VariantReport, budget: float) -> str | None:
    metric = recipe.primary_metric
    base, got = fp32.metrics[metric], report.metrics[metric]
    report.metric_delta_relative = (got - base) / base if base else 0.0
    if base and (base - got) / base > budget:
        return (
            f"accuracy gate: {metric} {got:.4f} vs FP32 {base:.4f} (change {100 * report.metric_delta_relative:+.2f}%, "
            f"the budget allows down to {-100 * budget:+.2f}%)"
        )
    return None


def speedup_interval(rounds: Sequence[float], fp32_rounds: Sequence[float]) -> tuple[float, float, float]:
    """(median, low, high) of the speed-up over FP32, from batch times measured in the same interleaved rounds:
    round k of both ran back to back, so each round's ratio cancels what the machine was doing then."""
    ratios = sorted(reference / own for own, reference in zip(rounds, fp32_rounds))
    low, high = percentile_ci(ratios, 0.5)
    return statistics.median(ratios), low, high


def speed_gate(
    report: VariantReport, fp32: VariantReport, min_speedup: float, rounds: tuple[Sequence[float], Sequence[float]] = ()
) -> str | None:
    """None (accepted) when the variant is at least `min_speedup` times faster than FP32, else why not. With the
    per-round batch times of both (`rounds`: the variant's, FP32's), the decision is the interval's: above the
    threshold accepts, below it rejects, and one that straddles it is rejected as not distinguishable, with the
    interval, since noise alone could have put the median on either side."""
    if not rounds:
        report.speedup_vs_fp32 = report.throughput_per_s / fp32.throughput_per_s if fp32.throughput_per_s else 0.0
        low = high = report.speedup_vs_fp32
    else:
        report.speedup_vs_fp32, low, high = speedup_interval(*rounds)
        report.speedup_interval = (low, high)
    measured = (
        f"{report.throughput_per_s:.1f} samples/s vs FP32 {fp32.throughput_per_s:.1f} ({report.speedup_vs_fp32:.2f}x"
        + (f", 95% interval {low:.2f}x..{high:.2f}x over {len(rounds[0])} rounds" if rounds else "")
        + f"; needs at least {min_speedup:.2f}x)"
    )
    if low >= min_speedup:
        return None
    if high < min_speedup:
        return f"speed gate: {measured}"
    return f"speed gate: not distinguishable from the threshold: {measured}"


def select(reports: list[VariantReport], policy: Policy) -> VariantReport:
    """The accepted variant with the most throughput, or the least latency at batch 1."""
    accepted = [r for r in reports if r.status == "accepted"]
    if policy == "max-throughput":
        return max(accepted, key=lambda r: r.throughput_per_s)
    return min(accepted, key=lambda r: r.latency_p50_ms)


def _build(
    name: str,
    fp32_path: Path,
    out_dir: Path,
    calibration: list,
    config: PrecisionConfig,
    exclude: list[str],
    attempt: int,
) -> Path:
    if name == "fp32":
        return fp32_path
    if name == "int8-dynamic":
        return quantize.build_int8_dynamic(fp32_path, out_dir)
    if name in (
        "int8-static",
        "openvino-int8",
    ):  # OpenVINO runs a QDQ model with its own int8 kernels, best with S8 activations
        file_name = f"{name}-{attempt}" if attempt else name
        return quantize.build_int8_static(
            fp32_path,
            out_dir,
            calibration,
            config.calibration_method,
            config.per_channel,
            exclude,
            name=file_name,
            op_types=config.static_op_types or None,
            weights_only=config.static_weights_only,
            symmetric_activations=name == "openvino-int8",
        )
    if name == "openvino-bf16":  # OpenVINO compiles the FP32 graph with bf16 inference precision
        return fp32_path
    return quantize.build_fp16(fp32_path, out_dir)


def build_and_score(
    recipe: Recipe, fp32_path: str | Path, out_dir: str | Path, config: PrecisionConfig
) -> list[VariantReport]:
    """Every configured variant, built, scored and gated; exactly one accepted variant has `serves_alias`."""
    fp32_path, out_dir = Path(fp32_path), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    batches = list(recipe.eval_batches(32, config.score_samples))
    calibration = recipe.calibration_inputs(config.calibration_samples)
    fp32_session = open_session(fp32_path)
    reference = _first_outputs(fp32_session, [b.inputs for b in batches])
    reports, sessions = [], {}
    for name in config.variants:
        wall, cpu = time.perf_counter(), time.process_time()
        report, session = _build_scored(
            recipe, name, fp32_path, out_dir, calibration, config, batches, reference, reports
        )
        report.build_seconds, report.build_cpu_seconds = time.perf_counter() - wall, time.process_time() - cpu
        reports.append(report)
        if session is not None:
            sessions[name] = session
    speed_inputs = recipe.example_inputs(config.speed_batch_size)
    single = {key: value[:1] for key, value in speed_inputs.items()}
    speeds = measure_speed(sessions, single, speed_inputs, config.speed_repeats)
    for name, (latency, throughput, _) in speeds.items():
        report = next(r for r in reports if r.name == name)
        report.latency_p50_ms, report.throughput_per_s = latency, throughput
    fp32 = reports[0]
    for report in reports[1:]:
        if report.status == "accepted":
            rounds = (speeds[report.name].round_batch_s, speeds["fp32"].round_batch_s)
            reason = speed_gate(report, fp32, config.min_speedup, rounds)
            if reason:
                report.status, report.reason = "rejected", reason
    select(reports, config.policy).serves_alias = True
    return reports


def _build_scored(recipe, name, fp32_path, out_dir, calibration, config, batches, reference, reports):
    """Build one variant and apply the accuracy gate; static INT8 retries with drifting nodes excluded."""
    excluded: list[str] = []
    drift: list[dict[str, str | float]] = []
    runtime, runtime_precision = runtime_of(name)
    retried = name in ("int8-static", "openvino-int8")
    for attempt in range(config.exclusion_retries + 1 if retried else 1):
        report = VariantReport(
            name=name, excluded_nodes=list(excluded), drift=drift, runtime=runtime, runtime_precision=runtime_precision
        )
        try:
            path = _build(name, fp32_path, out_dir, calibration, config, excluded, attempt)
            session = open_session(path, runtime, runtime_precision)
        except Exception as error:  # ORT raises plain exceptions for kernels it lacks; the variant is skipped
            report.status, report.reason = "skipped", f"cannot build or run {name} here: {error}"
            return report, None
        artifact = Artifact.of(path)
        report.path, report.bytes, report.sha256 = str(path), artifact.bytes, artifact.sha256
        score(recipe, report, session, batches, reference)
        reason = accuracy_gate(recipe, report, reports[0], config.accuracy_budget) if reports else None
        if reason is None:
            return report, session
        report.status, report.reason = "rejected", reason
        if not retried or attempt == config.exclusion_retries:
            return report, None
        quantized = quantize.quantized_nodes(
            quantize.preprocess(fp32_path, out_dir),
            config.static_op_types or None,
            config.static_weights_only,
            excluded,
        )
        drift = quantize.qdq_drift(
            fp32_path, path, out_dir, calibration[:4], top=config.nodes_per_retry, quantized=quantized
        )
        excluded += [item["node"] for item in drift if item["node"] not in excluded]
        log.info("%s: %s; retrying without %s", name, reason, excluded)
    return report, None


def table_rows(
    reports: list[VariantReport], primary_metric: str, alias_mark: str = " **(serves alias)**"
) -> list[list[str]]:
    """One row of cells per variant (header: `table_header`); '-' for what was not measured; `alias_mark` after
    the decision of the variant that serves the plain model name."""
    rows = []
    for r in reports:
        decision = r.status + (f": {r.reason}" if r.reason else "") + (alias_mark if r.serves_alias else "")
        if r.excluded_nodes:
            decision += f"; excluded from quantization: {', '.join(r.excluded_nodes)}"
        scored, timed_ = bool(r.metrics), r.throughput_per_s > 0  # skipped: neither; rejected on accuracy: not timed
        rows.append(
            [
                r.name,
                f"{r.bytes / 1e6:.2f} MB" if r.bytes else "-",
                f"{r.metrics[primary_metric]:.4f}" if scored else "-",
                f"{100 * r.metric_delta_relative:+.2f}%" if scored else "-",
                f"{r.max_abs_diff:.2e} / {r.mean_abs_diff:.2e}" if scored else "-",
                f"{r.top1_agreement:.3f}" if scored else "-",
                f"{r.latency_p50_ms:.2f} ms" if timed_ else "-",
                f"{r.throughput_per_s:.0f}/s" if timed_ else "-",
                _speedup_cell(r) if timed_ else "-",
                decision,
            ]
        )
    return rows


def _speedup_cell(report: VariantReport) -> str:
    interval = report.speedup_interval
    return f"{report.speedup_vs_fp32:.2f}x" + (f" [{interval[0]:.2f}, {interval[1]:.2f}]" if interval else "")


def table_header(primary_metric: str) -> list[str]:
    return [
        "variant",
        "size",
        primary_metric,
        "vs FP32",
        "max / mean abs diff",
        "top-1 agree",
        "p50 b=1",
        "throughput",
        "speedup [95% interval]",
        "decision",
    ]


def render_table(reports: list[VariantReport], primary_metric: str) -> str:
    """Markdown table of every variant; the row that serves the plain model name is marked."""
    header = table_header(primary_metric)
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in table_rows(reports, primary_metric)]
    return "\n".join(lines)
