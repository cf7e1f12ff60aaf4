"""The Triton model repository writer.

A new version is assembled in `<model>/.staging-*` (Triton ignores folders whose names are not numbers),
checksummed, then renamed to its number in one step, so Triton never sees a half-written version.
`config.pbtxt` comes from Triton's own `ModelConfig` protobuf, never from a string template.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Literal

import onnx
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from core.errors import ChecksumError, RepositoryError
from core.files import atomic_write_json, atomic_write_text, fsync_dir, onnx_data_files, sha256_file

BACKEND_MODEL_FILE = Path(__file__).parent / "backend" / "model.py"
STAGING_PREFIX = ".staging-"
VERSION_MANIFEST = "manifest.json"
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
INSTANCE_KINDS = {
    "auto": mc.ModelInstanceGroup.KIND_AUTO,
    "cpu": mc.ModelInstanceGroup.KIND_CPU,
    "gpu": mc.ModelInstanceGroup.KIND_GPU,
}

_ONNX_TO_TRITON = {
    onnx.TensorProto.FLOAT: mc.TYPE_FP32,
    onnx.TensorProto.FLOAT16: mc.TYPE_FP16,
    onnx.TensorProto.DOUBLE: mc.TYPE_FP64,
    onnx.TensorProto.INT64: mc.TYPE_INT64,
    onnx.TensorProto.INT32: mc.TYPE_INT32,
    onnx.TensorProto.INT16: mc.TYPE_INT16,
    onnx.TensorProto.INT8: mc.TYPE_INT8,
    onnx.TensorProto.UINT8: mc.TYPE_UINT8,
    onnx.TensorProto.BOOL: mc.TYPE_BOOL,
}


@dataclass(frozen=True)
class ServingConfig:
    """How Triton should run the model."""

    max_batch_size: int = 32
    dynamic_batching: bool = True
    max_queue_delay_microseconds: int = 0  # 0: no waiting at low load; under load the batcher still groups what queued
    max_queue_size: int = 0  # requests waiting beyond this are refused at once; 0: no limit
    instance_count: int = 1
    intra_op_threads: int = 0  # 0: ONNX Runtime's default
    value_ranges: dict[str, tuple[float, float]] = field(default_factory=dict)
    max_dims: dict[str, list[int]] = field(default_factory=dict)  # per input, the largest size of each axis
    runtime: str = "onnxruntime"  # or "openvino", "torch": what the Python-backend model runs the model file with
    runtime_precision: str = ""  # OpenVINO's inference precision hint ("bf16", "f32")
    runtime_settings: dict = field(default_factory=dict)  # core.runtimes.RuntimeSettings fields, as measured best
    model_file: str = "model.onnx"  # the model file's name in the version folder (model.xml, model.pt2)
    # where instances run: "cpu"; "gpu" (every GPU of the server; the load fails on a server without one); "auto"
    # (Triton decides: the GPUs when it has some, else the CPU)
    instance_kind: Literal["auto", "cpu", "gpu"] = "cpu"
    precision: str = ""  # the variant (fp32, fp16, int8-static...): GPU instances build their TensorRT engine at it


@dataclass(frozen=True)
class VersionResult:
    model_name: str
    version: int
    path: Path
    config_path: Path
    files: dict[str, str]  # file name -> sha256
    reused: bool = False  # the newest version already held exactly these files and this config


def check_model_name(name: str) -> str:
    """Refuse names that could escape the repository or that Triton would misread."""
    if not isinstance(name, str) or not _MODEL_NAME.match(name) or ".." in name:
        raise RepositoryError(
            f"model name {name!r} is not allowed: expected 1-128 characters of letters, digits, '_', '-', '.', "
            "starting with a letter or digit, with no '/' and no '..' (for example 'stdlib-gpt')"
        )
    return name


def model_dir(repository: Path, name: str) -> Path:
    """`repository/name`, refusing any path (or symlink) that resolves outside the repository."""
    root = Path(repository).resolve()
    folder = root / check_model_name(name)
    if folder.is_symlink() or (folder.exists() and folder.resolve().parent != root):
        raise RepositoryError(
            f"model folder {folder} is a symlink or resolves outside the repository {root}; "
            "remove it, the writer only writes real folders inside the repository"
        )
    return folder


def versions(folder: Path) -> list[int]:
    if not folder.is_dir():
        return []
    return sorted(int(child.name) for child in folder.iterdir() if child.is_dir() and child.name.isdigit())


def clean_staging(folder: Path) -> list[Path]:
    """Remove leftovers of writes that were killed before their rename."""
    leftovers = [child for child in folder.glob(f"{STAGING_PREFIX}*") if child.is_dir()] if folder.is_dir() else []
    for leftover in leftovers:
        shutil.rmtree(leftover, ignore_errors=True)
    return leftovers


def io_from_onnx(onnx_path: Path, batched: bool) -> tuple[list[mc.ModelInput], list[mc.ModelOutput]]:
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    initializers = {init.name for init in graph.initializer}

    def dims_and_type(value: onnx.ValueInfoProto) -> tuple[int, list[int]]:
        tensor = value.type.tensor_type
        if tensor.elem_type not in _ONNX_TO_TRITON:
            raise RepositoryError(
                f"tensor '{value.name}' in {onnx_path}: ONNX type {tensor.elem_type} has no Triton type"
            )
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim]
        if batched:
            if not dims or dims[0] not in (-1,):
                raise RepositoryError(
                    f"tensor '{value.name}' in {onnx_path}: first axis is {dims[:1]}, expected a dynamic batch axis "
                    "for max_batch_size > 0; export with a dynamic batch axis or set max_batch_size=0"
                )
            dims = dims[1:]
        return _ONNX_TO_TRITON[tensor.elem_type], dims

    inputs = []
    for value in graph.input:
        if value.name in initializers:
            continue
        data_type, dims = dims_and_type(value)
        inputs.append(mc.ModelInput(name=value.name, data_type=data_type, dims=dims))
    outputs = []
    for value in graph.output:
        data_type, dims = dims_and_type(value)
        outputs.append(mc.ModelOutput(name=value.name, data_type=data_type, dims=dims))
    return inputs, outputs


def build_config(name: str, onnx_path: Path, serving: ServingConfig) -> mc.ModelConfig:
    """The `python`-flavour ModelConfig for an ONNX file, its tensors read from the ONNX graph."""
    inputs, outputs = io_from_onnx(onnx_path, batched=serving.max_batch_size > 0)
    config = mc.ModelConfig(name=name, backend="python", max_batch_size=serving.max_batch_size)
    config.input.extend(inputs)
    config.output.extend(outputs)
    if serving.instance_kind not in INSTANCE_KINDS:
        raise RepositoryError(
            f"model '{name}': instance_kind {serving.instance_kind!r} is not one of {sorted(INSTANCE_KINDS)}"
        )
    # count instances on each GPU (KIND_GPU without `gpus`: every GPU the server sees), or on the CPU
    config.instance_group.add(count=serving.instance_count, kind=INSTANCE_KINDS[serving.instance_kind])
    config.version_policy.latest.num_versions = 1
    if serving.dynamic_batching and serving.max_batch_size > 0:
        config.dynamic_batching.SetInParent()  # present even when every field keeps its default
        config.dynamic_batching.max_queue_delay_microseconds = serving.max_queue_delay_microseconds
        if serving.max_queue_size:
            config.dynamic_batching.default_queue_policy.max_queue_size = serving.max_queue_size
    config.parameters["intra_op_threads"].string_value = str(serving.intra_op_threads)
    config.parameters["value_ranges"].string_value = json.dumps({k: list(v) for k, v in serving.value_ranges.items()})
    config.parameters["max_dims"].string_value = json.dumps(serving.max_dims)
    config.parameters["runtime"].string_value = serving.runtime
    if serving.runtime_precision:
        config.parameters["runtime_precision"].string_value = serving.runtime_precision
    if serving.runtime_settings:
        config.parameters["runtime_settings"].string_value = json.dumps(serving.runtime_settings, sort_keys=True)
    if serving.model_file != "model.onnx":
        config.parameters["model_file"].string_value = serving.model_file
    if serving.precision:  # serving/backend/model.py: the TensorRT execution provider's fp16 / int8 switches
        config.parameters["precision"].string_value = serving.precision
    return config


def config_text(config: mc.ModelConfig) -> str:
    return text_format.MessageToString(config)


def parse_config(text: str) -> mc.ModelConfig:
    return text_format.Parse(text, mc.ModelConfig())


def write_version(
    repository: str | Path,
    name: str,
    onnx_path: str | Path,
    serving: ServingConfig,
    provenance: dict | None = None,
    companions: Iterable[str | Path] = (),
    interface: str | Path | None = None,
) -> VersionResult:
    """Write `repository/name/<next>/` (the model file, the files it needs beside it, model.py, manifest.json) and
    `repository/name/config.pbtxt`. The model file is ONNX, OpenVINO IR (`.xml`, with its `.bin` in `companions`)
    or an AOTInductor package (`.pt2`); it is stored as `model<suffix>`, an IR's `.bin` as `model.bin`.
    An ONNX graph's external data files (those its `location` fields name, found here whether or not they are in
    `companions`) keep their own names: the graph is copied byte for byte and finds them beside it as before.
    Every file is checksummed in the version's manifest. The tensors come from the ONNX graph of `interface`
    (default: the model file itself)."""
    onnx_path = Path(onnx_path)
    data = _external_data(onnx_path)
    sources = list({source.resolve(): source for source in [onnx_path, *map(Path, companions), *data]}.values())
    for source in sources:
        if not source.is_file():
            raise RepositoryError(f"model file {source} does not exist; run the export and precision stages first")
    if onnx_path.suffix != ".onnx" and interface is None:
        raise RepositoryError(f"{onnx_path} is not ONNX: pass the ONNX file whose tensors it takes as `interface`")
    data_resolved = {path.resolve() for path in data}
    names = {
        source: source.name if source.resolve() in data_resolved else f"model{source.suffix}" for source in sources
    }
    taken = [*names.values(), "model.py", VERSION_MANIFEST]
    if len(set(taken)) != len(taken):
        raise RepositoryError(
            f"model files {[str(s) for s in sources]} would share a name in the version folder "
            f"(as {sorted(names.values())}, beside model.py and {VERSION_MANIFEST}); rename the external data file"
        )
    serving = dataclasses.replace(serving, model_file=names[onnx_path])

    def populate(staging: Path) -> None:
        for source, target in names.items():
            shutil.copyfile(source, staging / target)
        shutil.copyfile(BACKEND_MODEL_FILE, staging / "model.py")

    files = {target: sha256_file(source) for source, target in names.items()}
    files["model.py"] = sha256_file(BACKEND_MODEL_FILE)
    config = build_config(name, Path(interface or onnx_path), serving)
    return publish_version(repository, name, config, populate, provenance, dict(sorted(files.items())))


def _external_data(onnx_path: Path) -> list[Path]:
    """The external data files of an ONNX model file; each must be a plain name beside the graph, since the version
    folder is flat."""
    if onnx_path.suffix != ".onnx" or not onnx_path.is_file():
        return []
    data = onnx_data_files(onnx_path)
    nested = [str(path) for path in data if path.parent != onnx_path.parent]
    if nested:
        raise RepositoryError(
            f"{onnx_path} names external data {nested} outside its own folder; save it with the data beside the "
            "graph (onnx.save_model(model, path, save_as_external_data=True, location='model.onnx.data'))"
        )
    return data


def publish_version(
    repository: str | Path,
    name: str,
    config: mc.ModelConfig,
    populate: Callable[[Path], None],
    provenance: dict | None = None,
    files: dict[str, str] | None = None,
) -> VersionResult:
    """Assemble a version in a staging folder (`populate` fills it), checksum it, write the model's config, and
    rename the folder to the next version number. Leftover staging folders of killed writes are removed first.
    When the newest version already holds `files` (name -> sha256) under the same config, it is returned as is."""
    folder = model_dir(Path(repository), name)
    folder.mkdir(parents=True, exist_ok=True)
    clean_staging(folder)
    same = _newest_if_identical(folder, config_text(config), files or {})
    if same is not None:
        return same
    staging = folder / f"{STAGING_PREFIX}{uuid.uuid4().hex[:12]}"
    staging.mkdir()
    try:
        populate(staging)
        files = {path.name: sha256_file(path) for path in sorted(staging.iterdir()) if path.is_file()}
        atomic_write_json(staging / VERSION_MANIFEST, {"model": name, "files": files, "provenance": provenance or {}})
        config_path = atomic_write_text(folder / "config.pbtxt", config_text(config))
        version = _rename_into_place(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return VersionResult(name, version, folder / str(version), config_path, files)


def _newest_if_identical(folder: Path, text: str, files: dict[str, str]) -> VersionResult | None:
    numbers, config_path = versions(folder), folder / "config.pbtxt"
    if not numbers or not config_path.is_file() or config_path.read_text(encoding="utf-8") != text:
        return None
    newest = folder / str(numbers[-1])
    manifest_path = newest / VERSION_MANIFEST
    if not manifest_path.is_file():
        return None
    recorded = json.loads(manifest_path.read_text(encoding="utf-8"))["files"]
    if recorded != files:
        return None
    return VersionResult(folder.name, numbers[-1], newest, config_path, recorded, reused=True)


def read_config(repository: str | Path, name: str) -> mc.ModelConfig:
    path = model_dir(Path(repository), name) / "config.pbtxt"
    if not path.is_file():
        raise RepositoryError(f"model '{name}' has no config.pbtxt in {repository}; deploy it first")
    return parse_config(path.read_text(encoding="utf-8"))


def write_alias(repository: str | Path, alias: str, target: str, provenance: dict | None = None) -> VersionResult:
    """An ensemble `alias` that forwards every request to `target` unchanged, so clients keep one URL while the
    model behind it changes. Its tensors and batch size are the target's."""
    target_config = read_config(repository, target)
    config = mc.ModelConfig(name=alias, platform="ensemble", max_batch_size=target_config.max_batch_size)
    config.input.extend(target_config.input)
    config.output.extend(target_config.output)
    config.version_policy.latest.num_versions = 1
    step = config.ensemble_scheduling.step.add(model_name=target, model_version=-1)
    for tensor in target_config.input:
        step.input_map[tensor.name] = tensor.name
    for tensor in target_config.output:
        step.output_map[tensor.name] = tensor.name
    return publish_version(repository, alias, config, lambda staging: None, {"alias_of": target, **(provenance or {})})


