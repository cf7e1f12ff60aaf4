"""Cross-check: our load generator (`bench.loadgen.measure`) against Triton's perf_analyzer, side by side.

    sudo apt-get install libb64-0d                                   # perf_analyzer links against it
    .venv/bin/pip install nvidia-cuda-runtime-cu12==12.9.79          # it also wants libcudart.so.12 (not used on CPU)
    .venv/bin/python benchmarks/perf_analyzer_check.py               # both recipes, gRPC and HTTP, c=1 and 4
    .venv/bin/python benchmarks/perf_analyzer_check.py --model digits-cnn --protocol grpc --concurrency 1 --rounds 3

`tritonclient==2.51.0` ships the `perf_analyzer` binary in `.venv/bin`. One private Triton serves the models;
for every model, protocol and concurrency both tools measure the same held-out samples (`--input-data`), with
the same window length and the same stability rule (last three windows within 10%, on p50 and throughput),
taking turns for `--rounds` rounds so machine noise hits both alike. Printed: the median of each tool's rounds,
the ratios (goal: within 10%), and the transport floor (median liveness round trip of a Python client over that
protocol): the part of a small model's latency that is the client, not the server.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
from _common import WORK, serving, trained_onnx

from bench import loadgen, senders
from serving.repository import ServingConfig


def perf_analyzer(url: str, protocol: str, model: str, concurrency: int, data_file: Path, window_ms: int) -> dict:
    """perf_analyzer's throughput and p50 for one point, or the reason it gave none."""
    binary = Path(sys.executable).parent / "perf_analyzer"
    cudart = next(Path(sys.prefix).glob("lib/python3*/site-packages/nvidia/cuda_runtime/lib"), None)
    env = {
        **os.environ,
        "LD_LIBRARY_PATH": ":".join(filter(None, [str(cudart or ""), os.environ.get("LD_LIBRARY_PATH", "")])),
    }
    out = WORK / f"pa-{model}-{protocol}-{concurrency}.csv"
    out.unlink(missing_ok=True)
    command = [
        str(binary),
        "-m",
        model,
        "-u",
        url,
        "-i",
        protocol,
        "--concurrency-range",
        f"{concurrency}:{concurrency}",
        "-p",
        str(window_ms),
        "--percentile",
        "50",
        "--stability-percentage",
        "10",
        "--max-trials",
        "10",
        "--input-data",
        str(data_file),
        "-f",
        str(out),
    ]
    result = subprocess.run(command, check=False, env=env, capture_output=True, text=True, timeout=600)
    if result.returncode != 0 or not out.is_file():
        reason = "unstable" if "stable measurement" in result.stdout + result.stderr else f"exit {result.returncode}"
        if not binary.is_file() or "error while loading shared libraries" in result.stderr:
            raise SystemExit(
                f"perf_analyzer cannot run; see the set-up in this script's docstring:\n{result.stderr[-2000:]}"
            )
        return {"throughput": float("nan"), "p50_ms": float("nan"), "note": reason}
    row = next(csv.DictReader(out.open()))
    return {"throughput": float(row["Inferences/Second"]), "p50_ms": float(row["p50 latency"]) / 1e3, "note": ""}


def data_file_for(name: str, inputs: list[dict[str, np.ndarray]]) -> Path:
    """perf_analyzer's --input-data: one entry per sample, shapes without the batch axis (it sends batch 1)."""
    path = WORK / f"pa-inputs-{name}.json"
    entries = [
        {key: {"content": array[0].ravel().tolist(), "shape": list(array.shape[1:])} for key, array in case.items()}
        for case in inputs
    ]
    path.write_text(json.dumps({"data": entries}))
    return path


def floor_ms(protocol: str, url: str, model: str, inputs) -> float:
    sender = senders.open_sender(protocol, url, model, inputs)
    try:
        return senders.transport_floor_ms(sender)
    finally:
        sender.close()


def _median(values: list[float]) -> float:
    """Median of the rounds that gave a figure (perf_analyzer gives none when it cannot stabilize)."""
    finite = [value for value in values if np.isfinite(value)]
    return statistics.median(finite) if finite else float("nan")


def compare(server, model: str, protocol: str, concurrency: int, inputs, data_file: Path, args) -> dict:
    url = server.grpc_url if protocol == "grpc" else server.http_url
    settings = loadgen.LoadSettings(window_s=args.window_ms / 1e3, warmup_s=1.0, max_windows=10, stability=0.10)
    ours, theirs = [], []
    for _ in range(args.rounds):
        ours.append(loadgen.measure(url, protocol, model, inputs, concurrency=concurrency, settings=settings))
        theirs.append(perf_analyzer(url, protocol, model, concurrency, data_file, args.window_ms))
    row = {
        "model": model,
        "protocol": protocol,
        "concurrency": concurrency,
        "ours_throughput": statistics.median(p.throughput for p in ours),
        "ours_p50_ms": statistics.median(p.latency_ms["p50"] for p in ours),
        "ours_unstable": sum(not p.stable for p in ours),
        "pa_throughput": _median([t["throughput"] for t in theirs]),
        "pa_p50_ms": _median([t["p50_ms"] for t in theirs]),
        "pa_unstable": sum(bool(t["note"]) for t in theirs),
        "floor_ms": floor_ms(protocol, url, model, inputs),
    }
    row["throughput_ratio"] = row["ours_throughput"] / row["pa_throughput"]
    row["p50_ratio"] = row["ours_p50_ms"] / row["pa_p50_ms"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model", nargs="+", default=["digits-cnn", "stdlib-gpt"], choices=["digits-cnn", "stdlib-gpt"]
    )
    parser.add_argument("--protocol", nargs="+", default=["grpc", "http"], choices=["grpc", "http"])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--rounds", type=int, default=2, help="turns each tool takes per point; medians are compared")
    parser.add_argument("--window-ms", type=int, default=2000, help="measurement window of both tools")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    models, samples = {}, {}
    for name in args.model:  # random weights: speed does not depend on them; the inputs are real held-out samples
        recipe, onnx_path = trained_onnx(name, steps=0)
        models[name] = (onnx_path, ServingConfig(max_batch_size=64))
        samples[name] = [batch.inputs for batch in recipe.eval_batches(1, 64)]
    rows = []
    with serving(models) as server:
        for name in args.model:
            data_file = data_file_for(name, samples[name])
            for protocol in args.protocol:
                for concurrency in args.concurrency:
                    row = compare(server, name, protocol, concurrency, samples[name], data_file, args)
                    rows.append(row)
                    verdict = (
                        "within 10%"
                        if max(abs(row["throughput_ratio"] - 1), abs(row["p50_ratio"] - 1)) <= 0.10
                        else "NOT within 10%"
                    )
                    print(
                        f"{name:10s} {protocol:4s} c={concurrency:<2d}  tes {row['ours_throughput']:7.1f}/s p50 "
                        f"{row['ours_p50_ms']:6.3f} ms | "
                        f"perf_analyzer {row['pa_throughput']:7.1f}/s p50 {row['pa_p50_ms']:6.3f} ms | ratios: "
                        "throughput "
                        f"{row['throughput_ratio']:.3f}, p50 {row['p50_ratio']:.3f} ({verdict}) | transport floor "
                        f"{row['floor_ms']:.3f} ms | unstable rounds tes {row['ours_unstable']}, pa "
                        f"{row['pa_unstable']}",
                        flush=True,
                    )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
