"""In-process inference runtimes behind one small interface: `session.run(None, feeds) -> [arrays]`.

ONNX Runtime runs every ONNX variant; OpenVINO runs ONNX files and its own IR with bf16 or int8 kernels, which
ONNX Runtime's CPU provider lacks; torch runs AOTInductor packages (`.pt2`, torch.compile ahead of time). Each
runtime takes `RuntimeSettings`: the knobs that matter on a CPU, which the precision stage picks by measurement and
the served model's config records, so serving runs with what won.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import onnxruntime as ort
import psutil
from pydantic import BaseModel, ConfigDict

from core.errors import VariantSkipped

Runtime = Literal["onnxruntime", "openvino", "torch"]
_ORT_LEVELS = {
    "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


class RuntimeSettings(BaseModel):
    """Runtime knobs besides the precision; None/0 keeps the runtime's own default. Recorded per variant and in
    the served config (`runtime_settings`), read back by `serving/backend/model.py`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    threads: int = 0  # intra-op threads (every runtime); 0: the runtime's default
    performance_hint: Literal["LATENCY", "THROUGHPUT"] | None = None  # OpenVINO; None: LATENCY
    streams: int = 0  # OpenVINO NUM_STREAMS; 0: what the hint picks
    graph_optimization: Literal["disabled", "basic", "extended", "all"] | None = None  # ONNX Runtime; None: all
    spinning: bool | None = None  # ONNX Runtime intra-op threads spin-wait after work; None: its default (on)

    def label(self) -> str:
        """Short text of what differs from the defaults ('default' when nothing does)."""
        parts = [f"{key}={value}" for key, value in self.model_dump(exclude_defaults=True).items()]
        return ", ".join(parts) or "default"

    def to_json(self) -> str:
        return json.dumps(self.model_dump(exclude_defaults=True), sort_keys=True)


def settings_candidates(runtime: Runtime, precision: str | None) -> list[tuple[str | None, RuntimeSettings]]:
    """The small, bounded set of (precision, settings) a variant is timed with; the first is the default.

    OpenVINO: f32 and bf16 float layers where the CPU has bf16 kernels (bf16 is not always faster: on a CPU with
    AVX512_BF16 but no AMX it was slower and less accurate than f32), and the throughput hint. ONNX Runtime: with
    and without spin-waiting, and the extended optimisation level (fewer fusions, sometimes faster). Every runtime:
    one thread per logical CPU where there are more logical CPUs than cores (the runtimes default to one per core).
    A variant whose precision is its point (openvino-bf16) keeps it."""
    default = RuntimeSettings()
    logical = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    smt = [RuntimeSettings(threads=logical)] if logical > (psutil.cpu_count(logical=False) or logical) else []
    if runtime == "openvino":
        precisions = [precision] if precision == "bf16" else ["f32"] + (["bf16"] if openvino_has_bf16() else [])
        first = precisions[0]
        return [(p, default) for p in precisions] + [
            (first, settings) for settings in (RuntimeSettings(performance_hint="THROUGHPUT"), *smt)
        ]
    if runtime == "onnxruntime":
        return [
            (precision, default),
            (precision, RuntimeSettings(spinning=False)),
            (precision, RuntimeSettings(graph_optimization="extended")),
            *((precision, settings) for settings in smt),
        ]
    return [(precision, default), *((precision, settings) for settings in smt)]


class OpenVinoSession:
    """An OpenVINO CPU model compiled from an ONNX file or OpenVINO IR (`.xml` beside its `.bin`), with ONNX
    Runtime's `run` signature."""

    def __init__(
        self, model_path: str | Path, precision: str = "bf16", threads: int = 0, settings: RuntimeSettings | None = None
    ):
        try:
            import openvino as ov
        except ImportError as error:
            raise VariantSkipped("openvino is not installed") from error
        core = ov.Core()
        if precision == "bf16" and not openvino_has_bf16():
            raise VariantSkipped("this CPU has no bf16 support in OpenVINO (needs AVX512_BF16 or AMX)")
        self.precision, self.settings = precision, settings or RuntimeSettings()
        self._compiled = core.compile_model(str(model_path), "CPU", openvino_config(precision, threads, settings))
        self._request = self._compiled.create_infer_request()
        self.output_names = [output.get_any_name() for output in self._compiled.outputs]

    def run(self, names: list[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        results = self._request.infer(feeds)
        by_name = {output.get_any_name(): np.array(value) for output, value in results.items()}
        return [by_name[name] for name in (names or self.output_names)]


def openvino_config(precision: str, threads: int = 0, settings: RuntimeSettings | None = None) -> dict:
    """OpenVINO CPU compile properties for a precision and settings (the served model uses the same function's
    twin in serving/backend/model.py)."""
    settings = settings or RuntimeSettings()
    config: dict = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": settings.performance_hint or "LATENCY"}
    if threads or settings.threads:
        config["INFERENCE_NUM_THREADS"] = threads or settings.threads
    if settings.streams:
        config["NUM_STREAMS"] = settings.streams
    return config


class TorchSession:
    """An AOTInductor package (`.pt2`: a model compiled ahead of time by torch.compile's inductor) with ONNX
    Runtime's `run` signature; its input and output names are in the package's metadata."""

    def __init__(self, package_path: str | Path, threads: int = 0):
        try:
            import torch
            from torch._inductor import aoti_load_package
        except ImportError as error:
            raise VariantSkipped("torch with inductor is not installed") from error
        if threads:
            torch.set_num_threads(threads)
        self._torch = torch
        self._model = aoti_load_package(str(package_path))
        metadata = self._model.get_metadata()
        if "tes_inputs" not in metadata:
            raise VariantSkipped(f"{package_path} has no tes_inputs metadata: it was not built by the precision stage")
        self.input_names = json.loads(metadata["tes_inputs"])
        self.output_names = json.loads(metadata["tes_outputs"])

    def run(self, names: list[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        with self._torch.inference_mode():
            outputs = self._model(*(self._torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in self.input_names))
        by_name = dict(zip(self.output_names, outputs if isinstance(outputs, (list, tuple)) else [outputs]))
        return [by_name[name].numpy() for name in (names or self.output_names)]


def openvino_has_bf16() -> bool:
    """Whether OpenVINO's CPU plugin has bf16 kernels here (AVX512_BF16 or AMX); False without OpenVINO."""
    try:
        import openvino as ov
    except ImportError:
        return False
    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def runtime_of(variant: str) -> tuple[Runtime, str | None]:
    """The runtime and its default precision for a variant. OpenVINO's int8 variants start with float layers in f32;
    the precision stage also times them in bf16 where the CPU has it and keeps the faster (`settings_candidates`)."""
    if variant == "openvino-bf16":
        return "openvino", "bf16"
    if variant.startswith("openvino-"):
        return "openvino", "f32"
    if variant.startswith("torch"):
        return "torch", None
    return "onnxruntime", None


def open_session(
    model_path: str | Path,
    runtime: Runtime = "onnxruntime",
    precision: str | None = None,
    threads: int = 0,
    settings: RuntimeSettings | None = None,
):
    """A session for `model_path` in `runtime`; OpenVINO takes an inference precision ("bf16" or "f32")."""
    settings = settings or RuntimeSettings()
    threads = threads or settings.threads
    if runtime == "openvino":
        return OpenVinoSession(model_path, precision or "bf16", threads, settings)
    if runtime == "torch":
        return TorchSession(model_path, threads)
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    if settings.graph_optimization:
        options.graph_optimization_level = _ORT_LEVELS[settings.graph_optimization]
    if settings.spinning is not None:
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if settings.spinning else "0")
    return ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])


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
