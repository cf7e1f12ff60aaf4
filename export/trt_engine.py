"""ONNX -> TensorRT engine, built in a child process, with a manifest and a `reproduce.sh` (trtexec) beside it.

    python -m export.trt_engine SPEC.json        # what the stage runs in the child; SPEC names every input

Where TensorRT or a GPU is missing the stage returns SKIPPED with the reason. What was and was not executed in
this project is stated in docs/tensorrt.md: TensorRT cannot be installed from the package index our machines
reach, so no engine has been built here; the code is written against TensorRT 10's Python API.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from core.errors import ExportError
from core.files import atomic_write_json, atomic_write_text, sha256_file
from core.results import Artifact, StageResult, Status
from training.recipes import Recipe

Precision = Literal["fp32", "fp16", "bf16", "int8"]
# builder flags per precision; INT8 comes from an explicitly quantized (QDQ) ONNX model, with FP16 for the rest
PRECISION_FLAGS: dict[str, tuple[str, ...]] = {"fp32": (), "fp16": ("FP16",), "bf16": ("BF16",), "int8": ("INT8", "FP16")}
TRTEXEC_FLAGS = {"FP16": "--fp16", "BF16": "--bf16", "INT8": "--int8"}


class EngineMismatch(ExportError):
    """An engine built for another GPU architecture or TensorRT version than the target."""


class EngineConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = True
    precision: Precision = "fp16"
    workspace_mb: int = Field(4096, ge=64, description="builder workspace memory pool limit")
    optimization_level: int = Field(3, ge=0, le=5, description="TensorRT builder optimization level")
    timing_cache: str = Field(".tes/trt-timing.cache", description="saved after each build and reused by the next")
    hardware_compatibility: Literal["none", "ampere_plus", "same_compute_capability"] = "none"
    version_compatible: bool = False
    build_timeout_s: int = Field(3600, ge=10)


def profile_shapes(recipe: Recipe, max_batch_size: int) -> dict[str, dict[str, list[int]]]:
    """min/opt/max shape of every input: batch 1 / max / max, dynamic axes from the recipe's (min, opt, max)."""
    shapes = {}
    for spec in recipe.inputs:
        low, opt, high = [1], [max_batch_size], [max_batch_size]
        for axis, size in enumerate(spec.shape):
            if size == -1:
                a, b, c = spec.ranges[axis]
                low.append(a), opt.append(b), high.append(c)
            else:
                low.append(size), opt.append(size), high.append(size)
        shapes[spec.name] = {"min": low, "opt": opt, "max": high}
    return shapes


def trtexec_command(onnx_path: Path, engine_path: Path, shapes: dict, config: EngineConfig) -> list[str]:
    def shape_flag(kind: str) -> str:
        return ",".join(f"{name}:{'x'.join(map(str, dims[kind]))}" for name, dims in shapes.items())

    command = ["trtexec", f"--onnx={onnx_path}", f"--saveEngine={engine_path}", f"--minShapes={shape_flag('min')}",
               f"--optShapes={shape_flag('opt')}", f"--maxShapes={shape_flag('max')}",
               f"--memPoolSize=workspace:{config.workspace_mb}M", f"--builderOptimizationLevel={config.optimization_level}",
               f"--timingCacheFile={config.timing_cache}"]
    command += [TRTEXEC_FLAGS[flag] for flag in PRECISION_FLAGS[config.precision]]
    if config.hardware_compatibility == "ampere_plus":
        command.append("--hardwareCompatibilityLevel=ampere+")
    if config.version_compatible:
        command.append("--versionCompatible")
    return command


