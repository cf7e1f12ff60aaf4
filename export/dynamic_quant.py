"""The int8-dynamic variant: S8 weights, activations quantized at run time, by ONNX Runtime's own quantizer
(`quantize_dynamic`'s steps, in an order that holds the weights in memory once: 1.5x the weights' bytes at the peak
where `quantize_dynamic` takes 3x; the model written is the same, byte for byte, `tests/unit/test_quantize_memory.py`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

import onnx
from onnxruntime.quantization import QuantType
from onnxruntime.quantization.onnx_model import ONNXModel
from onnxruntime.quantization.onnx_quantizer import ONNXQuantizer
from onnxruntime.quantization.quant_utils import QuantizationMode, add_infer_metadata, update_opset_version
from onnxruntime.quantization.registry import IntegerOpsRegistry

from core.errors import ExportError
from core.files import atomic_write_with_companions, has_external_data


@contextlib.contextmanager
def quiet_root_logger() -> Iterator[None]:
    """The quantizer warns on the root logger once per 1-D weight that per-channel axis 1 does not apply
    (LayerNorm scales): noise for our users, so it is held back while it runs."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def build_int8_dynamic(
    fp32_path: str | Path, out_dir: str | Path, per_channel: bool = False, exclude: Iterable[str] = ()
) -> Path:
    """S8 weights, activations quantized at run time: ONNX Runtime's `quantize_dynamic`, in steps so that the
    weights are in memory once (`_dynamic_quantizer`); the model it writes is the same, byte for byte."""
    fp32_path, out_dir = Path(fp32_path), Path(out_dir)
    target = out_dir / "int8-dynamic.onnx"
    external = has_external_data(fp32_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    with quiet_root_logger():
        with tempfile.TemporaryDirectory(prefix=".int8-dynamic-", dir=out_dir) as scratch:
            quantizer, left_empty = _dynamic_quantizer(fp32_path, Path(scratch), per_channel, list(exclude))
            quantizer.quantize_model()
            # protobuf frees a message's memory only with the whole message: the float weights the quantizer took
            # out of its model stay in memory until that model goes, and serializing can take 5x the output's size
            quantized = onnx.ModelProto()
            quantized.CopyFrom(quantizer.model.model)
            del quantizer
        kept = left_empty & {tensor.name for tensor in quantized.graph.initializer}
        if kept:
            raise ExportError(
                f"int8-dynamic of {fp32_path}: initializers {sorted(kept)} were left empty as unread, yet the "
                "quantized model keeps them; expected ONNX Runtime's quantizer to drop unread initializers (another "
                "onnxruntime version?)"
            )
        # with `external`, as `<its output's name>.data`
        atomic_write_with_companions(target, lambda tmp: ONNXModel(quantized).save_model_to_file(str(tmp), external))
    return target


# ONNXQuantizer's reload saves with onnx.save_model's default size_threshold: from this size on, a tensor is external
# there, so its values are out of sight of the reload's shape inference whether it is detached here or not.
_DETACHED_MIN_BYTES = 1024
_SPILL_FILE = "spilled.data"


def _dynamic_quantizer(
    fp32_path: Path, scratch: Path, per_channel: bool, exclude: list[str]
) -> tuple[ONNXQuantizer, set[str]]:
    """The quantizer `quantize_dynamic` builds, with the same arguments and model, holding the weights once; and the
    initializers it was left to drop with their values never loaded (`_reattach_initializers`).

    `quantize_dynamic` loads the model with its weights, then ONNXQuantizer's constructor deep-copies it to save it,
    infer shapes and load it back while the first copy is still held: three copies of every weight at once (3.0x
    the weights' bytes, measured on 1 GiB), two through quantization, six of Gemm weights (it transposes them).
    Here the model it is given has its large initializers detached (left in a data file), and they are loaded once,
    into the reloaded model that it quantizes (1.5x measured; 2.5x for Gemm weights, loaded with their transposes
    while those are made)."""
    inferred = scratch / "inferred.onnx"
    onnx.shape_inference.infer_shapes_path(str(fp32_path), str(inferred))  # as `quantize_dynamic`: on the file
    model = onnx.load(str(inferred), load_external_data=False)  # with any inline weights: spilled next
    detached: dict[str, tuple[list[tuple[str, str]], Path]] = {}
    model = _detach_initializers(model, fp32_path.parent, scratch, detached)
    onnx.external_data_helper.load_external_data_for_model(model, str(fp32_path.parent))  # the small ones
    add_infer_metadata(model)  # as `quantize_dynamic`'s loader: the shapes are inferred
    model = update_opset_version(model, QuantType.QInt8)
    model = _gemm_as_matmul(model, fp32_path.parent, scratch, detached)
    quantizer = ONNXQuantizer(
        model,
        per_channel=per_channel,
        reduce_range=False,
        mode=QuantizationMode.IntegerOps,
        static=False,
        weight_qType=QuantType.QInt8,
        activation_qType=QuantType.QUInt8,  # dynamic activations are uint8 only
        tensors_range=None,
        nodes_to_quantize=[],
        nodes_to_exclude=exclude,
        op_types_to_quantize=list(IntegerOpsRegistry),
        extra_options={"MatMulConstBOnly": True},
    )
    return quantizer, _reattach_initializers(quantizer.model.model, detached)


def _detach_initializers(
    model: onnx.ModelProto, data_dir: Path, scratch: Path, detached: dict[str, tuple[list[tuple[str, str]], Path]]
) -> onnx.ModelProto:
    """`model` without the values of its main graph's initializers of `_DETACHED_MIN_BYTES` or more: inline ones are
    written (spilled) to a data file in `scratch` and `model` re-parsed without them; then all are marked inline and
    empty, their external data entries and folder (`data_dir`, or `scratch` for the spilled) put in `detached`."""
    spilled = set()
    for tensor in model.graph.initializer:
        if tensor.HasField("raw_data") and _nbytes(tensor) >= _DETACHED_MIN_BYTES:
            onnx.external_data_helper.set_external_data(tensor, _SPILL_FILE)
            onnx.external_data_helper.save_external_data(tensor, str(scratch))  # appended; sets offset and length
            tensor.ClearField("raw_data")
            spilled.add(tensor.name)
    if spilled:  # protobuf frees the spilled values only with the whole message
        model = onnx.ModelProto.FromString(model.SerializeToString())
    for tensor in model.graph.initializer:
        if onnx.external_data_helper.uses_external_data(tensor) and _nbytes(tensor) >= _DETACHED_MIN_BYTES:
            entries = [(entry.key, entry.value) for entry in tensor.external_data]
            detached[tensor.name] = (entries, scratch if tensor.name in spilled else data_dir)
            del tensor.external_data[:]
            tensor.data_location = onnx.TensorProto.DEFAULT
    return model


def _gemm_as_matmul(
    model: onnx.ModelProto, data_dir: Path, scratch: Path, detached: dict[str, tuple[list[tuple[str, str]], Path]]
) -> onnx.ModelProto:
    """ONNXQuantizer's constructor turns Gemm into MatMul and transposes Gemm weights, for which they must be loaded:
    done here first, with ONNX Runtime's own code (the constructor then finds no Gemm), and the weights and their
    transposes detached again."""
    gemm_inputs = _node_inputs(model.graph, "Gemm")
    if not gemm_inputs:
        return model
    for tensor in model.graph.initializer:
        if tensor.name in gemm_inputs and tensor.name in detached:
            _attach(tensor, *detached.pop(tensor.name))
    ONNXModel(model).replace_gemm_with_matmul()
    return _detach_initializers(model, data_dir, scratch, detached)


def _reattach_initializers(model: onnx.ModelProto, detached: dict[str, tuple[list[tuple[str, str]], Path]]) -> set[str]:
    """Load the `detached` initializers that `model` (the quantizer's reloaded model) reads into it; return those it
    does not read (a Gemm weight read transposed), left empty: the quantizer drops unread initializers."""
    read = _node_inputs(model.graph) | {output.name for output in model.graph.output}
    present = {tensor.name for tensor in model.graph.initializer}
    if set(detached) - present:
        raise ExportError(
            f"ONNX Runtime's quantizer dropped initializers {sorted(set(detached) - present)} from its model; "
            "expected to find every initializer it was given (another onnxruntime version?)"
        )
    for tensor in model.graph.initializer:
        if tensor.name in detached and tensor.name in read:
            _attach(tensor, *detached[tensor.name])
    return set(detached) - read


def _attach(tensor: onnx.TensorProto, entries: list[tuple[str, str]], data_dir: Path) -> None:
    """Load a detached tensor's value, as `onnx.load` loads external data."""
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in entries:
        tensor.external_data.add(key=key, value=value)
    onnx.external_data_helper.load_external_data_for_tensor(tensor, str(data_dir))
    tensor.data_location = onnx.TensorProto.DEFAULT
    del tensor.external_data[:]


def _nbytes(tensor: onnx.TensorProto) -> int:
    """The size of its value, from its shape: an external tensor's value is not loaded. 0 for a type onnx does not
    know, which leaves the tensor as it is."""
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except KeyError:
        return 0
    return math.prod(tensor.dims) * itemsize


def _node_inputs(graph: onnx.GraphProto, op_type: str | None = None) -> set[str]:
    """What the nodes (of `op_type`, if given) of `graph` and its subgraphs read."""
    names: set[str] = set()
    for node in graph.node:
        if op_type is None or node.op_type == op_type:
            names.update(node.input)
        for attribute in node.attribute:
            for subgraph in [attribute.g] if attribute.HasField("g") else attribute.graphs:
                names |= _node_inputs(subgraph, op_type)
    return names
