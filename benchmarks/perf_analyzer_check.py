"""Cross-check: our load generator against Triton's perf_analyzer, same model, protocol and concurrency.

    sudo apt-get install libb64-0d                                   # perf_analyzer links against it
    .venv/bin/pip install nvidia-cuda-runtime-cu12==12.9.79          # it also wants libcudart.so.12 (not used on CPU)
    .venv/bin/python benchmarks/perf_analyzer_check.py --concurrency 1 4

`tritonclient==2.51.0` ships the `perf_analyzer` binary in `.venv/bin`. Both tools send the same held-out
digits-cnn samples over gRPC; their throughput and p50 are printed side by side with the ratio (goal: within 10%).
"""

import argparse
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

from _common import WORK, serving, trained_onnx
from serving import loadgen
from serving.repository import ServingConfig


def perf_analyzer(url: str, model: str, concurrency: int, data_file: Path, window_ms: int) -> dict:
    binary = Path(sys.executable).parent / "perf_analyzer"
    cudart = next(Path(sys.prefix).glob("lib/python3*/site-packages/nvidia/cuda_runtime/lib"), None)
    env = {**os.environ, "LD_LIBRARY_PATH": ":".join(filter(None, [str(cudart or ""), os.environ.get("LD_LIBRARY_PATH", "")]))}
    out = WORK / f"pa-{concurrency}.csv"
    command = [str(binary), "-m", model, "-u", url, "-i", "grpc", "--concurrency-range", f"{concurrency}:{concurrency}",
               "-p", str(window_ms), "--input-data", str(data_file), "-f", str(out), "--percentile", "50"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise SystemExit(f"perf_analyzer failed ({result.returncode}); see the set-up in this script's docstring:\n{result.stderr[-2000:]}")
    row = next(csv.DictReader(out.open()))
    return {"throughput": float(row["Inferences/Second"]), "p50_ms": float(row["p50 latency"]) / 1e3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--window-ms", type=int, default=3000)
    args = parser.parse_args()
    recipe, onnx_path = trained_onnx("digits-cnn", steps=100)
    inputs = [batch.inputs for batch in recipe.eval_batches(1, 64)]
    data_file = WORK / "pa-inputs.json"  # perf_analyzer's format: per-sample shape, without the batch axis
    data_file.write_text(json.dumps({"data": [{"image": {"content": case["image"].ravel().tolist(), "shape": [1, 8, 8]}} for case in inputs]}))
    settings = loadgen.LoadSettings(window_s=args.window_ms / 1e3, warmup_s=1.0, max_windows=10)
    with serving({"digits-cnn": (onnx_path, ServingConfig(max_batch_size=64))}) as server:
        for concurrency in args.concurrency:
            ours = loadgen.measure(server.grpc_url, "grpc", "digits-cnn", inputs, concurrency=concurrency, settings=settings)
            theirs = perf_analyzer(server.grpc_url, "digits-cnn", concurrency, data_file, args.window_ms)
            print(f"gRPC c={concurrency}: tes {ours.throughput:.1f} req/s p50 {ours.latency_ms['p50']:.3f} ms | perf_analyzer "
                  f"{theirs['throughput']:.1f} req/s p50 {theirs['p50_ms']:.3f} ms | throughput ratio {ours.throughput / theirs['throughput']:.3f}, "
                  f"p50 ratio {ours.latency_ms['p50'] / theirs['p50_ms']:.3f}{'' if ours.stable else ' (tes: unstable)'}")


if __name__ == "__main__":
    main()
