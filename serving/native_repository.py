"""The `native` repository flavour, for a Triton that has the ONNX Runtime and TensorRT backends (NGC containers,
GPU clusters): `onnxruntime_onnx` models for ONNX files and `tensorrt_plan` models for engines, with
`cc_model_filenames` mapping compute capabilities to engines when several were built.

    tes export-repository OUT --target-tensorrt 10.3.0.26 --target-cc 8.0,9.0   # from the last run

Every engine is checked against the Triton that will run it (its TensorRT version and its GPUs' compute
capabilities) before it is written: an engine for another target is refused with `EngineMismatch` (or rebuilt,
when the caller passes a way to), never shipped. The bundled CPU Triton has only the Python backend, so these
configs are checked by parsing and by the invariants Triton enforces (`validate`), not by loading.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from tritonclient.grpc import model_config_pb2 as mc

from core.errors import EngineMismatch, RepositoryError
from core.files import sha256_file
from core.results import RunDir
from serving.repository import ServingConfig, VersionResult, io_from_onnx, publish_version

_CAPABILITY = re.compile(r"^\d+\.\d+$")
_NUMPY_TO_TRITON = {
    "float32": mc.TYPE_FP32,
    "float16": mc.TYPE_FP16,
    "float64": mc.TYPE_FP64,
    "int64": mc.TYPE_INT64,
    "int32": mc.TYPE_INT32,
    "int16": mc.TYPE_INT16,
    "int8": mc.TYPE_INT8,
    "uint8": mc.TYPE_UINT8,
    "bool": mc.TYPE_BOOL,
    "bfloat16": mc.TYPE_BF16,
}
ENGINE_MANIFEST, VERIFICATION = "engine.json", "verification.json"  # beside each engine (export/trt_engine.py)


@dataclass(frozen=True)
class EngineTarget:
    """The Triton that will run the engines: its TensorRT version (NGC release notes list it; e.g. 10.3.0.26) and
    the compute capabilities of its GPUs ("8.0" A100, "8.6" A10, "8.9" L4/L40, "9.0" H100)."""

    tensorrt_version: str
    compute_capabilities: tuple[str, ...]


@dataclass
class NativeExport:
    versions: list[VersionResult]
    left_out: list[str] = field(default_factory=list)  # engines not exported, each with its reason
    server_args: list[str] = field(default_factory=list)  # tritonserver options these models need


# --- engine compatibility -------------------------------------------------------------------------------------------
def _version(text: str) -> tuple[int, ...]:
    numbers = tuple(int(part) for part in re.findall(r"\d+", text))
    return numbers + (0,) * (4 - len(numbers))  # major, minor, patch, build


def engine_problems(manifest: dict, compute_capability: str, tensorrt_version: str) -> list[str]:
    """Why the engine of `manifest` cannot run on a GPU of `compute_capability` under TensorRT `tensorrt_version`."""
    problems = []
    built_cc, ampere_plus = manifest["compute_capability"], manifest.get("hardware_compatibility") == "ampere_plus"
    if built_cc != compute_capability and not (ampere_plus and _version(compute_capability) >= _version("8.0")):
        problems.append(
            f"built for compute capability {built_cc}, the target GPU has {compute_capability}"
            + (" (Ampere+ engines need 8.0 or later)" if ampere_plus else "")
        )
    built, target = _version(manifest["tensorrt"]), _version(tensorrt_version)
    forward = manifest.get("version_compatible") and built[0] == target[0] and target >= built
    if built != target and not forward:
        rule = (
            "version-compatible engines run on the same or a later version of the same major"
            if manifest.get("version_compatible")
            else "the versions must match exactly"
        )
        problems.append(f"built with TensorRT {manifest['tensorrt']}, the target runs {tensorrt_version} ({rule})")
    return problems


def check_engine(manifest: dict, compute_capability: str, tensorrt_version: str) -> None:
    problems = engine_problems(manifest, compute_capability, tensorrt_version)
    if problems:
        raise EngineMismatch(
            f"engine {manifest.get('engine', '?')} ({manifest.get('precision', '?')}) cannot run on the target: "
            + "; ".join(problems)
            + ". Rebuild it on a GPU of the target with its TensorRT (reproduce.sh beside the engine "
            "has the trtexec command), or build with tensorrt.hardware_compatibility=ampere_plus / "
            "tensorrt.version_compatible=true."
        )


# --- configs --------------------------------------------------------------------------------------------------------
def _common(name: str, platform: str, inputs: list, outputs: list, serving: ServingConfig, gpu: bool) -> mc.ModelConfig:
    config = mc.ModelConfig(name=name, platform=platform, max_batch_size=serving.max_batch_size)
    config.input.extend(inputs)
    config.output.extend(outputs)
    kind = mc.ModelInstanceGroup.KIND_GPU if gpu else mc.ModelInstanceGroup.KIND_CPU
    config.instance_group.add(count=serving.instance_count, kind=kind)
    config.version_policy.latest.num_versions = 1
    if serving.dynamic_batching and serving.max_batch_size > 0:
        config.dynamic_batching.SetInParent()
        config.dynamic_batching.max_queue_delay_microseconds = serving.max_queue_delay_microseconds
        if serving.max_queue_size:
            config.dynamic_batching.default_queue_policy.max_queue_size = serving.max_queue_size
    return config


def onnx_config(name: str, onnx_path: Path, serving: ServingConfig, gpu: bool = True) -> mc.ModelConfig:
    """An `onnxruntime_onnx` model; its tensors are read from the ONNX graph."""
    inputs, outputs = io_from_onnx(Path(onnx_path), batched=serving.max_batch_size > 0)
    config = _common(name, "onnxruntime_onnx", inputs, outputs, serving, gpu)
    config.default_model_filename = "model.onnx"
    return config


def io_from_manifest(manifest: dict, batched: bool) -> tuple[list[mc.ModelInput], list[mc.ModelOutput]]:
    """The engine's own tensors (recorded from the TensorRT network when it was built), batch axis dropped."""
    inputs, outputs = [], []
    for tensor in manifest["tensors"]:
        dims = list(tensor["shape"])
        if batched and (not dims or dims[0] != -1):
            raise RepositoryError(
                f"engine tensor '{tensor['name']}' has shape {dims}: expected a dynamic batch axis "
                "first for max_batch_size > 0; rebuild with a batch profile or set max_batch_size=0"
            )
        if tensor["dtype"] not in _NUMPY_TO_TRITON:
            raise RepositoryError(
                f"engine tensor '{tensor['name']}' has dtype {tensor['dtype']}, which Triton has no type for"
            )
        kind = mc.ModelInput if tensor["mode"] == "input" else mc.ModelOutput
        made = kind(
            name=tensor["name"], data_type=_NUMPY_TO_TRITON[tensor["dtype"]], dims=dims[1:] if batched else dims
        )
        (inputs if tensor["mode"] == "input" else outputs).append(made)
    return inputs, outputs


