"""Scoring, gating and selection of precision variants (`export/variants.py` builds them), and the table that
reports them.

`score` puts the recipe's metric and the distance to FP32 on a variant's report; `accuracy_gate` and `speed_gate`
say why a variant may not be deployed (None: it may); `select` picks the accepted variant that serves the plain
model name; `table_header` / `table_rows` / `render_table` show every variant with its decision.
"""

from __future__ import annotations

import statistics
from typing import TYPE_CHECKING, Sequence

import numpy as np

from core.stats import percentile_ci
from recipes import Recipe

if TYPE_CHECKING:
    from export.variants import Policy, VariantReport


def first_outputs(session, batches: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
    return [session.run(None, inputs)[0].astype(np.float32) for inputs in batches]


def score(recipe: Recipe, report: VariantReport, session, batches: list, reference: list[np.ndarray]) -> None:
    """The recipe's metric on validation batches, and the distance of the outputs to FP32's."""
    outputs = first_outputs(session, [b.inputs for b in batches])
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
                settings_cell(r),
                decision,
            ]
        )
    return rows


def _speedup_cell(report: VariantReport) -> str:
    interval = report.speedup_interval
    return f"{report.speedup_vs_fp32:.2f}x" + (f" [{interval[0]:.2f}, {interval[1]:.2f}]" if interval else "")


def settings_cell(report: VariantReport) -> str:
    """What the variant runs with: the runtime, its precision and any non-default setting (and the method)."""
    parts = [report.runtime + (f" {report.runtime_precision}" if report.runtime_precision else "")]
    parts += [f"{key}={value}" for key, value in report.settings.items()]
    if report.method:
        parts.append(report.method)
    timed_settings = sum(1 for entry in report.settings_tried if "throughput_per_s" in entry)
    if timed_settings > 1:
        parts.append(f"best of {timed_settings}")
    return ", ".join(parts)


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
        "runtime settings",
        "decision",
    ]


def render_table(reports: list[VariantReport], primary_metric: str) -> str:
    """Markdown table of every variant; the row that serves the plain model name is marked."""
    header = table_header(primary_metric)
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in table_rows(reports, primary_metric)]
    return "\n".join(lines)