def serving_config_of(config: mc.ModelConfig) -> ServingConfig:
    """The `ServingConfig` a python-flavour `config.pbtxt` was built from (to rewrite it with changes)."""

    def parameter(key: str, default: str) -> str:
        return config.parameters[key].string_value if key in config.parameters else default

    group = config.instance_group[0] if config.instance_group else None
    return ServingConfig(
        max_batch_size=config.max_batch_size,
        dynamic_batching=config.HasField("dynamic_batching"),
        max_queue_delay_microseconds=config.dynamic_batching.max_queue_delay_microseconds,
        max_queue_size=config.dynamic_batching.default_queue_policy.max_queue_size,
        instance_count=group.count if group else 1,
        intra_op_threads=int(parameter("intra_op_threads", "0")),
        value_ranges={k: tuple(v) for k, v in json.loads(parameter("value_ranges", "{}")).items()},
        max_dims=json.loads(parameter("max_dims", "{}")),
        runtime=parameter("runtime", "onnxruntime"),
        runtime_precision=parameter("runtime_precision", ""),
        runtime_settings=json.loads(parameter("runtime_settings", "{}")),
        model_file=parameter("model_file", "model.onnx"),
        instance_kind={kind: name for name, kind in INSTANCE_KINDS.items()}.get(group.kind, "cpu") if group else "cpu",
        precision=parameter("precision", ""),
    )