def plan_config(name: str, manifest: dict, engines: dict[str, str], serving: ServingConfig) -> mc.ModelConfig:
    """A `tensorrt_plan` model; `engines` maps compute capability ("8.0", "9.0") to the engine's file name."""
    inputs, outputs = io_from_manifest(manifest, batched=serving.max_batch_size > 0)
    config = _common(name, "tensorrt_plan", inputs, outputs, serving, gpu=True)
    if len(set(engines.values())) == 1:
        config.default_model_filename = next(iter(engines.values()))
    for capability, file_name in sorted(engines.items()):
        config.cc_model_filenames[capability] = file_name
    return config


# --- validation -----------------------------------------------------------------------------------------------------
def _tensor_problems(config: mc.ModelConfig, inputs: list, outputs: list, source: str) -> list[str]:
    """Config tensors against the model file's: same names, dtypes and dims (what Triton checks at load)."""
    problems = []
    for kind, declared, actual in (("input", config.input, inputs), ("output", config.output, outputs)):
        found = {t.name: t for t in actual}
        for tensor in declared:
            twin = found.pop(tensor.name, None)
            if twin is None:
                problems.append(f"{kind} '{tensor.name}' is not in {source} (its {kind}s: {[t.name for t in actual]})")
            elif (twin.data_type, list(twin.dims)) != (tensor.data_type, list(tensor.dims)):
                problems.append(
                    f"{kind} '{tensor.name}': config says {mc.DataType.Name(tensor.data_type)} {list(tensor.dims)}, "
                    f"{source} has {mc.DataType.Name(twin.data_type)} {list(twin.dims)}"
                )
        problems += [f"{kind} '{name}' of {source} is missing from the config" for name in found]
    return problems


