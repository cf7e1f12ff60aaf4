"""In-process inference runtimes behind one small interface: `session.run(None, feeds) -> [arrays]`.

ONNX Runtime runs every variant; OpenVINO runs the same ONNX files with bf16 (AMX) or int8 kernels, which ONNX
Runtime's CPU provider lacks (it has no bf16 matrix kernels), so it is offered as its own variants.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import onnxruntime as ort

from core.errors import VariantSkipped

Runtime = Literal["onnxruntime", "openvino"]


class OpenVinoSession:
    """An OpenVINO CPU model compiled from an ONNX file, with ONNX Runtime's `run` signature."""

    def __init__(self, onnx_path: str | Path, precision: str = "bf16", threads: int = 0):
        try:
            import openvino as ov
        except ImportError as error:
            raise VariantSkipped("openvino is not installed") from error
        core = ov.Core()
        if precision == "bf16" and not openvino_has_bf16():
            raise VariantSkipped("this CPU has no bf16 support in OpenVINO (needs AVX512_BF16 or AMX)")
        config = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        self._compiled = core.compile_model(str(onnx_path), "CPU", config)
        self._request = self._compiled.create_infer_request()
        self.output_names = [output.get_any_name() for output in self._compiled.outputs]

    def run(self, names: list[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        results = self._request.infer(feeds)
        by_name = {output.get_any_name(): np.array(value) for output, value in results.items()}
        return [by_name[name] for name in (names or self.output_names)]


def openvino_has_bf16() -> bool:
    """Whether OpenVINO's CPU plugin has bf16 kernels here (AVX512_BF16 or AMX); False without OpenVINO."""
    try:
        import openvino as ov
    except ImportError:
        return False
    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def runtime_of(variant: str) -> tuple[Runtime, str | None]:
    """The runtime and its precision hint for a variant. OpenVINO's int8 variant computes the layers left
    unquantized in bf16 where the CPU has it, in f32 otherwise."""
    if variant == "openvino-bf16":
        return "openvino", "bf16"
    if variant == "openvino-int8":
        return "openvino", "bf16" if openvino_has_bf16() else "f32"
    return "onnxruntime", None


def open_session(
    onnx_path: str | Path, runtime: Runtime = "onnxruntime", precision: str | None = None, threads: int = 0
):
    """A session for `onnx_path` in `runtime`; OpenVINO takes an inference precision ("bf16" or "f32")."""
    if runtime == "openvino":
        return OpenVinoSession(onnx_path, precision or "bf16", threads)
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])


class Speed(NamedTuple):
    latency_p50_ms: float  # batch 1
    throughput_per_s: float  # samples/s at the batch
    round_batch_s: tuple[float, ...]  # per round, the median seconds of one batch call: rounds pair up across sessions


def measure_speed(
    sessions: dict, single: dict, batch: dict, repeats: int, block: int = 4, rest_s: float = 0.05
) -> dict[str, Speed]:
    """Per session: p50 at batch 1, samples/s at the batch, and the batch time of each round. Sessions take turns
    in rounds, `block` calls each, so slow drifts of the machine hit all alike and round k of two sessions can be
    compared; the first call of a block is not counted, because the session that ran just before may still hold
    the cores (ONNX Runtime's threads spin-wait after their work)."""
    batch_size = len(next(iter(batch.values())))
    ones: dict[str, list[float]] = {name: [] for name in sessions}
    rounds: dict[str, list[list[float]]] = {name: [] for name in sessions}
    for _ in range(max(1, repeats // (block - 1))):
        for name, session in sessions.items():
            ones[name] += _timed_calls(session, single, block, rest_s)
            rounds[name].append(_timed_calls(session, batch, block, rest_s))
    return {
        name: Speed(
            statistics.median(ones[name]) * 1e3,
            batch_size / statistics.median([t for timings in rounds[name] for t in timings]),
            tuple(statistics.median(timings) for timings in rounds[name]),
        )
        for name in sessions
    }


def _timed_calls(session, inputs: dict, block: int, rest_s: float) -> list[float]:
    time.sleep(rest_s)  # let the previous session's spinning threads go idle
    seconds = []
    for call in range(block):
        start = time.perf_counter()
        session.run(None, inputs)
        if call:
            seconds.append(time.perf_counter() - start)
    return seconds
