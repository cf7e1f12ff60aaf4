"""The `native` repository flavour, for a Triton that has the ONNX Runtime and TensorRT backends (NGC containers,
GPU clusters): `onnxruntime_onnx` models for ONNX files and `tensorrt_plan` models for engines, with
`cc_model_filenames` mapping compute capabilities to engines when several were built.

The bundled CPU Triton only has the Python backend, so these configs are checked by parsing and by the invariants
Triton enforces (`validate`), not by loading; `tes export-repository` writes a whole repository for another server.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from tritonclient.grpc import model_config_pb2 as mc

from core.errors import RepositoryError
from serving.repository import ServingConfig, VersionResult, io_from_onnx, publish_version

_CAPABILITY = re.compile(r"^\d+\.\d+$")


def _common(name: str, platform: str, onnx_path: Path, serving: ServingConfig, gpu: bool) -> mc.ModelConfig:
    inputs, outputs = io_from_onnx(onnx_path, batched=serving.max_batch_size > 0)
    config = mc.ModelConfig(name=name, platform=platform, max_batch_size=serving.max_batch_size)
    config.input.extend(inputs)
    config.output.extend(outputs)
    kind = mc.ModelInstanceGroup.KIND_GPU if gpu else mc.ModelInstanceGroup.KIND_CPU
    config.instance_group.add(count=serving.instance_count, kind=kind)
    config.version_policy.latest.num_versions = 1
    if serving.dynamic_batching and serving.max_batch_size > 0:
        config.dynamic_batching.SetInParent()
        config.dynamic_batching.max_queue_delay_microseconds = serving.max_queue_delay_microseconds
    return config


def onnx_config(name: str, onnx_path: Path, serving: ServingConfig, gpu: bool = True) -> mc.ModelConfig:
    config = _common(name, "onnxruntime_onnx", onnx_path, serving, gpu)
    config.default_model_filename = "model.onnx"
    return config


def plan_config(name: str, onnx_path: Path, engines: dict[str, str], serving: ServingConfig) -> mc.ModelConfig:
    """`engines` maps compute capability ("8.0", "9.0") to the engine's file name; tensors come from the ONNX graph."""
    config = _common(name, "tensorrt_plan", onnx_path, serving, gpu=True)
    if len(engines) == 1:
        config.default_model_filename = next(iter(engines.values()))
    for capability, file_name in engines.items():
        config.cc_model_filenames[capability] = file_name
    return config


def validate(config: mc.ModelConfig, version_dir: Path) -> None:
    """The invariants Triton checks when it loads a native model, all reported at once."""
    problems = []
    if config.platform not in ("onnxruntime_onnx", "tensorrt_plan"):
        problems.append(f"platform is {config.platform!r}, expected onnxruntime_onnx or tensorrt_plan")
    for tensor in [*config.input, *config.output]:
        if config.max_batch_size > 0 and not tensor.dims:
            problems.append(f"tensor '{tensor.name}' has no dims besides the batch axis")
        if any(d == 0 or d < -1 for d in tensor.dims):
            problems.append(f"tensor '{tensor.name}' has dims {list(tensor.dims)}: each must be -1 or positive")
    for capability, file_name in config.cc_model_filenames.items():
        if not _CAPABILITY.match(capability):
            problems.append(f"cc_model_filenames key {capability!r} is not a compute capability like '9.0'")
        if not (version_dir / file_name).is_file():
            problems.append(f"cc_model_filenames[{capability!r}] = {file_name!r} is not in {version_dir}")
        elif config.platform == "tensorrt_plan" and not (version_dir / file_name).with_suffix(".json").is_file():
            problems.append(f"engine {file_name} has no manifest ({Path(file_name).with_suffix('.json')}) beside it")
    default = config.default_model_filename
    if default and not (version_dir / default).is_file():
        problems.append(f"default_model_filename {default!r} is not in {version_dir}")
    names = [t.name for t in [*config.input, *config.output]]
    if len(set(names)) != len(names):
        problems.append(f"tensor names repeat: {names}")
    if problems:
        raise RepositoryError(f"native model '{config.name}' would not load:\n  - " + "\n  - ".join(problems))


def write_native_version(repository: Path, config: mc.ModelConfig, files: dict[str, Path], provenance: dict | None = None) -> VersionResult:
    """Copy `files` (name in the version -> source) into the next version of `config.name`, after validating."""
    def populate(staging: Path) -> None:
        for name, source in files.items():
            shutil.copyfile(source, staging / name)
        validate(config, staging)

    return publish_version(repository, config.name, config, populate, provenance)


def export_repository(run_dir: Path, out: Path, model: str, serving: ServingConfig, gpu: bool = True) -> list[VersionResult]:
    """A native repository for another Triton from a finished run: one `onnxruntime_onnx` model per accepted ONNX
    Runtime variant and one `tensorrt_plan` model per built engine (grouped by compute capability)."""
    import json

    variants = json.loads((run_dir / "precision" / "variants.json").read_text())
    written = []
    for variant in variants:
        if variant["status"] == "accepted" and variant["runtime"] == "onnxruntime":
            config = onnx_config(f"{model}-{variant['name']}", Path(variant["path"]), serving, gpu)
            written.append(write_native_version(out, config, {"model.onnx": Path(variant["path"])}, {"run": run_dir.name}))
    engines = sorted((run_dir / "tensorrt").glob("*.plan")) if (run_dir / "tensorrt").is_dir() else []
    if engines:
        by_capability = {json.loads(e.with_suffix(".json").read_text())["compute_capability"]: e for e in engines}
        files = {e.name: e for e in by_capability.values()} | {e.with_suffix(".json").name: e.with_suffix(".json") for e in by_capability.values()}
        config = plan_config(f"{model}-tensorrt", run_dir / "export" / "model.onnx", {cc: e.name for cc, e in by_capability.items()}, serving)
        written.append(write_native_version(out, config, files, {"run": run_dir.name}))
    if not written:
        raise RepositoryError(f"run {run_dir} has no accepted ONNX Runtime variant and no engine to export")
    return written
