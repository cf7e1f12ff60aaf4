"""Dynamic batching: throughput at concurrency 16 with Triton's dynamic batcher over without it.

    .venv/bin/python benchmarks/dynamic_batching.py --rounds 3

stdlib-gpt at its demo size (random weights: speed does not depend on them), context 128, over gRPC. The two
configurations are served side by side by one Triton and measured in alternation; the ratio of the medians is
printed (goal: at least 2.5x).
"""

import argparse
import statistics

from _common import serving, trained_onnx
from serving import loadgen
from serving.repository import ServingConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--delay-us", type=int, default=2000, help="max queue delay of the dynamic batcher")
    args = parser.parse_args()
    recipe, onnx_path = trained_onnx("stdlib-gpt", steps=0)
    inputs = [batch.inputs for batch in recipe.eval_batches(1, 64)]
    configs = {"batched": ServingConfig(max_batch_size=32, max_queue_delay_microseconds=args.delay_us),
               "unbatched": ServingConfig(max_batch_size=32, dynamic_batching=False)}
    settings = loadgen.LoadSettings(window_s=3.0, warmup_s=2.0, max_windows=6)
    throughput: dict[str, list[float]] = {name: [] for name in configs}
    with serving({f"gpt-{name}": (onnx_path, config) for name, config in configs.items()}) as server:
        for round_number in range(args.rounds):
            for name in configs:
                point = loadgen.measure(server.grpc_url, "grpc", f"gpt-{name}", inputs, concurrency=args.concurrency, settings=settings)
                throughput[name].append(point.throughput)
                print(f"round {round_number + 1} {name:9s}: {point.throughput:7.1f} req/s, p50 {point.latency_ms['p50']:.1f} ms, "
                      f"p99 {point.latency_ms['p99']:.1f} ms, server queue {point.server_us.get('queue', 0) / 1e3:.1f} ms, "
                      f"client {point.client_cpu_cores:.2f} cores{'' if point.stable else ', unstable'}")
    batched, unbatched = statistics.median(throughput["batched"]), statistics.median(throughput["unbatched"])
    print(f"\nconcurrency {args.concurrency}, gRPC, stdlib-gpt demo size (1 x 128 bytes per request): "
          f"dynamic batching {batched:.1f} req/s vs none {unbatched:.1f} req/s = {batched / unbatched:.2f}x")


if __name__ == "__main__":
    main()
