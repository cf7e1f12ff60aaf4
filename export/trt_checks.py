"""The checks a built TensorRT engine must pass, as pure functions over arrays: inputs inside its profile, every
output within its precision's tolerance of FP32, and the recipe's metric and the variant gates (`judge`).

`export/trt_engine.py` runs the engine in a child process and hands its outputs here.
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from export.gates import accuracy_gate, speed_gate
from export.variants import PrecisionConfig, VariantReport
from recipes import Recipe


class EngineTolerance(BaseModel):
    """|engine - FP32| <= range_atol * max|FP32 output| + rtol * |FP32 value|, for every element of an output."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    range_atol: float = Field(ge=0, description="absolute tolerance as a fraction of the output's largest magnitude")
    rtol: float = Field(ge=0)


# starting points, not yet measured on a GPU (docs/tensorrt.md); the recipe's metric gate judges accuracy as well
DEFAULT_TOLERANCES: dict[str, EngineTolerance] = {
    "fp32": EngineTolerance(range_atol=1e-3, rtol=1e-3),
    "fp16": EngineTolerance(range_atol=1e-2, rtol=1e-2),
    "bf16": EngineTolerance(range_atol=4e-2, rtol=4e-2),
    "int8-static": EngineTolerance(range_atol=1e-1, rtol=1e-1),
}


def outside_profile(inputs: dict[str, np.ndarray], profiles: dict) -> list[str]:
    problems = []
    for name, array in inputs.items():
        low, high = profiles[name]["min"], profiles[name]["max"]
        if array.ndim != len(low) or any(not a <= size <= b for size, a, b in zip(array.shape, low, high)):
            problems.append(
                f"input '{name}' of shape {list(array.shape)} is outside the engine's profile {low}..{high}"
            )
    return problems


def compare_outputs(
    reference: list[dict[str, np.ndarray]],
    got: list[dict[str, np.ndarray]],
    precision: str,
    overrides: dict[str, EngineTolerance] | None = None,
) -> list[str]:
    """Every output of every batch against FP32 within its tolerance; one line per failing output."""
    mismatches = []
    for name in reference[0]:
        tolerance = (overrides or {}).get(name, DEFAULT_TOLERANCES[precision])
        shapes = [(list(r[name].shape), list(g[name].shape) if name in g else None) for r, g in zip(reference, got)]
        wrong = [(want, have) for want, have in shapes if want != have]
        if wrong:
            mismatches.append(
                f"output '{name}': shape {wrong[0][1]}, expected {wrong[0][0]} (missing or reshaped by the engine)"
            )
            continue
        ref = np.concatenate([r[name].astype(np.float64).ravel() for r in reference])
        error = np.abs(np.concatenate([g[name].astype(np.float64).ravel() for g in got]) - ref)
        allowed = tolerance.range_atol * np.abs(ref).max() + tolerance.rtol * np.abs(ref)
        bad = ~(error <= allowed)  # NaN counts as out of tolerance
        if bad.any():
            worst = int(np.nanargmax(np.where(np.isnan(error), np.inf, error - allowed)))
            mismatches.append(
                f"output '{name}': {bad.mean():.2%} of {bad.size} values out of tolerance, worst |diff| "
                f"{error[worst]:.3g} "
                f"where {allowed[worst]:.3g} is allowed ({precision}: range_atol={tolerance.range_atol}, "
                f"rtol={tolerance.rtol}); "
                f"set tensorrt.tolerances['{name}'] if this error is expected for {precision}"
            )
    return mismatches


def judge(
    recipe: Recipe,
    precision: str,
    reference: list[dict[str, np.ndarray]],
    got: list[dict[str, np.ndarray]],
    targets: list[np.ndarray],
    tolerances: dict[str, EngineTolerance],
    gates: PrecisionConfig,
    throughput: float,
    fp32_throughput: float,
) -> VariantReport:
    """The engine as a variant: the recipe's metric on its outputs and on FP32's, its distance to FP32, and the
    same accuracy and speed gates as every precision variant, plus the per-output numerical check."""
    first = next(iter(reference[0]))  # recipes score their first output
    fp32 = VariantReport(
        name="fp32", metrics=recipe.score([r[first] for r in reference], targets), throughput_per_s=fp32_throughput
    )
    report = VariantReport(
        name=f"tensorrt-{precision}", runtime="tensorrt", runtime_precision=precision, throughput_per_s=throughput
    )
    mismatches = compare_outputs(reference, got, precision, tolerances)
    if any(name not in g or g[name].shape != r[name].shape for r, g in zip(reference, got) for name in r):
        report.status, report.reason = "rejected", "; ".join(mismatches)  # nothing to score
        return report
    report.metrics = recipe.score([g[first] for g in got], targets)
    differences = np.concatenate(
        [np.abs(g[first].astype(np.float64) - r[first]).ravel() for g, r in zip(got, reference)]
    )
    report.max_abs_diff, report.mean_abs_diff = float(differences.max()), float(differences.mean())
    report.top1_agreement = float(
        np.concatenate([g[first].argmax(-1) == r[first].argmax(-1) for g, r in zip(got, reference)]).mean()
    )
    reasons = ["numerical check: " + "; ".join(mismatches)] if mismatches else []
    reasons.append(accuracy_gate(recipe, report, fp32, gates.accuracy_budget) or "")
    if gates.min_speedup and fp32_throughput:
        slow = speed_gate(report, fp32, gates.min_speedup)
        reasons.append(f"{slow} (TensorRT on the GPU vs ONNX Runtime FP32 on the CPU)" if slow else "")
    reasons = [reason for reason in reasons if reason]
    report.status, report.reason = ("rejected", "; ".join(reasons)) if reasons else ("accepted", "")
    return report
