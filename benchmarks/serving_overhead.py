"""Serving overhead: served p50 at concurrency 1 minus in-process ONNX Runtime p50, same model and input.

    .venv/bin/python benchmarks/serving_overhead.py --requests 2000

digits-cnn (goal: under 1 ms over gRPC on these machines). Requests to the server and in-process runs alternate,
so machine noise hits both alike. Two clients are measured: `tritonclient` (what `tes infer` and the served
check use) and the load generator's lean sender (`bench/senders.py`: requests serialized once), and the
transport floor (median liveness round trip) says how much of what is left is the client and the protocol.
"""

import argparse

from _common import serving, trained_onnx

from bench import senders
from core.runtimes import open_session
from serving.check import interleaved_p50, latency_probe
from serving.repository import ServingConfig


def lean_probe(url: str, protocol: str, model: str, sample: dict, session, requests: int) -> dict:
    """p50 of one-at-a-time requests through the lean sender vs in-process, interleaved."""
    sender = senders.open_sender(protocol, url, model, [sample])
    try:
        served, local = interleaved_p50(lambda: sender.send(0), lambda: session.run(None, sample), requests)
        floor = senders.transport_floor_ms(sender)
    finally:
        sender.close()
    return {
        "served_p50_ms": served,
        "in_process_p50_ms": local,
        "serving_overhead_p50_ms": served - local,
        "floor_ms": floor,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--delay-us", type=int, default=0, help="max queue delay of the dynamic batcher")
    args = parser.parse_args()
    recipe, onnx_path = trained_onnx("digits-cnn", steps=100)
    sample = recipe.example_inputs(1)
    session = open_session(onnx_path)
    with serving(
        {"digits-cnn": (onnx_path, ServingConfig(max_batch_size=64, max_queue_delay_microseconds=args.delay_us))}
    ) as server:
        for protocol, url in (("grpc", server.grpc_url), ("http", server.http_url)):
            result = latency_probe(url, protocol, "digits-cnn", sample, session, requests=args.requests)
            lean = lean_probe(url, protocol, "digits-cnn", sample, session, args.requests)
            print(
                f"{protocol:4s} c=1, {args.requests} requests, input {result.input_shapes}: in-process ONNX Runtime "
                "p50 "
                f"{result.in_process_p50_ms:.3f} ms | tritonclient: served p50 {result.served_p50_ms:.3f} ms, overhead "
                f"{result.serving_overhead_p50_ms:.3f} ms | lean sender: served p50 {lean['served_p50_ms']:.3f} ms, "
                "overhead "
                f"{lean['serving_overhead_p50_ms']:.3f} ms | transport floor {lean['floor_ms']:.3f} ms",
                flush=True,
            )


if __name__ == "__main__":
    main()