def _file_problems(config: mc.ModelConfig, version_dir: Path) -> list[str]:
    problems = []
    for capability, file_name in config.cc_model_filenames.items():
        if not _CAPABILITY.match(capability):
            problems.append(f"cc_model_filenames key {capability!r} is not a compute capability like '9.0'")
        if not (version_dir / file_name).is_file():
            problems.append(f"cc_model_filenames[{capability!r}] = {file_name!r} is not in {version_dir}")
    default = config.default_model_filename
    if default and not (version_dir / default).is_file():
        problems.append(f"default_model_filename {default!r} is not in {version_dir}")
    if not default and not config.cc_model_filenames:
        problems.append("neither default_model_filename nor cc_model_filenames names the model file")
    return problems


def _onnx_problems(config: mc.ModelConfig, version_dir: Path) -> list[str]:
    path = version_dir / (config.default_model_filename or "model.onnx")
    if not path.is_file():
        return []  # reported by _file_problems
    try:
        inputs, outputs = io_from_onnx(path, batched=config.max_batch_size > 0)
    except RepositoryError as error:
        return [str(error)]
    return _tensor_problems(config, inputs, outputs, f"the ONNX graph {path.name}")


def _plan_problems(config: mc.ModelConfig, version_dir: Path) -> list[str]:
    problems = []
    for file_name in sorted({*config.cc_model_filenames.values(), config.default_model_filename} - {""}):
        manifest_path = (version_dir / file_name).with_suffix(".json")
        if not (version_dir / file_name).is_file():
            continue  # reported by _file_problems
        if not manifest_path.is_file():
            problems.append(
                f"engine {file_name} has no manifest ({manifest_path.name}) beside it: its GPU and TensorRT "
                "version are unknown, so it cannot be checked against the target"
            )
            continue
        manifest = json.loads(manifest_path.read_text())
        try:
            inputs, outputs = io_from_manifest(manifest, batched=config.max_batch_size > 0)
        except RepositoryError as error:
            problems.append(str(error))
            continue
        problems += _tensor_problems(config, inputs, outputs, f"engine {file_name}")
        for name, dims in manifest["profiles"].items():
            if config.max_batch_size > 0 and not dims["min"][0] <= 1 <= config.max_batch_size <= dims["max"][0]:
                problems.append(
                    f"engine {file_name}: input '{name}' takes batch {dims['min'][0]}..{dims['max'][0]}, "
                    f"the config sends 1..{config.max_batch_size}; lower max_batch_size or rebuild"
                )
    return problems


def validate(config: mc.ModelConfig, version_dir: Path) -> None:
    """The invariants Triton checks when it loads a native model, all reported at once."""
    problems = []
    if config.platform not in ("onnxruntime_onnx", "tensorrt_plan"):
        problems.append(f"platform is {config.platform!r}, expected onnxruntime_onnx or tensorrt_plan")
    if config.max_batch_size < 0:
        problems.append(f"max_batch_size is {config.max_batch_size}, expected 0 (no batching) or more")
    for tensor in [*config.input, *config.output]:
        if config.max_batch_size > 0 and not tensor.dims:
            problems.append(f"tensor '{tensor.name}' has no dims besides the batch axis")
        if any(d == 0 or d < -1 for d in tensor.dims):
            problems.append(f"tensor '{tensor.name}' has dims {list(tensor.dims)}: each must be -1 or positive")
    names = [t.name for t in [*config.input, *config.output]]
    if len(set(names)) != len(names):
        problems.append(f"tensor names repeat: {names}")
    problems += _file_problems(config, version_dir)
    if config.platform == "onnxruntime_onnx":
        problems += _onnx_problems(config, version_dir)
    elif config.platform == "tensorrt_plan":
        problems += _plan_problems(config, version_dir)
    if problems:
        raise RepositoryError(f"native model '{config.name}' would not load:\n  - " + "\n  - ".join(problems))


