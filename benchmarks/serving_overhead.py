"""Serving overhead: served p50 at concurrency 1 minus in-process ONNX Runtime p50, same model and input.

    .venv/bin/python benchmarks/serving_overhead.py --requests 2000

digits-cnn (goal: under 1 ms over gRPC on these machines). Requests to the server and in-process runs alternate,
so machine noise hits both alike.
"""

import argparse

from _common import serving, trained_onnx
from serving.check import latency_probe, ort_session
from serving.repository import ServingConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--delay-us", type=int, default=0, help="max queue delay of the dynamic batcher")
    args = parser.parse_args()
    recipe, onnx_path = trained_onnx("digits-cnn", steps=100)
    sample = recipe.example_inputs(1)
    with serving({"digits-cnn": (onnx_path, ServingConfig(max_batch_size=64, max_queue_delay_microseconds=args.delay_us))}) as server:
        for protocol, url in (("grpc", server.grpc_url), ("http", server.http_url)):
            result = latency_probe(url, protocol, "digits-cnn", sample, ort_session(onnx_path), requests=args.requests)
            print(f"{protocol:4s} c=1, {args.requests} requests, input {result['input_shapes']}: served p50 {result['served_p50_ms']:.3f} ms, "
                  f"in-process ONNX Runtime p50 {result['in_process_p50_ms']:.3f} ms, overhead {result['serving_overhead_p50_ms']:.3f} ms")


if __name__ == "__main__":
    main()
