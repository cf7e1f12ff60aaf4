"""The TensorRT work itself, run only in a child process, so a crash in native code fails a stage, not the flow.

    python -m export.tensorrt_build build SPEC.json                 # parse, configure, build; engine + engine.json
    python -m export.tensorrt_build run ENGINE INPUTS.npz OUT.npz   # run an engine on saved inputs (verification)

`export/trt_engine.py` writes SPEC.json and starts these; nothing else should import this module while a flow
runs. Written against TensorRT 10's Python API. What was and was not executed in this project: docs/tensorrt.md
(no engine has been built here so far: TensorRT is not installable from the index these machines reach).
"""

from __future__ import annotations

import datetime as dt
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from core.files import atomic_write_bytes, atomic_write_json, sha256_file

# builder flags per precision; INT8 comes from an explicitly quantized (QDQ) ONNX model, with FP16 for the
# layers the QDQ model leaves in float
PRECISION_FLAGS: dict[str, tuple[str, ...]] = {
    "fp32": (),
    "fp16": ("FP16",),
    "bf16": ("BF16",),
    "int8-static": ("INT8", "FP16"),
}
# flags TensorRT sets by default that a precision turns off: `fp32` means FP32 math, not TF32 (10-bit mantissa)
CLEARED_FLAGS: dict[str, tuple[str, ...]] = {"fp32": ("TF32",), "fp16": (), "bf16": (), "int8-static": ()}
ENGINE_FILE, MANIFEST_FILE = "model.plan", "engine.json"


def network_flags(trt: Any, strongly_typed: bool) -> int:
    """0 in TensorRT 10 (explicit batch is the only mode); strongly typed networks take their types from the ONNX."""
    return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0


def parse_onnx(trt: Any, network: Any, logger: Any, onnx_path: str) -> None:
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(onnx_path):
        errors = [str(parser.get_error(index)) for index in range(parser.num_errors)]
        raise SystemExit(f"TensorRT's ONNX parser refused {onnx_path}:\n  " + "\n  ".join(errors))


def configure(trt: Any, builder: Any, spec: dict) -> tuple[Any, bool]:
    """The builder config of SPEC: workspace, optimization level, precision flags, compatibility, timing cache,
    one optimization profile. Returns (config, whether a saved timing cache was loaded)."""
    settings = spec["config"]
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings["workspace_mb"] << 20)  # bytes
    config.builder_optimization_level = settings["optimization_level"]
    if not settings["strongly_typed"]:  # a strongly typed network refuses precision flags
        for flag in PRECISION_FLAGS[settings["precision"]]:
            config.set_flag(getattr(trt.BuilderFlag, flag))
        for flag in CLEARED_FLAGS[settings["precision"]]:
            config.clear_flag(getattr(trt.BuilderFlag, flag))
    if settings["hardware_compatibility"] == "ampere_plus":
        config.hardware_compatibility_level = trt.HardwareCompatibilityLevel.AMPERE_PLUS
    if settings["version_compatible"]:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    cache_path = Path(settings["timing_cache"])
    saved = cache_path.read_bytes() if cache_path.is_file() else b""
    cache = config.create_timing_cache(saved)  # an empty buffer makes a new, empty cache
    config.set_timing_cache(cache, False)  # (cache, ignore_mismatch): a cache from another device is not used
    profile = builder.create_optimization_profile()
    for name, dims in spec["shapes"].items():
        profile.set_shape(name, dims["min"], dims["opt"], dims["max"])
    config.add_optimization_profile(profile)
    return config, bool(saved)


def tensor_descriptions(trt: Any, network: Any) -> list[dict]:
    """Every network input and output: name, numpy dtype name, shape (-1: dynamic), mode."""

    def describe(tensor: Any, mode: str) -> dict:
        return {
            "name": tensor.name,
            "dtype": np.dtype(trt.nptype(tensor.dtype)).name,
            "shape": list(tensor.shape),
            "mode": mode,
        }

    inputs = [describe(network.get_input(i), "input") for i in range(network.num_inputs)]
    return inputs + [describe(network.get_output(i), "output") for i in range(network.num_outputs)]


def device() -> tuple[str, str]:
    """(GPU name, compute capability "major.minor") of CUDA device 0."""
    import torch

    major, minor = torch.cuda.get_device_capability(0)
    return torch.cuda.get_device_name(0), f"{major}.{minor}"


