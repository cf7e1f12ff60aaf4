"""Dynamic batching: throughput at concurrency 16 with Triton's dynamic batcher over without it.

    .venv/bin/python benchmarks/dynamic_batching.py                 # the goal's figure: demo size, context 128
    .venv/bin/python benchmarks/dynamic_batching.py --context 16    # shorter requests: where the batcher pays

stdlib-gpt at its demo size (random weights: speed does not depend on them; the inputs are held-out bytes, the
last `--context` of each sample), over gRPC. The two configurations are served side by side by one Triton and
measured in alternation; the ratio of the medians is printed (goal: at least 2.5x).

`--variant openvino-int8` serves the QDQ file in OpenVINO instead, as `tes demo` does where that variant passes the
gates. Beside it, the ceiling: the same file in-process in the same runtime at batch 1 and at batch 16, on the same
inputs, with the server idle. No batcher can serve more samples per second than the in-process batch-16 figure,
so (in-process batch-16 throughput) / (served unbatched throughput) bounds the ratio this machine can show.
"""

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
from _common import serving, trained_onnx

from bench import loadgen
from core.runtimes import open_session, runtime_of
from export.quantize import build_int8_static
from serving.repository import ServingConfig


def in_process_throughput(session, inputs: list[dict[str, np.ndarray]], batch: int, seconds: float = 2.0) -> float:
    """Samples per second of back-to-back ONNX Runtime calls at `batch`, built from the held-out inputs."""
    feeds = {name: np.concatenate([case[name] for case in inputs[:batch]]) for name in inputs[0]}
    for _ in range(3):
        session.run(None, feeds)
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        session.run(None, feeds)
        calls += 1
    return calls * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--delay-us", type=int, default=2000, help="max queue delay of the dynamic batcher")
    parser.add_argument(
        "--context", type=int, default=128, help="bytes of context per request (the demo model takes 1..128)"
    )
    parser.add_argument("--instances", type=int, default=1, help="model instances, in both configurations")
    parser.add_argument(
        "--threads", type=int, default=0, help="intra-op threads per instance (0: the runtime's default)"
    )
    parser.add_argument(
        "--variant",
        choices=["fp32", "openvino-int8"],
        default="fp32",
        help="what is served: the FP32 file in ONNX Runtime, or the QDQ file in OpenVINO (what `tes demo` "
        "serves as stdlib-gpt on CPUs where it passes the gates)",
    )
    args = parser.parse_args()
    recipe, onnx_path = trained_onnx("stdlib-gpt", steps=0)
    runtime, precision = runtime_of(args.variant)
    if args.variant == "openvino-int8":
        onnx_path = build_int8_static(
            Path(onnx_path),
            Path(onnx_path).parent,
            recipe.calibration_inputs(128),
            name="openvino-int8",
            symmetric_activations=True,
        )
    inputs = [{"tokens": batch.inputs["tokens"][:, -args.context :]} for batch in recipe.eval_batches(1, 64)]
    common = {
        "max_batch_size": 32,
        "runtime": runtime,
        "runtime_precision": precision or "",
        "instance_count": args.instances,
        "intra_op_threads": args.threads,
    }
    configs = {
        "batched": ServingConfig(**common, max_queue_delay_microseconds=args.delay_us),
        "unbatched": ServingConfig(**common, dynamic_batching=False),
    }
    settings = loadgen.LoadSettings(window_s=3.0, warmup_s=2.0, max_windows=6)
    session = open_session(onnx_path, runtime, precision)
    throughput: dict[str, list[float]] = {name: [] for name in [*configs, "in-process batch 1", "in-process batch 16"]}
    with serving({f"gpt-{name}": (onnx_path, config) for name, config in configs.items()}) as server:
        for round_number in range(args.rounds):
            for name in configs:
                point = loadgen.measure(
                    server.grpc_url, "grpc", f"gpt-{name}", inputs, concurrency=args.concurrency, settings=settings
                )
                throughput[name].append(point.throughput)
                print(
                    f"round {round_number + 1} {name:9s}: {point.throughput:7.1f} req/s, p50 "
                    f"{point.latency_ms['p50']:.1f} ms, "
                    f"p99 {point.latency_ms['p99']:.1f} ms, server queue {point.server_us.get('queue', 0) / 1e3:.1f} "
                    "ms, "
                    f"infer {point.server_us.get('compute_infer', 0) / 1e3:.2f} ms/request, "
                    f"client {point.client_cpu_cores:.2f} cores{'' if point.stable else ', unstable'}",
                    flush=True,
                )
            for batch in (1, 16):
                throughput[f"in-process batch {batch}"].append(in_process_throughput(session, inputs, batch))
    median = {name: statistics.median(values) for name, values in throughput.items()}
    batched, unbatched = median["batched"], median["unbatched"]
    print(
        f"\nin-process {runtime}, same inputs, server idle: batch 1 {median['in-process batch 1']:.1f} samples/s, "
        f"batch 16 {median['in-process batch 16']:.1f} samples/s"
    )
    print(
        f"concurrency {args.concurrency}, gRPC, stdlib-gpt demo size, {args.variant} in {runtime} (1 x "
        f"{args.context} bytes per request): "
        f"dynamic batching {batched:.1f} req/s vs none {unbatched:.1f} req/s = {batched / unbatched:.2f}x (goal >= "
        "2.5x); "
        "ceiling on this machine: in-process batch 16 / served unbatched = "
        f"{median['in-process batch 16'] / unbatched:.2f}x"
    )


if __name__ == "__main__":
    main()