def unavailable_reason() -> str | None:
    """Why an engine cannot be built here, or None."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "tensorrt not installed (its libraries are not on the package index these machines reach)"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU"
    return None


def build(recipe: Recipe, onnx_path: str | Path, out_dir: str | Path, config: EngineConfig, max_batch_size: int) -> StageResult:
    """Build one engine in a child process; SKIPPED where TensorRT or a GPU is missing, FAILED if the child fails."""
    onnx_path, out_dir = Path(onnx_path), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    engine_path = out_dir / f"model-{config.precision}.plan"
    shapes = profile_shapes(recipe, max_batch_size)
    command = trtexec_command(onnx_path, engine_path, shapes, config)
    atomic_write_text(out_dir / "reproduce.sh", "#!/usr/bin/env bash\n# the trtexec equivalent of this build\n" + shlex.join(command) + "\n")
    if not config.enabled:
        return StageResult("tensorrt", Status.SKIPPED, reason="tensorrt.enabled is false")
    reason = unavailable_reason()
    if reason:
        return StageResult("tensorrt", Status.SKIPPED, reason=reason, outputs={"reproduce": str(out_dir / "reproduce.sh")})
    spec = {"onnx": str(onnx_path), "engine": str(engine_path), "shapes": shapes, "config": config.model_dump()}
    spec_path = atomic_write_json(out_dir / "build-spec.json", spec)
    started = time.perf_counter()
    child = subprocess.run([sys.executable, "-m", "export.trt_engine", str(spec_path)], capture_output=True, text=True,
                           timeout=config.build_timeout_s)
    seconds = time.perf_counter() - started
    if child.returncode != 0:
        return StageResult("tensorrt", Status.FAILED, seconds, reason=f"engine build exited with {child.returncode}: {child.stderr[-2000:]}")
    return StageResult("tensorrt", Status.OK, seconds, artifacts=[Artifact.of(engine_path)],
                       outputs={"engine": str(engine_path), "manifest": str(engine_path.with_suffix(".json"))})


def check_compatible(manifest: dict, compute_capability: str, tensorrt_version: str) -> None:
    """Refuse an engine built for another compute capability or TensorRT version than the target."""
    problems = []
    if manifest["compute_capability"] != compute_capability and manifest.get("hardware_compatibility") != "ampere_plus":
        problems.append(f"compute capability {manifest['compute_capability']}, target has {compute_capability}")
    built, target = manifest["tensorrt"], tensorrt_version
    same_major = built.split(".")[0] == target.split(".")[0]
    if built != target and not (manifest.get("version_compatible") and same_major):
        problems.append(f"TensorRT {built}, target runs {target}")
    if problems:
        raise EngineMismatch(f"engine {manifest.get('engine', '')} cannot run on the target: " + "; ".join(problems)
                             + ". Rebuild it on the target (see reproduce.sh beside it), or build with "
                             "hardware_compatibility='ampere_plus' / version_compatible=true.")


def _build_in_child(spec: dict) -> None:
    """The TensorRT 10 build itself; runs only in the child process."""
    import tensorrt as trt
    import torch

    config_spec = EngineConfig(**spec["config"])
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(spec["onnx"]):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise SystemExit("ONNX parser errors:\n" + "\n".join(errors))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, config_spec.workspace_mb << 20)
    config.builder_optimization_level = config_spec.optimization_level
    for flag in PRECISION_FLAGS[config_spec.precision]:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    if config_spec.hardware_compatibility == "ampere_plus":
        config.hardware_compatibility_level = trt.HardwareCompatibilityLevel.AMPERE_PLUS
    if config_spec.version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    cache_path = Path(config_spec.timing_cache)
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(cache, False)  # (cache, ignore_mismatch)
    profile = builder.create_optimization_profile()
    for name, dims in spec["shapes"].items():
        profile.set_shape(name, dims["min"], dims["opt"], dims["max"])
    config.add_optimization_profile(profile)
    started = time.perf_counter()
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise SystemExit("TensorRT returned no engine; see the builder log above")
    engine_path = Path(spec["engine"])
    engine_path.write_bytes(bytes(engine))
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    major, minor = torch.cuda.get_device_capability(0)
    atomic_write_json(engine_path.with_suffix(".json"), {
        "engine": engine_path.name, "tensorrt": trt.__version__, "gpu": torch.cuda.get_device_name(0),
        "compute_capability": f"{major}.{minor}", "hardware_compatibility": config_spec.hardware_compatibility,
        "version_compatible": config_spec.version_compatible, "onnx_sha256": sha256_file(spec["onnx"]),
        "profiles": spec["shapes"], "precision": config_spec.precision, "build_seconds": time.perf_counter() - started,
    })


if __name__ == "__main__":
    _build_in_child(json.loads(Path(sys.argv[1]).read_text()))
