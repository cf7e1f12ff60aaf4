"""The run report: one markdown page (run folder `report.md`, and a Prefect artifact in flow runs)."""

from __future__ import annotations

from typing import Any

from export.variants import render_table


def _metrics(metrics: dict[str, float]) -> str:
    return ", ".join(f"{key} {value:.4f}" for key, value in metrics.items() if key != "samples")


def render_report(summary: dict[str, Any]) -> str:
    stages = summary["stages"]
    lines = [f"# train-export-serve run `{summary['run_id']}`", "", f"Run folder: `{summary['run_dir']}`", "",
             "| stage | status | seconds | notes |", "| --- | --- | --- | --- |"]
    for name, stage in stages.items():
        lines.append(f"| {name} | {stage['status']} | {stage['seconds']:.1f} | {_stage_note(name, stage)} |")
    train = stages.get("train", {}).get("outputs", {})
    if train:
        lines += ["", f"Trained {train['parameters']:,} parameters for {train['steps']} steps on {train['device']}"
                  f"{' (bf16 autocast)' if train['autocast_bf16'] else ''}.",
                  f"Validation (torch): {_metrics(train['validation'])}."]
    export = stages.get("export", {}).get("outputs", {})
    if export:
        lines += [f"Validation (ONNX Runtime): {_metrics(export['validation_onnxruntime'])}.",
                  f"ONNX opset {export['opset']}; verified on {export['verification']['cases']} input shapes, "
                  f"max |onnx - torch| {max(export['verification']['max_abs_diff'].values()):.2e}."]
    precision = stages.get("precision", {}).get("outputs", {})
    if precision:
        lines += ["", f"## Precision variants (policy `{precision['policy']}`; `{precision['selected']}` serves the plain name)", "",
                  render_table(precision["variants"], precision["primary_metric"]), ""]
    served = stages.get("served_check", {})
    if served.get("status") == "ok":
        out = served["outputs"]
        for protocol in ("http", "grpc"):
            if protocol in out:
                lines.append(f"Served alias over {protocol}: max |served - in-process| {out[protocol]['max_abs_diff_vs_in_process']:.2e}, "
                             f"top-1 agreement with torch FP32 {out[protocol]['top1_agreement_with_torch']:.3f}.")
        for variant, diffs in out.get("variants", {}).items():
            lines.append(f"Served `{variant}` model: max |served - in-process| " + ", ".join(f"{p} {d:.2e}" for p, d in diffs.items()) + ".")
        latency = out["latency"]
        lines.append(f"Latency at concurrency 1 over {latency['protocol']} ({latency['requests']} requests, input "
                     f"{latency['input_shapes']}): served p50 {latency['served_p50_ms']:.2f} ms vs the same model in-process "
                     f"p50 {latency['in_process_p50_ms']:.2f} ms (overhead {latency['serving_overhead_p50_ms']:.2f} ms).")
    bench = stages.get("benchmark", {})
    if bench.get("status") == "ok":
        lines += ["", f"## Serving benchmark (short; full report `{bench['outputs']['outputs']['markdown']}`)", "",
                  "| protocol | load | throughput | p50 | p99 | stable |", "| --- | --- | --- | --- | --- | --- |"]
        for point in bench["outputs"]["points"]:
            load = f"c={point['load']:.0f}" if point["mode"] == "concurrency" else f"{point['load']:.0f}/s"
            lines.append(f"| {point['protocol']} | {load} | {point['throughput']:.1f}/s | {point['latency_ms'].get('p50', 0):.2f} ms | "
                         f"{point['latency_ms'].get('p99', 0):.2f} ms | {'yes' if point['stable'] else 'no'} |")
        for base in bench["outputs"]["baselines"]:
            lines.append(f"\nIn-process {base['model']} ({base['runtime']}): p50 {base['latency_p50_ms']:.2f} ms at batch 1, "
                         f"{base['throughput_per_s']:.0f} samples/s at batch {base['batch']}.")
    return "\n".join(lines) + "\n"


def _stage_note(name: str, stage: dict[str, Any]) -> str:
    if stage["status"] != "ok":
        return stage.get("reason", "")
    out = stage["outputs"]
    if name == "deploy":
        loaded = f"loaded, READY version {out['ready_version']}" if out.get("loaded") else f"not loaded: {out.get('load_skipped')}"
        models = ", ".join(f"`{v['model']}` v{v['version']}" for v in out.get("variants", {}).values())
        return f"`{out['model']}` version {out['version']} -> `{out['selected']}`; {loaded}; variants {models}"
    if name == "precision":
        accepted = [v["name"] for v in out["variants"] if v["status"] == "accepted"]
        return f"accepted {', '.join(accepted)}; serving `{out['selected']}`"
    if name == "train":
        return _metrics(out["validation"])
    if name == "export":
        return f"`{out['onnx']}`"
    return ""