def build(spec: dict) -> dict:
    """Build the engine SPEC describes; write it, the timing cache and the manifest atomically; return the manifest."""
    import tensorrt as trt

    settings = spec["config"]
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt, settings["strongly_typed"]))
    parse_onnx(trt, network, logger, spec["onnx"])
    config, cache_loaded = configure(trt, builder, spec)
    started = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise SystemExit("TensorRT returned no engine; the builder's log above says why")
    build_seconds = time.perf_counter() - started
    folder = Path(spec["folder"])
    engine_path = atomic_write_bytes(folder / ENGINE_FILE, bytes(serialized))
    atomic_write_bytes(settings["timing_cache"], bytes(config.get_timing_cache().serialize()))
    gpu, capability = device()
    manifest = {
        "engine": ENGINE_FILE,
        "engine_sha256": sha256_file(engine_path),
        "engine_bytes": engine_path.stat().st_size,
        "tensorrt": trt.__version__,
        "gpu": gpu,
        "compute_capability": capability,
        "hardware_compatibility": settings["hardware_compatibility"],
        "version_compatible": settings["version_compatible"],
        "strongly_typed": settings["strongly_typed"],
        "precision": settings["precision"],
        "builder_flags": [] if settings["strongly_typed"] else list(PRECISION_FLAGS[settings["precision"]]),
        "workspace_mb": settings["workspace_mb"],
        "optimization_level": settings["optimization_level"],
        "timing_cache": settings["timing_cache"],
        "timing_cache_loaded": cache_loaded,
        "onnx": spec["onnx"],
        "onnx_sha256": sha256_file(spec["onnx"]),
        "profiles": spec["shapes"],
        "max_batch_size": spec["max_batch_size"],
        "tensors": tensor_descriptions(trt, network),
        "build_seconds": build_seconds,
        "built_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    atomic_write_json(folder / MANIFEST_FILE, manifest)
    return manifest


def run(engine_path: str, inputs_path: str, outputs_path: str) -> None:
    """Run an engine on every batch of INPUTS.npz (keys "<batch>/<input>") and save OUT.npz ("<batch>/<output>"),
    plus the median seconds per call of the largest batch ("seconds/<batch>") for the speed gate."""
    import tensorrt as trt
    import torch

    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
    if engine is None:
        raise SystemExit(f"TensorRT could not deserialize {engine_path}: built for another GPU or TensorRT version?")
    context = engine.create_execution_context()
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    outputs_of = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
    saved = np.load(inputs_path)
    batches: dict[str, dict[str, np.ndarray]] = {}
    for key in saved.files:
        batch, name = key.split("/", 1)
        batches.setdefault(batch, {})[name] = saved[key]
    results: dict[str, np.ndarray] = {}
    stream = torch.cuda.current_stream()
    for batch, feeds in batches.items():
        device_inputs = {
            name: torch.from_numpy(np.ascontiguousarray(array, dtype=trt.nptype(engine.get_tensor_dtype(name)))).cuda()
            for name, array in feeds.items()
        }
        for name, tensor in device_inputs.items():
            context.set_input_shape(name, tuple(tensor.shape))
            context.set_tensor_address(name, tensor.data_ptr())
        device_outputs = {}
        for name in outputs_of:
            dtype = torch.from_numpy(np.empty(0, dtype=trt.nptype(engine.get_tensor_dtype(name)))).dtype
            device_outputs[name] = torch.empty(tuple(context.get_tensor_shape(name)), dtype=dtype, device="cuda")
            context.set_tensor_address(name, device_outputs[name].data_ptr())

        def call() -> None:
            if not context.execute_async_v3(stream_handle=stream.cuda_stream):
                raise SystemExit(f"execute_async_v3 failed on batch {batch}")
            stream.synchronize()  # a CPU-GPU sync point: the timing below includes the whole call

        call()
        results.update({f"{batch}/{name}": tensor.cpu().numpy() for name, tensor in device_outputs.items()})
        timings = []
        for _ in range(20):
            started = time.perf_counter()
            call()
            timings.append(time.perf_counter() - started)
        results[f"seconds/{batch}"] = np.array(float(np.median(timings)))
    np.savez(outputs_path, **results)


def main(argv: list[str]) -> None:
    if argv[:1] == ["build"] and len(argv) == 2:
        manifest = build(json.loads(Path(argv[1]).read_text()))
        print(
            f"engine {manifest['engine_sha256'][:12]} built in {manifest['build_seconds']:.1f} s on {manifest['gpu']}"
        )
    elif argv[:1] == ["run"] and len(argv) == 4:
        run(*argv[1:])
    else:
        raise SystemExit("usage: python -m export.tensorrt_build build SPEC.json | run ENGINE INPUTS.npz OUT.npz")


if __name__ == "__main__":
    main(sys.argv[1:])
