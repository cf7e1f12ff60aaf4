"""`onnx:<path>`: an ONNX file the user already has; there is no torch model (`has_torch_model` is False).

    build_recipe("onnx:model.onnx", {"samples": "inputs.npz"})

The interface is read from the graph (external data is not loaded for that), the FP32 reference outputs come from
ONNX Runtime on the file itself, and the pipeline uses the file as the FP32 model instead of exporting one.
Dynamic axes the graph leaves open get the range (1, sequence_length, max_sequence_length) unless `inputs`
describes them; integer inputs that index an embedding table get ids within that table.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import numpy as np
import onnx
import torch
from google.protobuf.message import DecodeError
from onnx.external_data_helper import ExternalDataInfo, uses_external_data
from pydantic import Field

from core.errors import RecipeError
from recipes.agreement import SampleOptions
from recipes.base import TensorSpec
from recipes.pretrained import InputDescription, Predictor, PretrainedRecipe, files_digest

_VALUE_PRESERVING = {"Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity", "Expand"}  # ops ids pass through
_IR_VERSION_TAG = b"\x08"  # a serialized ModelProto starts with field 1 (ir_version), a varint


class OnnxSourceOptions(SampleOptions):
    inputs: tuple[InputDescription, ...] = Field(
        (), description="inputs described by name, replacing what the graph says (ranges, value ranges)"
    )
    sequence_length: int = Field(128, ge=1, description="typical size of a dynamic axis the graph leaves open")
    max_sequence_length: int = Field(512, ge=1, description="largest size of a dynamic axis the graph leaves open")


def read_graph(path: Path) -> onnx.ModelProto:
    """The model without its external data; `RecipeError` for a file that is not ONNX, is truncated, or whose
    external data files are missing or short."""
    if not path.is_file():
        raise RecipeError(f"ONNX file {path} does not exist")
    size = path.stat().st_size
    with path.open("rb") as stream:
        head = stream.read(1)
    if head != _IR_VERSION_TAG:
        raise RecipeError(f"{path} is not an ONNX model: it does not start like a serialized ModelProto ({size} bytes)")
    try:
        model = onnx.load(str(path), format="protobuf", load_external_data=False)
    except (DecodeError, RuntimeError, ValueError) as error:
        raise RecipeError(
            f"{path} cannot be parsed as ONNX ({error}); it looks truncated or damaged ({size} bytes): copy it again"
        ) from error
    if not model.HasField("graph") or not model.graph.output or not model.opset_import:
        raise RecipeError(
            f"{path} parses but has no complete graph (outputs or opset imports missing); it looks truncated "
            f"({size} bytes): copy it again"
        )
    check_external_data(model, path)
    return model


def check_external_data(model: onnx.ModelProto, path: Path) -> None:
    """Every external data file the graph names must sit beside it and be long enough for its tensors."""
    needed: dict[str, tuple[int, str]] = {}  # file -> (bytes it must have, a tensor stored there)
    for tensor in model.graph.initializer:
        if uses_external_data(tensor):
            info = ExternalDataInfo(tensor)
            end = (info.offset or 0) + (info.length or 0)
            needed[info.location] = (max(end, needed.get(info.location, (0, ""))[0]), tensor.name)
    for location, (end, tensor_name) in sorted(needed.items()):
        data_path = path.parent / location
        if not data_path.is_file():
            raise RecipeError(
                f"{path} keeps tensor '{tensor_name}' (and maybe more) in the external data file '{location}', "
                f"which is missing beside it in {path.parent}: copy '{location}' next to {path.name}"
            )
        if data_path.stat().st_size < end:
            raise RecipeError(
                f"external data file {data_path} has {data_path.stat().st_size} bytes but the graph needs {end}; "
                "it looks truncated: copy it again"
            )


class OnnxSourceRecipe(PretrainedRecipe):
    kind = "onnx"
    has_torch_model = False
    Options = OnnxSourceOptions
    source_example = "onnx:./model.onnx"

    def __init__(self, options: OnnxSourceOptions | None = None):
        super().__init__(options)
        self.graph  # read now: a damaged file fails here, not halfway through the pipeline

    @property
    def onnx_path(self) -> Path:
        """The file the pipeline serves as its FP32 model (with its external data beside it)."""
        return Path(self.source).expanduser()

    @cached_property
    def graph(self) -> onnx.ModelProto:
        return read_graph(self.onnx_path)

    def build_model(self) -> torch.nn.Module:
        raise RecipeError(
            f"'{self.name}' is an ONNX file and has no torch model (recipe.has_torch_model is False): "
            "skip export and use recipe.onnx_path as the FP32 model"
        )

    @cached_property
    def inputs(self) -> list[TensorSpec]:
        described = {description.name: description for description in self.options.inputs}
        initializers = {init.name for init in self.graph.graph.initializer}
        graph_inputs = [value for value in self.graph.graph.input if value.name not in initializers]
        unknown = sorted(set(described) - {value.name for value in graph_inputs})
        if unknown:
            raise RecipeError(
                f"'{self.name}': `inputs` describes {unknown}, which the graph does not take; it takes "
                f"{[value.name for value in graph_inputs]}"
            )
        return [
            described[value.name].spec() if value.name in described else self._spec(value) for value in graph_inputs
        ]

    @cached_property
    def outputs(self) -> list[TensorSpec]:
        return [self._spec(value) for value in self.graph.graph.output]

    def _spec(self, value: onnx.ValueInfoProto) -> TensorSpec:
        tensor_type = value.type.tensor_type
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)).name
        dims = list(tensor_type.shape.dim)
        if not dims or dims[0].HasField("dim_value"):
            raise RecipeError(
                f"'{self.name}': tensor '{value.name}' has no dynamic first (batch) axis (shape "
                f"{[d.dim_value or d.dim_param for d in dims]}); the pipeline batches on the first axis: export the "
                "model with a dynamic batch axis"
            )
        typical = min(self.options.sequence_length, self.options.max_sequence_length)
        shape, ranges = [], {}
        for axis, dim in enumerate(dims[1:]):
            if dim.HasField("dim_value") and dim.dim_value > 0:
                shape.append(dim.dim_value)
            else:
                shape.append(-1)
                ranges[axis] = (1, typical, self.options.max_sequence_length)
        return TensorSpec(value.name, dtype, tuple(shape), ranges, self._value_range(value.name, dtype))

    def _value_range(self, name: str, dtype: str) -> tuple[float, float] | None:
        """For integer inputs: ids within the table they index (a Gather on an initializer, reached directly or
        through ops that only move values, like Reshape), or 0..1 for a mask."""
        if np.dtype(dtype).kind not in "iu":
            return None
        tables = {init.name: init.dims[0] for init in self.graph.graph.initializer if init.dims}
        values, seen = [name], set()
        while values:
            value = values.pop()
            seen.add(value)
            for node in self.graph.graph.node:
                if node.op_type == "Gather" and node.input[1:2] == [value] and node.input[0] in tables:
                    return 0, tables[node.input[0]] - 1
                if node.op_type in _VALUE_PRESERVING and node.input[:1] == [value]:
                    values += [output for output in node.output if output not in seen]
        return (0, 1) if "mask" in name else None

    @cached_property
    def _session(self):
        import onnxruntime as ort

        try:
            return ort.InferenceSession(str(self.onnx_path), providers=["CPUExecutionProvider"])
        except Exception as error:  # ORT raises its own exception types for graphs it cannot load
            raise RecipeError(f"ONNX Runtime cannot load {self.onnx_path}: {error}") from error

    def _reference(self) -> Predictor:
        names = [spec.name for spec in self.inputs]
        return lambda inputs: self._session.run(None, {name: inputs[name] for name in names})[0]

    def data_fingerprint(self) -> str:
        """The ONNX file, its external data and the samples."""
        locations = {ExternalDataInfo(t).location for t in self.graph.graph.initializer if uses_external_data(t)}
        files = [self.onnx_path, *(self.onnx_path.parent / location for location in sorted(locations))]
        if self.options.samples is not None:
            files.append(Path(self.options.samples))
        return files_digest(files)
