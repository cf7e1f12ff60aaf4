"""Precision variants against FP32 ONNX Runtime and torch eager, side by side in one run.

    .venv/bin/python benchmarks/precision.py                       # trains the demo-size stdlib-gpt first (~2.5 min)
    .venv/bin/python benchmarks/precision.py --weights runs/<run>/train/model.pt   # reuse a demo run's weights

stdlib-gpt at its demo size, batch 8, context 128. Prints throughput (samples/s) of torch eager FP32, torch eager
with bf16 autocast (AMX on CPUs that have it), and every ONNX Runtime variant, all timed round-robin on the same
inputs, plus each variant's next-byte accuracy against FP32's. Goals: best INT8 >= 2x FP32 ORT within
1% relative accuracy; best deployable variant faster than torch eager bf16.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.runtimes import open_session  # noqa: E402
from export.onnx_export import ExportConfig, export_onnx  # noqa: E402
from export.variants import PrecisionConfig, build_and_score  # noqa: E402
from recipes import build_recipe  # noqa: E402
from recipes.evaluation import load_trained  # noqa: E402
from training.loop import TrainingConfig, train  # noqa: E402


def timed_round_robin(runners: dict, repeats: int, block: int = 6, rest_s: float = 0.25) -> dict[str, float]:
    """Median seconds per call of each runner. Runners take turns in blocks of `block` calls, so slow drifts of
    the machine hit all alike. Before each block the process rests `rest_s` and the first call is not counted:
    the runtime that ran just before (torch's OpenMP pool, ONNX Runtime's, OpenVINO's) spin-waits for a while
    after its work and would otherwise take the cores from the next one."""
    for run in runners.values():
        run()
        run()
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(max(1, repeats // (block - 1))):
        for name, run in runners.items():
            time.sleep(rest_s)
            for call in range(block):
                start = time.perf_counter()
                run()
                if call:
                    times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def _openvino_version() -> str:
    try:
        import openvino
    except ImportError:
        return "absent"
    return openvino.get_version()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", help="model.pt of a demo-size stdlib-gpt run; default: train one now")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--calibration", default="minmax", choices=["minmax", "entropy", "percentile"])
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()

    recipe = build_recipe("stdlib-gpt", {})  # the demo size: 4 layers, width 128, 4 heads, context 128
    work = Path(tempfile.mkdtemp(prefix="tes-precision-"))
    weights = (
        args.weights or train(recipe, TrainingConfig(steps=args.steps, resume=False), work / "train").output.weights
    )
    model = load_trained(recipe, weights)
    onnx_path = export_onnx(recipe, model, work, ExportConfig()).output.onnx
    # the pipeline's own accuracy gate and retries (excluding drifting nodes), no speed gate: every variant is timed
    config = PrecisionConfig(min_speedup=0, calibration_method=args.calibration)
    reports = build_and_score(recipe, onnx_path, work / "variants", config)

    inputs = recipe.example_inputs(args.batch)  # (8, 128) held-out bytes
    tokens = torch.from_numpy(inputs["tokens"])
    runners = {}

    @torch.no_grad()
    def torch_eager(bf16: bool):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            model(tokens)

    runners["torch eager fp32"] = lambda: torch_eager(False)
    runners["torch eager bf16 autocast"] = lambda: torch_eager(True)
    for report in reports:
        if report.path:
            session = open_session(
                report.path, report.runtime, report.runtime_precision
            )  # OpenVINO variants in OpenVINO
            runners[f"{report.runtime} {report.name}"] = lambda s=session: s.run(None, inputs)
    seconds = timed_round_robin(runners, args.repeats)

    fp32_ort = seconds["onnxruntime fp32"]
    accuracy = {f"{r.runtime} {r.name}": r.metrics.get("next_byte_accuracy") for r in reports}
    base_accuracy = accuracy["onnxruntime fp32"]
    print(
        f"stdlib-gpt demo size, batch {args.batch}, context {tokens.shape[1]}, {args.repeats} round-robin repeats, "
        f"torch {torch.__version__}, onnxruntime {ort.__version__}, openvino {_openvino_version()}, "
        f"{torch.get_num_threads()} threads"
    )
    for report in reports:
        if report.status != "accepted":
            print(f"({report.name} {report.status}: {report.reason})")
        if report.excluded_nodes:
            print(
                f"({report.name}: excluded from quantization after the accuracy gate: "
                f"{', '.join(report.excluded_nodes)})"
            )
    print(
        f"{'runtime':32s} {'samples/s':>10s} {'vs ORT fp32':>12s} {'vs torch bf16':>14s} {'accuracy':>9s} "
        f"{'rel. to fp32':>12s}"
    )
    for name, value in seconds.items():
        acc = accuracy.get(name)
        acc_text = (
            f"{acc:9.4f} {100 * (acc - base_accuracy) / base_accuracy:+11.2f}%"
            if acc is not None
            else f"{'-':>9s} {'-':>12s}"
        )
        print(
            f"{name:32s} {args.batch / value:10.1f} {fp32_ort / value:11.2f}x "
            f"{seconds['torch eager bf16 autocast'] / value:13.2f}x {acc_text}"
        )
    accepted = {f"{r.runtime} {r.name}" for r in reports if r.status == "accepted"}
    int8 = {name: value for name, value in seconds.items() if "int8" in name and name in accepted}
    if int8:
        best = min(int8, key=int8.get)
        print(
            f"\nbest accepted INT8 (within {100 * config.accuracy_budget:.0f}% of FP32's accuracy): {best}, "
            f"{fp32_ort / int8[best]:.2f}x FP32 ORT throughput (goal >= 2x)"
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps({"seconds_per_batch": seconds, "accuracy": accuracy, "batch": args.batch}, indent=2)
        )


if __name__ == "__main__":
    main()
