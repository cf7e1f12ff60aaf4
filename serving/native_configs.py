"""Triton model configs for the `native` repository flavour (`serving/native_repository.py`) and the checks they
pass before they are written: `onnx_config`, `plan_config` and `openvino_backend_config` build a `ModelConfig` for
each backend; `engine_problems` / `check_engine` say whether an engine runs on a target GPU and TensorRT version; and
`validate` checks a version folder for the invariants Triton and its backends enforce at load, all at once.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from tritonclient.grpc import model_config_pb2 as mc

from core.errors import EngineMismatch, RepositoryError
from serving.repository import ServingConfig, io_from_onnx

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
# openvino_backend (src/openvino.cc, README "Parameters"): the keys it reads and the values it takes (any case); any
# other key it refuses at load ("not yet supported by openvino backend"). Its default model file is model.xml
# (weights in model.bin beside it); default_model_filename "model.onnx" makes it read ONNX.
_OPENVINO_VALUES = {
    "PERFORMANCE_HINT": r"latency|throughput|cumulative_throughput",
    "INFERENCE_NUM_THREADS": r"\d+",
    "COMPILATION_NUM_THREADS": r"\d+",
    "HINT_BF16": r"yes",
    "NUM_STREAMS": r"auto|numa|\d+",
    "ENABLE_BATCH_PADDING": r"yes|no",
    "SKIP_OV_DYNAMIC_BATCHSIZE": r"yes|no",
    "RESHAPE_IO_LAYERS": r"yes|no",
    "TARGET_DEVICE": r".+",  # CPU (default), GPU, NPU, AUTO...: these models run on CPU instances
    "CPU_EXTENSION_PATH": r".+",
}
_OV_TO_TRITON = {
    "f32": mc.TYPE_FP32,
    "f16": mc.TYPE_FP16,
    "f64": mc.TYPE_FP64,
    "bf16": mc.TYPE_BF16,
    "i64": mc.TYPE_INT64,
    "i32": mc.TYPE_INT32,
    "i16": mc.TYPE_INT16,
    "i8": mc.TYPE_INT8,
    "u8": mc.TYPE_UINT8,
    "boolean": mc.TYPE_BOOL,
}


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
def _common(name: str, runs_on: dict, inputs: list, outputs: list, serving: ServingConfig, gpu: bool) -> mc.ModelConfig:
    """The parts every native model shares; `runs_on` is {"platform": ...} or {"backend": ...}."""
    config = mc.ModelConfig(name=name, max_batch_size=serving.max_batch_size, **runs_on)
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
    config = _common(name, {"platform": "onnxruntime_onnx"}, inputs, outputs, serving, gpu)
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
    config = _common(name, {"platform": "tensorrt_plan"}, inputs, outputs, serving, gpu=True)
    if len(set(engines.values())) == 1:
        config.default_model_filename = next(iter(engines.values()))
    for capability, file_name in sorted(engines.items()):
        config.cc_model_filenames[capability] = file_name
    return config


def openvino_parameters(precision: str | None, settings: dict, serving: ServingConfig) -> dict[str, str]:
    """The openvino_backend parameters for what the precision stage measured best (`core.runtimes.openvino_config`'s
    twin, in the keys the backend reads). It has no key for f32 float layers: only HINT_BF16 turns bf16 on."""
    parameters = {"PERFORMANCE_HINT": settings.get("performance_hint") or "LATENCY"}
    threads = serving.intra_op_threads or settings.get("threads", 0)
    if threads:
        parameters["INFERENCE_NUM_THREADS"] = str(threads)
    if settings.get("streams"):
        parameters["NUM_STREAMS"] = str(settings["streams"])
    if precision == "bf16":
        parameters["HINT_BF16"] = "YES"
    if serving.max_batch_size > 0:
        # the backend fixes the batch axis to max_batch_size (ov::set_batch) and refuses any other batch unless it
        # may pad it with zeros: without this, a request of batch 1 fails
        parameters["ENABLE_BATCH_PADDING"] = "YES"
    return parameters


def openvino_backend_config(
    name: str,
    model_file: str,
    interface: Path,
    serving: ServingConfig,
    precision: str | None = None,
    settings: dict | None = None,
) -> mc.ModelConfig:
    """A `backend: "openvino"` model on CPU instances (the backend refuses GPU ones) running `model_file`
    ("model.xml": an IR, "model.onnx"); its tensors are read from the ONNX graph `interface`."""
    inputs, outputs = io_from_onnx(Path(interface), batched=serving.max_batch_size > 0)
    config = _common(name, {"backend": "openvino"}, inputs, outputs, serving, gpu=False)
    config.default_model_filename = model_file
    for key, value in openvino_parameters(precision, settings or {}, serving).items():
        config.parameters[key].string_value = value
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
    if not default and not config.cc_model_filenames and config.backend != "openvino":  # its default: model.xml
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


def _ir_tensors(path: Path, batched: bool) -> tuple[list[mc.ModelInput], list[mc.ModelOutput]]:
    """An OpenVINO IR's own tensors, as the backend reads them (`read_model`), batch axis dropped."""
    import openvino as ov

    model = ov.Core().read_model(str(path))

    def described(kind: type, port) -> mc.ModelInput | mc.ModelOutput:
        shape, element = port.get_partial_shape(), port.get_element_type().get_type_name()
        if shape.rank.is_dynamic or element not in _OV_TO_TRITON:
            raise RepositoryError(
                f"tensor '{port.get_any_name()}' of {path.name}: {element} {shape} has no Triton form"
            )
        dims = [d.get_length() if d.is_static else -1 for d in shape]
        return kind(name=port.get_any_name(), data_type=_OV_TO_TRITON[element], dims=dims[1:] if batched else dims)

    return [described(mc.ModelInput, p) for p in model.inputs], [described(mc.ModelOutput, p) for p in model.outputs]


