"""The run report: one markdown page (run folder `report.md`, and a Prefect artifact in flow runs)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from core.results import StageResult
from export.gates import render_table

if TYPE_CHECKING:
    from flows.pipeline import RunSummary


def _metrics(metrics: dict[str, float]) -> str:
    return ", ".join(f"{key} {value:.4f}" for key, value in metrics.items() if key != "samples")


def render_report(summary: RunSummary) -> str:
    lines = [
        f"# train-export-serve run `{summary.run_id}`",
        "",
        f"Run folder: `{summary.run_dir}`",
        "",
        "| stage | status | seconds | notes |",
        "| --- | --- | --- | --- |",
    ]
    lines += [
        f"| {stage.stage} | {stage.status.value} | {stage.seconds:.1f} | {_stage_note(stage)} |"
        for stage in summary.stages()
    ]
    lines += _source_lines(summary.recipe) + _training_lines(summary)
    precision = summary.precision.output
    if precision:
        lines += [
            "",
            f"## Precision variants (policy `{precision.policy}`; `{precision.selected}` serves the plain name)",
            "",
            render_table(list(precision.variants), precision.primary_metric),
            "",
        ]
    lines += _served_lines(summary) + _benchmark_lines(summary)
    return "\n".join(lines) + "\n"


def _source_lines(recipe: dict) -> list[str]:
    """For a model the user brought: that it was not trained, and what the precision gates compared against."""
    if recipe.get("trains", True):
        return []
    metric = recipe.get("primary_metric", "")
    data = "synthetic inputs made from the input description" if recipe.get("synthetic_data") else "your samples"
    basis = (
        f"the task metric `{metric}` on your labelled samples"
        if metric == "accuracy"
        else f"agreement with the FP32 model (`{metric}`) on {data}"
    )
    lines = ["", f"Model `{recipe.get('recipe')}` was brought as it is: not trained. The precision gates used {basis}."]
    lines += [f"- {note}" for note in recipe.get("notes", [])]
    return lines


def _training_lines(summary: RunSummary) -> list[str]:
    lines = []
    train, export = summary.train.output, summary.export.output
    if train:
        lines += [
            "",
            f"Trained {train.parameters:,} parameters for {train.steps} steps on {train.device}"
            f"{' (bf16 autocast)' if train.autocast_bf16 else ''}.",
            f"Validation (torch): {_metrics(train.validation)}.",
        ]
    if export:
        diffs = export.verification.max_abs_diff
        compared = f"max |onnx - torch| {max(diffs.values()):.2e}" if diffs else "runs, batch first, finite outputs"
        lines += [
            f"Validation (ONNX Runtime): {_metrics(export.validation_onnxruntime)}.",
            f"ONNX opset {export.opset}; verified on {export.verification.cases} input shapes: {compared}.",
        ]
        if export.adopted_from:
            lines.append(f"Adopted `{export.adopted_from}` as the FP32 model (nothing was exported).")
    return lines


def _served_lines(summary: RunSummary) -> list[str]:
    served = summary.served_check.output
    if not summary.served_check.ok or served is None:
        return []
    lines = [
        f"Served alias over {protocol}: max |served - in-process| {check.max_abs_diff_vs_in_process:.2e}, "
        f"top-1 agreement with the FP32 reference {check.top1_agreement_with_torch:.3f}."
        for protocol, check in served.protocols.items()
    ]
    for variant, diffs in served.variants.items():
        lines.append(
            f"Served `{variant}` model: max |served - in-process| "
            + ", ".join(f"{p} {d:.2e}" for p, d in diffs.items())
            + "."
        )
    latency = served.latency
    lines.append(
        f"Latency at concurrency 1 over {latency.protocol} ({latency.requests} requests, input "
        f"{latency.input_shapes}): served p50 {latency.served_p50_ms:.2f} ms vs the same model in-process "
        f"p50 {latency.in_process_p50_ms:.2f} ms (overhead {latency.serving_overhead_p50_ms:.2f} ms)."
    )
    return lines


def _benchmark_lines(summary: RunSummary) -> list[str]:
    bench = summary.benchmark.output
    if not summary.benchmark.ok or bench is None:
        return []
    lines = [
        "",
        f"## Serving benchmark (short; full report `{bench.outputs['markdown']}`)",
        "",
        "| protocol | load | throughput | p50 | p99 | stable |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for point in bench.points:
        load = f"c={point.load:.0f}" if point.mode == "concurrency" else f"{point.load:.0f}/s"
        lines.append(
            f"| {point.protocol} | {load} | {point.throughput:.1f}/s | {point.latency_ms.get('p50', 0):.2f} ms | "
            f"{point.latency_ms.get('p99', 0):.2f} ms | {'yes' if point.stable else 'no'} |"
        )
    for base in bench.baselines:
        lines.append(
            f"\nIn-process {base.model} ({base.runtime}): p50 {base.latency_p50_ms:.2f} ms at batch 1, "
            f"{base.throughput_per_s:.0f} samples/s at batch {base.batch}."
        )
    return lines


def _stage_note(stage: StageResult) -> str:
    out = stage.output
    if not stage.ok or out is None:
        return stage.reason
    if stage.stage == "deploy":
        loaded = f"loaded, READY version {out.ready_version}" if out.loaded else f"not loaded: {out.load_skipped}"
        models = ", ".join(f"`{v.model}` v{v.version}" for v in out.variants.values())
        pruned = "; ".join(f"`{m}` v{', v'.join(map(str, numbers))}" for m, numbers in out.pruned.items())
        return (
            f"`{out.model}` version {out.version} -> `{out.selected}`; {loaded}; variants {models}"
            + (f"; old versions deleted: {pruned}" if pruned else "")
            + "".join(f"; {problem}" for problem in out.prune_problems)
        )
    if stage.stage == "precision":
        return f"accepted {', '.join(v.name for v in out.accepted)}; serving `{out.selected}`"
    if stage.stage == "train":
        return _metrics(out.validation)
    if stage.stage == "export":
        return f"`{out.onnx}`"
    return stage.reason
