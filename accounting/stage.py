"""The run's compute and energy ledger, filled around the pipeline's stages (see `core/ledger.py`).

Each stage is measured as it runs (wall time, peak memory, energy measured or estimated); afterwards the
training entry gets its FLOPs (counted on a real step, extrapolated, beside 6·N·D) and its device peak, the
benchmark adds joules per inference at each load point, and the precision variants get their pay-back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from accounting.energy import Energy
from accounting.flops import inference_flops_per_sample, six_n_d, tokens_per_step, training_step_flops
from accounting.ledger import Entry, Ledger, payback_inferences, plot_costs, render_markdown
from accounting.peaks import cpu_peak_flops, gpu_peak_flops, measured_matmul_flops
from bench.stage import BenchmarkOutput
from core.files import atomic_write_json
from core.results import StageResult
from export.variants import PrecisionOutput
from recipes import Recipe
from training.loop import TrainOutput


def measured(ledger: Ledger, call: Callable, device: str) -> Callable:
    """`call` with every stage inside a ledger entry."""

    def measured_call(stage: str, function: Callable, *args: Any, **options: Any) -> StageResult:
        on_gpu = stage == "train" and device.startswith("cuda")
        if on_gpu:
            import torch

            torch.cuda.reset_peak_memory_stats()
        with ledger.measure(stage, device=device if stage == "train" else "cpu") as entry:
            result = call(stage, function, *args, **options)
        if on_gpu:
            entry.peak_device_mb = torch.cuda.max_memory_allocated() / 1e6
        if _reused(result):
            entry.notes.append(f"{result.reason}: no compute spent")
        elif result.status.value == "skipped":
            entry.notes.append(f"skipped: {result.reason}")
        return result

    return measured_call


def _reused(result: StageResult) -> bool:
    """Made by an earlier run (cached) or by this run before it was resumed: no compute spent now."""
    return result.reason.startswith(("cached", "resumed"))


def _entry(ledger: Ledger, stage: str) -> Entry | None:
    return next((e for e in ledger.entries if e.stage == stage), None)


def enrich(
    ledger: Ledger,
    recipe: Recipe,
    batch_size: int,
    train: StageResult[TrainOutput] | None,
    precision: StageResult[PrecisionOutput] | None,
    bench: StageResult[BenchmarkOutput] | None,
) -> dict[str, Any]:
    """FLOPs (training at `batch_size` samples per step), peaks, serving energy and pay-back; returns the extra
    figures kept beside the entries."""
    extra: dict[str, Any] = {"matmul_fp32_flops_per_s_measured": measured_matmul_flops()}
    # FLOPs do not depend on the weights; an ONNX file the user brought has no torch model to count them on (0)
    model = recipe.build_model() if getattr(recipe, "has_torch_model", True) else None
    per_sample = inference_flops_per_sample(recipe, model) if model is not None else 0
    extra["inference_flops_per_sample"] = per_sample
    entry = _entry(ledger, "train")
    if model is not None and train and train.output and entry and not _reused(train):
        steps = train.output.steps
        entry.flops = training_step_flops(recipe, model, batch_size) * steps
        entry.flops_method = f"torch FlopCounterMode on one real step x {steps} steps (validation passes not counted)"
        if recipe.name == "stdlib-gpt":
            rule = six_n_d(model, tokens_per_step(recipe, batch_size) * steps)
            entry.notes.append(f"6·N·D rule of thumb: {rule:.3g} FLOPs (counted / rule = {entry.flops / rule:.3f})")
        device, bf16 = train.output.device, train.output.autocast_bf16
        entry.peak_flops_per_s, entry.peak_method = (
            gpu_peak_flops(_gpu_name(), "bf16" if bf16 else "fp32")
            if device.startswith("cuda")
            else cpu_peak_flops("fp32")
        )
    _per_variant(ledger, precision, per_sample)
    extra["serving"] = _serving(ledger, bench, per_sample)
    extra["payback"] = _payback(ledger, precision)
    return extra


def _per_variant(ledger: Ledger, precision: StageResult[PrecisionOutput] | None, flops_per_sample: int) -> None:
    """One entry per precision variant: its share of the precision stage, split by the CPU time each one took
    (the stage's energy counters are read once, around the whole stage)."""
    entry = _entry(ledger, "precision")
    if not precision or not precision.output or not entry or _reused(precision):
        return
    variants = precision.output.variants
    total_cpu = sum(v.build_cpu_seconds for v in variants) or 1.0
    for variant in variants:
        share = variant.build_cpu_seconds / total_cpu
        energy = {
            name: Energy(
                e.kind,
                e.joules * share if e.joules is not None else None,
                f"{share:.0%} of the precision stage's energy ({e.method})",
            )
            for name, e in entry.energy.items()
        }
        ledger.add(
            Entry(
                stage=f"precision:{variant.name}",
                device=entry.device,
                wall_s=variant.build_seconds,
                peak_host_mb=entry.peak_host_mb,
                busy_cores=variant.build_cpu_seconds / max(variant.build_seconds, 1e-9),
                energy=energy,
                notes=[
                    f"{variant.status}; inference {flops_per_sample:.3g} FLOPs per sample (the same graph; "
                    "precision changes the arithmetic's width, not its count); peak memory is the stage's"
                ],
            )
        )


def note(ledger: Ledger, stage: str, text: str) -> None:
    """A note on `stage`'s entry, when it has one."""
    entry = _entry(ledger, stage)
    if entry is not None:
        entry.notes.append(text)


def _gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else ""


def _serving(ledger: Ledger, bench: StageResult[BenchmarkOutput] | None, flops_per_inference: int) -> list[dict]:
    """Joules per inference at each load point. Measured counters: the benchmark stage's average power over the
    throughput. Otherwise the declared watts per busy core times the cores the client and (when it is local) the
    server kept busy at that point, over the throughput; labelled estimated."""
    entry = _entry(ledger, "benchmark")
    if not bench or not bench.ok or not bench.output or not entry:
        return []
    measured = entry.energy_kind == "measured" and entry.joules
    rows = []
    for point in bench.output.points:
        if point.throughput <= 0:
            continue
        if measured:
            watts, method = entry.joules / entry.wall_s, "measured: the benchmark stage's average power"
        else:
            cores = point.client_cpu_cores + (point.server_cpu_cores or 0.0)
            watts = ledger.prices.cpu_watts_per_busy_core * cores
            method = (
                f"estimated: {ledger.prices.cpu_watts_per_busy_core} W per busy core x {cores:.2f} cores "
                f"({'client + server' if point.server_cpu_cores is not None else 'client only: server not local'})"
            )
        joules = watts / point.throughput
        rows.append(
            {
                "protocol": point.protocol,
                "mode": point.mode,
                "load": point.load,
                "energy_kind": "measured" if measured else "estimated",
                "method": method,
                "joules_per_inference": joules,
                "inferences_per_joule": 1 / joules if joules else None,
                "p50_ms_per_gflop": point.latency_ms.get("p50", 0) / (flops_per_inference / 1e9),
            }
        )
    return rows


def _payback(ledger: Ledger, precision: StageResult[PrecisionOutput] | None) -> list[dict]:
    """Inferences needed for each variant's per-inference saving to repay the energy its build took (its own
    ledger entry). Per-inference energy: the precision stage's average power over the variant's in-process
    throughput at the speed-gate batch."""
    entry = _entry(ledger, "precision")
    if not precision or not precision.output or not entry or not entry.joules:
        return []
    variants = [v for v in precision.output.variants if v.throughput_per_s > 0]
    fp32 = next((v for v in variants if v.name == "fp32"), None)
    if not fp32:
        return []
    watts = entry.joules / entry.wall_s
    rows = []
    for variant in (v for v in variants if v.name != "fp32"):
        own = _entry(ledger, f"precision:{variant.name}")
        build = own.joules if own and own.joules is not None else 0.0
        per_inference, baseline = watts / variant.throughput_per_s, watts / fp32.throughput_per_s
        rows.append(
            {
                "variant": variant.name,
                "build_joules": build,
                "energy_kind": entry.energy_kind,
                "joules_per_inference": per_inference,
                "fp32_joules_per_inference": baseline,
                "payback_inferences": payback_inferences(build, baseline, per_inference),
            }
        )
    return rows


def write(ledger: Ledger, extra: dict[str, Any], json_path: Path, plot_path: Path) -> tuple[dict[str, str], str]:
    """`ledger.json` and its plot; returns their paths and the ledger as markdown."""
    data = {**ledger.to_dict(), **extra}
    atomic_write_json(json_path, data)
    plot_costs(plot_path, data)
    return {"json": str(json_path), "plot": str(plot_path)}, render_ledger(data)


def render_ledger(data: dict[str, Any]) -> str:
    lines = [render_markdown(data)]
    lines.append(
        f"Inference: {data['inference_flops_per_sample']:.3g} FLOPs per sample; this machine's numpy FP32 matmul "
        "reaches "
        f"{data['matmul_fp32_flops_per_s_measured'] / 1e9:.1f} GFLOP/s."
    )
    for row in data.get("serving", []):
        lines.append(
            f"- serving {row['protocol']} {row['mode']} {row['load']:.0f}: {row['joules_per_inference']:.4f} "
            "J/inference "
            f"({row['inferences_per_joule']:.1f} inferences/J; {row['method']}), p50 {row['p50_ms_per_gflop']:.3f} "
            "ms per GFLOP"
        )
    for row in data.get("payback", []):
        pays = (
            f"{row['payback_inferences']:.3g} inferences"
            if row["payback_inferences"]
            else "never (it is not cheaper per inference)"
        )
        lines.append(
            f"- pay-back of {row['variant']}: {pays} ({row['energy_kind']}; its build took {row['build_joules']:.1f} J)"
        )
    return "\n".join(lines) + "\n"