def alias_target(repository: str | Path, alias: str) -> str | None:
    """The model an ensemble alias forwards to, or None if `alias` is not an alias."""
    config = read_config(repository, alias)
    steps = config.ensemble_scheduling.step if config.platform == "ensemble" else []
    return steps[0].model_name if len(steps) == 1 else None


def newest_provenance(repository: str | Path, model: str) -> tuple[dict, Path]:
    """What the newest version of `model` was made from (its manifest's `provenance`: recipe, options, run), and
    that version's folder. An ensemble alias is followed to the model it forwards to."""
    repository = Path(repository)
    folder = model_dir(repository, model)
    if not versions(folder):
        raise RepositoryError(f"model '{model}' has no version in {repository}; deploy it first (tes run / tes demo)")
    target = alias_target(repository, model)
    if target:
        folder = model_dir(repository, target)
        if not versions(folder):
            raise RepositoryError(
                f"model '{model}' forwards to '{target}', which has no version in {repository}; "
                "deploy it again (tes run / tes demo)"
            )
    version_dir = folder / str(versions(folder)[-1])
    manifest_path = version_dir / VERSION_MANIFEST
    if not manifest_path.is_file():
        raise RepositoryError(
            f"{version_dir} has no {VERSION_MANIFEST}, so what it was made from is unknown; "
            "it was not written by the repository writer"
        )
    return json.loads(manifest_path.read_text(encoding="utf-8")).get("provenance", {}), version_dir


