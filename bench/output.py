"""Benchmark outputs: JSON and CSV with every number, a markdown report, and PNG plots."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from bench.loadgen import PERCENTILES, STAT_PARTS, LoadPoint
from core.files import atomic_write, atomic_write_json, atomic_write_text

CSV_COLUMNS = [
    "model",
    "protocol",
    "mode",
    "load",
    "requests",
    "errors",
    "throughput",
    *[f"p{q}_ms" for q in PERCENTILES],
    "mean_ms",
    *[f"p{q}_ci_low_ms" for q in PERCENTILES],
    *[f"p{q}_ci_high_ms" for q in PERCENTILES],
    *[f"server_{part}_us" for part in STAT_PARTS],
    "client_cpu_cores",
    "delayed_fraction",
    "windows",
    "stable",
    "warnings",
]


def _row(point: LoadPoint) -> dict:
    row = {
        key: getattr(point, key)
        for key in (
            "model",
            "protocol",
            "mode",
            "load",
            "requests",
            "errors",
            "throughput",
            "client_cpu_cores",
            "delayed_fraction",
            "windows",
            "stable",
        )
    }
    row.update({f"{name}_ms": value for name, value in point.latency_ms.items()})
    for name, (low, high) in point.latency_ci_ms.items():
        row[f"{name}_ci_low_ms"], row[f"{name}_ci_high_ms"] = low, high
    row.update({f"server_{part}_us": value for part, value in point.server_us.items()})
    row["warnings"] = " | ".join(point.warnings)
    return row


def write_csv(path: Path, points: list[LoadPoint]) -> Path:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for point in points:
        writer.writerow(_row(point))
    return atomic_write_text(path, buffer.getvalue())


def render_markdown(points: list[LoadPoint], baselines: list[dict], system: dict, extra: str = "") -> str:
    lines = [
        "# Serving benchmark",
        "",
        f"System: {system['cpu']['model']}, {system['cpu']['logical_cores']} logical cores "
        f"({', '.join(system['cpu']['flags']) or 'no AVX-512'}), {system['memory_gb']} GB, "
        f"GPUs: {', '.join(g['name'] for g in system['gpus']) or 'none'}, {system['os']}. Versions: "
        + ", ".join(f"{k} {v}" for k, v in system["versions"].items() if v),
        "",
    ]
    if baselines:
        lines += [
            "## In-process baselines (same inputs)",
            "",
            "| model | runtime | p50 batch 1 | throughput at batch |",
            "| --- | --- | --- | --- |",
        ]
        lines += [
            f"| {b['model']} | {b['runtime']} | {b['latency_p50_ms']:.3f} ms | {b['throughput_per_s']:.0f}/s (batch "
            f"{b['batch']}) |"
            for b in baselines
        ]
        lines.append("")
    lines += [
        "## Served",
        "",
        "| model | protocol | load | throughput | p50 [95% CI] | p90 | p95 | p99 [95% CI] | server queue / infer | "
        "client CPU | stable |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for p in points:
        load = f"c={p.load:.0f}" if p.mode == "concurrency" else f"{p.load:.0f}/s"
        lat, ci = p.latency_ms, p.latency_ci_ms
        server = (
            f"{p.server_us.get('queue', 0):.0f} / {p.server_us.get('compute_infer', 0):.0f} us" if p.server_us else "-"
        )
        lines.append(
            f"| {p.model} | {p.protocol} | {load} | {p.throughput:.1f}/s | {lat.get('p50', 0):.2f} "
            f"[{ci.get('p50', (0, 0))[0]:.2f}, "
            f"{ci.get('p50', (0, 0))[1]:.2f}] ms | {lat.get('p90', 0):.2f} | {lat.get('p95', 0):.2f} | "
            f"{lat.get('p99', 0):.2f} "
            f"[{ci.get('p99', (0, 0))[0]:.2f}, {ci.get('p99', (0, 0))[1]:.2f}] | {server} | {p.client_cpu_cores:.2f} | "
            f"{'yes' if p.stable else 'NO'} |"
        )
    warnings = sorted({w for p in points for w in p.warnings})
    if warnings:
        lines += ["", "Warnings:", *[f"- {w}" for w in warnings]]
    return "\n".join(lines + ["", extra]).rstrip() + "\n"


def plot(path: Path, points: list[LoadPoint]) -> Path | None:
    """Latency vs throughput per model and protocol (closed loop); p99 vs offered rate (open loop)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    series: dict[tuple, list[LoadPoint]] = {}
    for point in points:
        series.setdefault((point.model, point.protocol, point.mode), []).append(point)
    for (model, protocol, mode), group in sorted(series.items()):
        group = sorted(group, key=lambda p: p.load)
        if mode == "concurrency":
            left.plot(
                [p.throughput for p in group],
                [p.latency_ms.get("p50", 0) for p in group],
                "o-",
                label=f"{model} {protocol} p50",
            )
            left.plot(
                [p.throughput for p in group],
                [p.latency_ms.get("p99", 0) for p in group],
                "x--",
                label=f"{model} {protocol} p99",
            )
        else:
            right.plot(
                [p.load for p in group], [p.latency_ms.get("p99", 0) for p in group], "o-", label=f"{model} {protocol}"
            )
    left.set(xlabel="throughput (requests/s)", ylabel="latency (ms)", title="closed loop: latency vs throughput")
    right.set(
        xlabel="offered rate (requests/s, Poisson)", ylabel="p99 latency (ms)", title="open loop: p99 vs offered rate"
    )
    for axes in (left, right):
        axes.grid(alpha=0.3)
        if axes.lines:
            axes.legend(fontsize=7)
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, dpi=110, format="png"))
    plt.close(figure)
    return path


def write_all(
    folder: Path, points: list[LoadPoint], baselines: list[dict], system: dict, extra: dict | None = None
) -> dict[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(
        folder / "benchmark.json",
        {"system": system, "baselines": baselines, "points": [p.to_dict() for p in points], **(extra or {})},
    )
    write_csv(folder / "benchmark.csv", points)
    markdown = render_markdown(points, baselines, system, (extra or {}).get("notes", ""))
    atomic_write_text(folder / "benchmark.md", markdown)
    plot(folder / "benchmark.png", points)
    return {
        "json": str(folder / "benchmark.json"),
        "csv": str(folder / "benchmark.csv"),
        "markdown": str(folder / "benchmark.md"),
        "plot": str(folder / "benchmark.png"),
    }
