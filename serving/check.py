"""Checks on a served model: its answers against the same model run in-process, and a concurrency-1 latency probe.

The in-process reference is any object with ONNX Runtime's `run(output_names, feeds)` (an ONNX Runtime session,
or the OpenVINO adapter of `core.runtimes`), so each variant is compared with its own runtime.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from serving.client import connect, infer


def ort_session(onnx_path: str | Path, threads: int = 0) -> ort.InferenceSession:
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])


def compare_served(urls: dict[str, str], model: str, batches: list[dict[str, np.ndarray]], session) -> dict:
    """Send each batch over every protocol in `urls`; report max |served - in-process| and the first outputs."""
    report: dict = {}
    for protocol, url in urls.items():
        client = connect(url, protocol)  # type: ignore[arg-type]
        worst, served_first = 0.0, []
        try:
            for inputs in batches:
                served = infer(url, model, inputs, protocol, client=client)  # type: ignore[arg-type]
                expected = session.run(None, inputs)
                names = list(served)
                for name, array in zip(names, expected):
                    worst = max(worst, float(np.abs(served[name].astype(np.float64) - array).max(initial=0.0)))
                served_first.append(served[names[0]])
        finally:
            client.close()
        report[protocol] = {"batches": len(batches), "max_abs_diff_vs_in_process": worst, "outputs": served_first}
    return report


def interleaved_p50(serve, local, requests: int) -> tuple[float, float]:
    """(p50 of `serve()`, p50 of `local()`) in ms, called one after the other, so machine noise hits both alike."""
    for _ in range(10):  # warm-up both paths
        serve()
        local()
    served_ms, local_ms = [], []
    for _ in range(requests):
        start = time.perf_counter()
        serve()
        served_ms.append((time.perf_counter() - start) * 1e3)
        start = time.perf_counter()
        local()
        local_ms.append((time.perf_counter() - start) * 1e3)
    return statistics.median(served_ms), statistics.median(local_ms)


def latency_probe(url: str, protocol: str, model: str, inputs: dict[str, np.ndarray], session, requests: int = 100) -> dict:
    """p50 of one-at-a-time requests to the server vs the same model in-process on the same input, side by side."""
    client = connect(url, protocol)  # type: ignore[arg-type]
    try:
        served_p50, local_p50 = interleaved_p50(lambda: infer(url, model, inputs, protocol, client=client),  # type: ignore[arg-type]
                                                lambda: session.run(None, inputs), requests)
    finally:
        client.close()
    return {
        "protocol": protocol, "requests": requests, "input_shapes": {k: list(v.shape) for k, v in inputs.items()},
        "served_p50_ms": served_p50, "in_process_p50_ms": local_p50, "serving_overhead_p50_ms": served_p50 - local_p50,
    }