def _rename_into_place(staging: Path, folder: Path) -> int:
    """Rename to the next free number; a concurrent writer that took it makes us try the next one."""
    for _ in range(100):
        version = (versions(folder) or [0])[-1] + 1
        target = folder / str(version)
        try:
            staging.rename(target)  # fails if `target` exists and is not empty
        except OSError:
            if target.exists():
                continue
            raise
        fsync_dir(folder)
        return version
    raise RepositoryError(f"could not find a free version number in {folder}")


def verify_version(version_path: str | Path) -> dict[str, str]:
    """Check every file of a version against its manifest; raise `ChecksumError` on any difference."""
    version_path = Path(version_path)
    manifest_path = version_path / VERSION_MANIFEST
    if not manifest_path.is_file():
        raise ChecksumError(f"{version_path} has no {VERSION_MANIFEST}; it was not written by the repository writer")
    recorded = json.loads(manifest_path.read_text(encoding="utf-8"))["files"]
    problems = []
    for file_name, expected in recorded.items():
        path = version_path / file_name
        got = sha256_file(path) if path.is_file() else "missing"
        if got != expected:
            problems.append(f"{path}: sha256 {got[:16]}..., expected {expected[:16]}...")
    if problems:
        raise ChecksumError(
            "artifacts changed since they were written:\n  - "
            + "\n  - ".join(problems)
            + "\nRe-run the pipeline to write a fresh version; do not edit files inside a version folder."
        )
    return recorded