def write_native_version(
    repository: Path, config: mc.ModelConfig, files: dict[str, Path], provenance: dict | None = None
) -> VersionResult:
    """Copy `files` (name in the version -> source) into the next version of `config.name`, validated before the
    staging folder is renamed into place (`serving.repository.publish_version`)."""

    def populate(staging: Path) -> None:
        for name, source in files.items():
            shutil.copyfile(source, staging / name)
        validate(config, staging)

    return publish_version(repository, config.name, config, populate, provenance)


# --- a whole repository from a run ----------------------------------------------------------------------------------
Rebuild = Callable[[str, str], Path]  # (precision, compute capability) -> a new engine folder


def _run_onnx_hashes(run: RunDir, variants: list[dict]) -> set[str]:
    hashes = {v["sha256"] for v in variants if v.get("sha256")}
    exported = run.onnx
    return hashes | ({sha256_file(exported)} if exported.is_file() else set())


def _usable_engines(folders: list[Path], onnx_hashes: set[str]) -> tuple[dict[str, list[tuple[Path, dict]]], list[str]]:
    """Engines grouped by precision, keeping only those verified and accepted and built from this run's ONNX."""
    groups: dict[str, list[tuple[Path, dict]]] = {}
    left_out = []
    for folder in folders:
        manifest = json.loads((folder / ENGINE_MANIFEST).read_text())
        verdict = json.loads((folder / VERIFICATION).read_text()) if (folder / VERIFICATION).is_file() else None
        if verdict is None or verdict.get("status") != "accepted":
            left_out.append(
                f"{folder}: "
                + (f"rejected by verification: {verdict.get('reason')}" if verdict else "never verified against FP32")
            )
        elif manifest["onnx_sha256"] not in onnx_hashes:
            left_out.append(
                f"{folder}: built from an ONNX file that is not this run's (sha256 {manifest['onnx_sha256'][:12]}...)"
            )
        else:
            groups.setdefault(manifest["precision"], []).append((folder, manifest))
    return groups, left_out


def _engines_for_target(
    engines: list[tuple[Path, dict]], target: EngineTarget, precision: str, rebuild: Rebuild | None
) -> dict[str, tuple[Path, dict]]:
    """For every target compute capability, an engine that runs there (rebuilt if allowed), else EngineMismatch."""
    chosen, problems = {}, []
    for capability in target.compute_capabilities:
        found = next(((f, m) for f, m in engines if not engine_problems(m, capability, target.tensorrt_version)), None)
        if found is None and rebuild is not None:
            folder = rebuild(precision, capability)
            found = (folder, json.loads((folder / ENGINE_MANIFEST).read_text()))
            if engine_problems(found[1], capability, target.tensorrt_version):
                found = None
        if found is None:
            problems += [
                f"{capability}: {f / m['engine']}: "
                + "; ".join(engine_problems(m, capability, target.tensorrt_version))
                for f, m in engines
            ]
        else:
            chosen[capability] = found
    if problems:
        raise EngineMismatch(
            f"no {precision} engine runs on every target GPU (TensorRT {target.tensorrt_version}):\n  - "
            + "\n  - ".join(problems)
            + "\nRebuild on a GPU of each missing compute capability with the target's "
            "TensorRT (reproduce.sh beside each engine), or build with hardware/version compatibility."
        )
    return chosen


