"""Every precision candidate beside what users pick instead, timed round-robin in one process.

    .venv/bin/python benchmarks/precision.py                     # demo size; trains it first (~2.5 min)
    .venv/bin/python benchmarks/precision.py --weights runs/<run>/train/model.pt   # reuse a demo run's weights
    .venv/bin/python benchmarks/precision.py --size 10m --steps 100 --samples 512   # 6 x 384, context 256 (10.8 M)

stdlib-gpt, batch 8. The pipeline's precision stage builds, scores and gates every variant (with its runtime
settings searched, as in a run); then, in one process, round-robin, three repetitions of interleaved blocks:

- peers: torch eager FP32, torch eager with bf16 autocast, torch.compile FP32 (inductor, in-process), ONNX Runtime
  FP32 and OpenVINO FP32 with its default settings (`compile_model(onnx, "CPU")`, nothing set);
- every variant the stage built, in its runtime with the settings it kept.

Prints samples/s (median of the three repetitions, and their spread), next-byte accuracy on the validation windows
against FP32's, and the ratio of the served best variant (the one the stage selects) to the best peer whose
accuracy is within 0.5% of FP32's. Goals on this machine class: >= 2x at the demo size, >= 2.5x at 10 M.
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
from export.gates import settings_cell  # noqa: E402
from export.onnx_export import ExportConfig, export_onnx  # noqa: E402
from export.variants import PrecisionConfig, build_and_score  # noqa: E402
from recipes import build_recipe  # noqa: E402
from recipes.evaluation import load_trained  # noqa: E402
from training.loop import TrainingConfig, train  # noqa: E402

SIZES = {
    "demo": {},  # 4 layers, width 128, 4 heads, context 128
    "10m": {"n_layer": 6, "n_embd": 384, "n_head": 6, "block_size": 256},
}
GOALS = {"demo": 2.0, "10m": 2.5}
PEER_ACCURACY = 0.005  # a peer counts if its accuracy is within 0.5% (relative) of FP32's


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


def _openvino_default(onnx_path: str):
    """OpenVINO as a user gets it: nothing set."""
    import openvino as ov

    compiled = ov.Core().compile_model(onnx_path, "CPU")
    request = compiled.create_infer_request()
    return lambda feeds: [request.infer(feeds)[compiled.outputs[0]]]


def _versions() -> str:
    import nncf
    import openvino

    return (
        f"torch {torch.__version__}, onnxruntime {ort.__version__}, openvino {openvino.get_version()}, "
        f"nncf {nncf.__version__}, {torch.get_num_threads()} threads"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="demo")
    parser.add_argument("--weights", help="model.pt of a run of this size; default: train one now")
    parser.add_argument("--steps", type=int, default=600, help="training steps when there are no --weights")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=30, help="timed calls per runner and repetition")
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--samples", type=int, default=2048, help="validation windows scored per runtime")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()

    recipe = build_recipe("stdlib-gpt", SIZES[args.size])
    work = Path(tempfile.mkdtemp(prefix="tes-precision-"))
    weights = (
        args.weights or train(recipe, TrainingConfig(steps=args.steps, resume=False), work / "train").output.weights
    )
    model = load_trained(recipe, weights).eval()
    onnx_path = export_onnx(recipe, model, work, ExportConfig()).output.onnx
    # the pipeline's own stage (accuracy gate at the same 0.5% as the peers, retries, settings search); no speed
    # gate, so every variant is timed
    config = PrecisionConfig(min_speedup=0, accuracy_budget=PEER_ACCURACY, score_samples=args.samples)
    reports = build_and_score(recipe, onnx_path, work / "variants", config, weights)

    batches = list(recipe.eval_batches(32, args.samples))
    inputs = recipe.example_inputs(args.batch)
    tokens = torch.from_numpy(inputs["tokens"])
    compiled = torch.compile(model)

    def torch_runner(module, bf16: bool = False):
        @torch.no_grad()
        def run(feeds):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                return [module(torch.from_numpy(feeds["tokens"])).float().numpy()]

        return run

    peers = {
        "torch eager fp32": torch_runner(model),
        "torch eager bf16 autocast": torch_runner(model, bf16=True),
        "torch.compile fp32": torch_runner(compiled),
        "onnxruntime fp32": lambda feeds, s=open_session(onnx_path): s.run(None, feeds),
        "openvino fp32 defaults": _openvino_default(onnx_path),
    }
    candidates = {}
    for report in reports:
        if report.path and report.status != "skipped":
            session = open_session(
                report.path, report.runtime, report.runtime_precision, settings=report.runtime_settings()
            )
            candidates[f"{report.name} ({settings_cell(report)})"] = lambda feeds, s=session: s.run(None, feeds)
    runners = {**peers, **candidates}
    accuracy = {
        name: recipe.score([run(b.inputs)[0] for b in batches], [b.targets for b in batches])["next_byte_accuracy"]
        for name, run in runners.items()
    }
    repetitions = [
        timed_round_robin({name: lambda r=run: r(inputs) for name, run in runners.items()}, args.repeats)
        for _ in range(args.repetitions)
    ]
    throughput = {name: [args.batch / rep[name] for rep in repetitions] for name in runners}

    print(
        f"stdlib-gpt {args.size} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters), batch "
        f"{args.batch}, context {tokens.shape[1]}, {args.repetitions} repetitions x {args.repeats} calls; {_versions()}"
    )
    for report in reports:
        if report.status != "accepted":
            print(f"({report.name} {report.status}: {report.reason})")
    base = accuracy["onnxruntime fp32"]
    print(f"{'runtime':72s} {'samples/s':>9s} {'spread':>13s} {'accuracy':>8s} {'vs FP32':>8s}")
    for name in runners:
        values = throughput[name]
        print(
            f"{name[:72]:72s} {statistics.median(values):9.1f} {min(values):6.0f}..{max(values):<5.0f} "
            f"{accuracy[name]:8.4f} {100 * (accuracy[name] - base) / base:+7.2f}%"
        )
    eligible = {n: statistics.median(throughput[n]) for n in peers if (base - accuracy[n]) / base <= PEER_ACCURACY}
    best_peer = max(eligible, key=eligible.get)
    served = next(r for r in reports if r.serves_alias)
    served_name = next(name for name in candidates if name.startswith(served.name + " ("))
    ratio = statistics.median(throughput[served_name]) / eligible[best_peer]
    per_repetition = [t / p for t, p in zip(throughput[served_name], throughput[best_peer])]
    print(
        f"\nserved best variant: {served_name}\nbest peer within {100 * PEER_ACCURACY:.1f}% of FP32's accuracy: "
        f"{best_peer}\nratio {ratio:.2f}x (per repetition {', '.join(f'{r:.2f}' for r in per_repetition)}); "
        f"goal >= {GOALS[args.size]:.1f}x"
    )
    if args.json:
        Path(args.json).write_text(
            json.dumps({"throughput": throughput, "accuracy": accuracy, "ratio": ratio}, indent=2)
        )


if __name__ == "__main__":
    main()