def _openvino_problems(config: mc.ModelConfig, version_dir: Path) -> list[str]:
    """What openvino_backend refuses at load or at a request: a GPU instance group, a parameter it does not read or a
    value it does not take, batches it cannot run, an IR without its weights, tensors the model file lacks."""
    problems = [
        f"instance group kind {mc.ModelInstanceGroup.Kind.Name(group.kind)}: the openvino backend runs KIND_CPU "
        "(or KIND_AUTO) instances only"
        for group in config.instance_group
        if group.kind not in (mc.ModelInstanceGroup.KIND_CPU, mc.ModelInstanceGroup.KIND_AUTO)
    ]
    for key, parameter in config.parameters.items():
        value = parameter.string_value
        if key not in _OPENVINO_VALUES:
            problems.append(f"parameter {key!r} is not one the openvino backend reads: {sorted(_OPENVINO_VALUES)}")
        elif value and not re.fullmatch(_OPENVINO_VALUES[key], value, re.IGNORECASE):
            problems.append(f"parameter {key} is {value!r}, the openvino backend takes {_OPENVINO_VALUES[key].upper()}")
    padding = (
        config.parameters["ENABLE_BATCH_PADDING"].string_value if "ENABLE_BATCH_PADDING" in config.parameters else ""
    )
    if config.max_batch_size > 0 and padding.lower() != "yes":
        problems.append(
            f"max_batch_size is {config.max_batch_size} without ENABLE_BATCH_PADDING=YES: the openvino backend "
            f"refuses every batch but {config.max_batch_size}; set it, or max_batch_size=0"
        )
    path = version_dir / (config.default_model_filename or "model.xml")
    if not path.is_file():
        return problems + ([f"model.xml is not in {version_dir}"] if not config.default_model_filename else [])
    if path.suffix == ".onnx":
        return problems + _onnx_problems(config, version_dir)
    if path.suffix != ".xml":
        return problems + [f"default_model_filename {path.name!r}: expected model.xml (an IR) or model.onnx"]
    if not path.with_suffix(".bin").is_file():
        return problems + [f"the IR {path.name} has no weights {path.with_suffix('.bin').name} beside it"]
    try:
        inputs, outputs = _ir_tensors(path, batched=config.max_batch_size > 0)
    except ImportError:
        return problems  # without OpenVINO here, the IR's tensors are checked by the server when it loads
    except (RepositoryError, RuntimeError) as error:
        return problems + [f"the IR {path.name}: {error}"]
    return problems + _tensor_problems(config, inputs, outputs, f"the IR {path.name}")


def validate(config: mc.ModelConfig, version_dir: Path) -> None:
    """The invariants Triton (and its onnxruntime, tensorrt and openvino backends) checks when it loads a native
    model, all reported at once."""
    problems = []
    openvino = config.backend == "openvino" and not config.platform
    if config.platform not in ("onnxruntime_onnx", "tensorrt_plan") and not openvino:
        problems.append(
            f"platform is {config.platform!r} and backend {config.backend!r}, expected platform onnxruntime_onnx or "
            "tensorrt_plan, or backend openvino"
        )
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
    elif openvino:
        problems += _openvino_problems(config, version_dir)
    if problems:
        raise RepositoryError(f"native model '{config.name}' would not load:\n  - " + "\n  - ".join(problems))