def _engine_version(
    out: Path, name: str, chosen: dict[str, tuple[Path, dict]], serving: ServingConfig, run: str
) -> VersionResult:
    files, engines = {}, {}
    for capability, (folder, manifest) in chosen.items():
        stem = f"model-sm{manifest['compute_capability'].replace('.', '')}" + (
            "-ampere-plus" if manifest.get("hardware_compatibility") == "ampere_plus" else ""
        )
        files[f"{stem}.plan"], files[f"{stem}.json"] = folder / manifest["engine"], folder / ENGINE_MANIFEST
        engines[capability] = f"{stem}.plan"
    config = plan_config(name, next(iter(chosen.values()))[1], engines, serving)
    return write_native_version(
        out, config, files, {"run": run, "engines": {cc: str(f) for cc, (f, _) in chosen.items()}}
    )


def _engine_plan(
    run: RunDir, variants: list[dict], folders: list[Path], target: EngineTarget | None, rebuild: Rebuild | None
) -> tuple[dict[str, dict[str, tuple[Path, dict]]], list[str]]:
    """Per precision, the engine for every target compute capability; decided before anything is written."""
    if target is None:
        raise RepositoryError(
            f"run {run.run_id} has TensorRT engines: say which Triton will run them (its TensorRT "
            "version and GPUs' compute capabilities: --target-tensorrt 10.3.0.26 --target-cc 8.0,9.0), "
            "or leave them out (--no-engines)"
        )
    hashes = _run_onnx_hashes(run, variants)
    groups, left_out = _usable_engines(folders, hashes)

    def checked_rebuild(precision: str, capability: str) -> Path:  # a rebuilt engine passes the same checks
        folder = rebuild(precision, capability)
        refused = _usable_engines([folder], hashes)[1]
        if refused:
            raise EngineMismatch(
                f"the {precision} engine rebuilt for compute capability {capability} is not usable: {refused[0]}"
            )
        return folder

    plan = {
        precision: _engines_for_target(engines, target, precision, checked_rebuild if rebuild else None)
        for precision, engines in sorted(groups.items())
    }
    return plan, left_out


def export_repository(
    run_dir: Path,
    out: Path,
    model: str,
    serving: ServingConfig,
    gpu: bool = True,
    target: EngineTarget | None = None,
    include_engines: bool = True,
    rebuild: Rebuild | None = None,
    engine_dirs: list[Path] | None = None,
) -> NativeExport:
    """A native repository for another Triton from a finished run: an `onnxruntime_onnx` model per accepted ONNX
    Runtime variant, and a `tensorrt_plan` model per engine precision (`<model>-tensorrt-<precision>`) whose engines
    cover every target compute capability. `engine_dirs` adds engine folders built elsewhere for this run. Engines
    are checked (and rebuilt, if `rebuild` is given) before any model is written."""
    run, out = RunDir(run_dir, create=False), Path(out)
    variants = json.loads(run.variants.read_text())
    folders = sorted(p.parent for p in run.engines.rglob(ENGINE_MANIFEST)) + list(engine_dirs or [])
    plan, left_out = _engine_plan(run, variants, folders, target, rebuild) if folders and include_engines else ({}, [])
    result = NativeExport(versions=[], left_out=left_out)
    for variant in (v for v in variants if v["status"] == "accepted"):
        if (
            variant["runtime"] != "onnxruntime"
        ):  # Triton's OpenVINO backend is not checked here; the Python flavour serves it
            result.left_out.append(
                f"{variant['name']}: runs in {variant['runtime']}, which this flavour does not write "
                "(onnxruntime_onnx and tensorrt_plan only); the Python-backend repository of `tes run` serves it"
            )
            continue
        config = onnx_config(f"{model}-{variant['name']}", Path(variant["path"]), serving, gpu)
        result.versions.append(
            write_native_version(out, config, {"model.onnx": Path(variant["path"])}, {"run": run.run_id})
        )
    for precision, chosen in plan.items():
        result.versions.append(_engine_version(out, f"{model}-tensorrt-{precision}", chosen, serving, run.run_id))
        if any(manifest.get("version_compatible") for _, manifest in chosen.values()):
            result.server_args = ["--backend-config=tensorrt,version-compatible=true"]
    if not result.versions:
        raise RepositoryError(
            f"run {run.path} has no accepted ONNX Runtime variant and no usable engine to export"
            + "".join(f"\n  - {line}" for line in result.left_out)
        )
    return result
