"""Precision variants of a verified FP32 ONNX model: dynamic INT8, calibrated static INT8 (QDQ), FP16.

Each builder writes one ONNX file atomically and returns its path; a variant that cannot be built here raises
`VariantSkipped` with the reason. `qdq_drift` ranks the nodes of a QDQ model whose activations drift most from
FP32, using ONNX Runtime's QDQ debugging utilities, so they can be excluded from quantization.

An FP32 model with external data (past 2 GB, or forced by the export's threshold) gives variants with external data
too: one `<variant>.onnx.data` beside each graph, written before it.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Iterable

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from core.errors import ExportError, VariantSkipped
from core.files import atomic_write_with_companions, has_external_data
from export.dynamic_quant import quiet_root_logger

log = logging.getLogger(__name__)

ALL_VARIANTS: tuple[str, ...] = (
    "fp32",
    "int8-dynamic",
    "int8-static",
    "fp16",
    "openvino-bf16",
    "openvino-int8",
    "openvino-nncf",
    "torch-compile",
    "torchao-int8",
)
CALIBRATION_METHODS = {
    "minmax": CalibrationMethod.MinMax,
    "entropy": CalibrationMethod.Entropy,
    "percentile": CalibrationMethod.Percentile,
}


class _Batches(CalibrationDataReader):
    """Feeds calibration batches (training split only) to ONNX Runtime's calibrator."""

    def __init__(self, batches: list[dict[str, np.ndarray]]):
        self._batches = batches
        self._iterator = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._iterator, None)

    def rewind(self) -> None:
        self._iterator = iter(self._batches)


def save_onnx(model: onnx.ModelProto, path: Path, external: bool) -> None:
    """`model` to `path`; with `external`, its tensors in one `<name>.onnx.data` beside it (past 2 GB a protobuf
    cannot hold them). Saving externally empties `model`'s tensors: it is for a model about to be dropped."""
    if external:
        onnx.save_model(
            model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=f"{path.name}.data"
        )
    else:
        onnx.save_model(model, str(path))


def preprocess(fp32_path: Path, out_dir: Path) -> Path:
    """ONNX Runtime's recommended pre-processing before static quantization (shape inference, graph optimizations).
    With external data, symbolic shape inference is left out: it holds a second copy of every weight in memory, and
    the exported graph's shapes come from torch.export already (ONNX's shape inference still runs)."""
    target = out_dir / "preprocessed.onnx"
    if not target.exists():
        external = has_external_data(fp32_path)
        atomic_write_with_companions(
            target,
            lambda tmp: quant_pre_process(
                str(fp32_path),
                str(tmp),
                skip_symbolic_shape=external,
                save_as_external_data=external,
                all_tensors_to_one_file=True,
                external_data_location=f"{target.name}.data",
            ),
        )
    return target


def _constants(graph: onnx.GraphProto) -> set[str]:
    return {init.name for init in graph.initializer} | {
        out for node in graph.node if node.op_type == "Constant" for out in node.output
    }


def quantized_nodes(
    model_path: Path, op_types: Iterable[str] | None, weights_only: bool = True, exclude: Iterable[str] = ()
) -> list[str]:
    """Names of the nodes static INT8 quantizes: those of `op_types` (every type if None), with `weights_only` only
    those that take a constant (initializer) input, the layers with weights, as opposed to products of two
    activations such as attention's Q·K^T and its weighted sum of V; minus `exclude`."""
    graph = onnx.load(str(model_path), load_external_data=False).graph
    constants, wanted, excluded = _constants(graph), set(op_types) if op_types else None, set(exclude)
    return [
        node.name
        for node in graph.node
        if (wanted is None or node.op_type in wanted)
        and node.name not in excluded
        and (not weights_only or any(i in constants for i in node.input))
    ]


def activation_ranges(
    model_path: Path, tensors: Iterable[str], calibration: list[dict[str, np.ndarray]]
) -> dict[str, tuple[float, float]]:
    """(lowest, highest) of each float tensor over the calibration batches, from the float model (its graph with
    those tensors as outputs, saved beside it so that its external data, if any, resolves; the weights are read
    once, by ONNX Runtime)."""
    model = onnx.load(str(model_path), load_external_data=False)
    present = {output.name for output in model.graph.output}
    wanted = list(dict.fromkeys(tensors))
    model.graph.output.extend(
        onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None) for name in wanted if name not in present
    )
    with tempfile.NamedTemporaryFile(prefix=".ranges-", suffix=".onnx", dir=Path(model_path).parent) as graph_file:
        onnx.save_model(model, graph_file.name)
        session = ort.InferenceSession(graph_file.name, providers=["CPUExecutionProvider"])
    ranges: dict[str, tuple[float, float]] = {}
    for batch in calibration:
        for name, value in zip(wanted, session.run(wanted, batch)):
            low, high = float(value.min()), float(value.max())
            previous = ranges.get(name, (low, high))
            ranges[name] = (min(low, previous[0]), max(high, previous[1]))
    return ranges


def activation_overrides(
    model_path: Path, nodes: Iterable[str], calibration: list[dict[str, np.ndarray]], skew: float = 0.25
) -> dict:
    """With symmetric S8 activations, a tensor that is almost all positive (after a GELU or ReLU) would use half
    the int8 range; those get U8 with a zero point instead, per tensor (TensorQuantOverrides)."""
    graph = onnx.load(str(model_path), load_external_data=False).graph
    constants, wanted = _constants(graph), set(nodes)
    activations = [i for node in graph.node if node.name in wanted for i in node.input if i and i not in constants]
    ranges = activation_ranges(model_path, activations, calibration)
    return {
        name: [{"quant_type": QuantType.QUInt8, "symmetric": False}]
        for name, (low, high) in ranges.items()
        if high > 0 and low >= -skew * high
    }


def build_int8_static(
    fp32_path: Path,
    out_dir: Path,
    calibration: list[dict[str, np.ndarray]],
    method: str = "minmax",
    per_channel: bool = True,
    exclude: Iterable[str] = (),
    name: str = "int8-static",
    op_types: Iterable[str] | None = ("MatMul", "Gemm", "Conv"),
    weights_only: bool = True,
    symmetric_activations: bool = False,
) -> Path:
    """QDQ (S8 weights, U8 activations) calibrated on `calibration`, which must come from the training split.

    By default only MatMul/Gemm/Conv are quantized: quantizing everything also quantizes the additive attention
    mask and the softmax, which took stdlib-gpt's next-byte accuracy from 0.55 to 0.13 (matmuls only: 0.547).
    With `weights_only` (the default) only those with a constant weight are: attention's activation-by-activation
    products stay in float, which kept the demo model's accuracy (-1.4% with them quantized, 0.0% without, in
    OpenVINO) and lets OpenVINO keep its fused attention (benchmarks/precision.py).
    `symmetric_activations` gives S8 activations with zero point 0: OpenVINO applies a non-zero activation zero
    point as separate f32 subtractions around its int8 kernels, which took a fifth of the demo model's time.
    Tensors that are almost all positive keep U8 with a zero point (`activation_overrides`): symmetric S8 there cost
    the demo model 1.2% accuracy, mixed 0.35%.
    """
    if method not in CALIBRATION_METHODS:
        raise ExportError(f"calibration method {method!r}: expected one of {sorted(CALIBRATION_METHODS)}")
    target = out_dir / f"{name}.onnx"
    preprocessed = preprocess(fp32_path, out_dir)
    excluded = set(exclude)
    nodes = quantized_nodes(preprocessed, op_types, weights_only, excluded)
    if weights_only and not nodes:
        raise VariantSkipped(
            f"no {'/'.join(op_types or ['any'])} node with a constant weight is left to quantize"
            + (f" after excluding {sorted(excluded)}" if excluded else "")
        )
    extra: dict = {"ActivationSymmetric": symmetric_activations}
    if symmetric_activations:
        overrides = activation_overrides(preprocessed, nodes, calibration)
        if overrides:
            extra["TensorQuantOverrides"] = overrides
    with quiet_root_logger(), tempfile.TemporaryDirectory(prefix=f".{name}-calibration-", dir=out_dir) as scratch:
        ranges = calibrate(preprocessed, calibration, method, op_types, Path(scratch))
        atomic_write_with_companions(
            target,
            lambda tmp: quantize_static(
                str(preprocessed),
                str(tmp),
                None,  # the ranges come from `calibration_cache_path`
                quant_format=QuantFormat.QDQ,
                per_channel=per_channel,
                activation_type=QuantType.QInt8 if symmetric_activations else QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CALIBRATION_METHODS[method],
                nodes_to_quantize=nodes if weights_only else None,
                nodes_to_exclude=list(excluded),
                calibration_providers=["CPUExecutionProvider"],
                op_types_to_quantize=list(op_types) if op_types else None,
                extra_options=extra,
                use_external_data_format=has_external_data(preprocessed),  # as `<its output's name>.data`
                calibration_cache_path=str(ranges),
            ),
        )
    return target


def calibrate(
    model_path: Path,
    calibration: list[dict[str, np.ndarray]],
    method: str,
    op_types: Iterable[str] | None,
    scratch: Path,
) -> Path:
    """The activation ranges `quantize_static` would compute, as ONNX Runtime's calibration cache (`ranges.json` in
    `scratch`), with the same calibrator and the same tensors. A step of its own for memory: calibrating inside
    `quantize_static` holds the weights three times at once (its own model, the calibrator's, the calibration
    session); here the calibrator's copy and session are freed before the quantizer loads the model."""
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    calibrator = create_calibrator(
        model_path,
        list(op_types) if op_types else list(set(QLinearOpsRegistry) | set(QDQRegistry)),  # quantize_static's default
        augmented_model_path=str(scratch / "augmented.onnx"),
        calibrate_method=CALIBRATION_METHODS[method],
        use_external_data_format=has_external_data(model_path),
        providers=["CPUExecutionProvider"],
    )
    calibrator.collect_data(_Batches(calibration))
    ranges = scratch / "ranges.json"
    save_tensors_data(calibrator.compute_data(), ranges)
    return ranges


def build_fp16(fp32_path: Path, out_dir: Path) -> Path:
    """FP16 weights and compute, FP32 inputs and outputs (the safer interface for clients)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    target = out_dir / "fp16.onnx"
    # a path, not a ModelProto: its shape inference then runs on the file, which works past 2 GB
    converted = convert_float_to_float16(str(fp32_path), keep_io_types=True)
    external = has_external_data(fp32_path)
    atomic_write_with_companions(target, lambda tmp: save_onnx(converted, tmp, external))
    return target


def qdq_drift(
    fp32_path: Path,
    qdq_path: Path,
    out_dir: Path,
    calibration: list[dict[str, np.ndarray]],
    top: int = 5,
    quantized: Iterable[str] | None = None,
) -> list[dict]:
    """The quantized nodes (of `quantized`, if given) that read the tensors furthest from their float values
    (lowest SQNR in dB first): excluding them from quantization removes that error.

    ONNX Runtime's `qdq_loss_debug` runs both models with every intermediate tensor as an output and pairs them.
    """
    from onnxruntime.quantization.qdq_loss_debug import (
        collect_activations,
        compute_activation_error,
        create_activation_matching,
        modify_model_output_intermediate_tensors,
    )

    float_model = preprocess(fp32_path, out_dir)
    with tempfile.TemporaryDirectory() as scratch, quiet_root_logger():
        float_aug, qdq_aug = Path(scratch) / "float.onnx", Path(scratch) / "qdq.onnx"
        modify_model_output_intermediate_tensors(
            str(float_model), str(float_aug), save_as_external_data=has_external_data(float_model)
        )
        modify_model_output_intermediate_tensors(
            str(qdq_path), str(qdq_aug), save_as_external_data=has_external_data(qdq_path)
        )
        float_acts = collect_activations(str(float_aug), _Batches(calibration))
        qdq_acts = collect_activations(str(qdq_aug), _Batches(calibration))
    errors = compute_activation_error(create_activation_matching(qdq_acts, float_acts))
    consumers = quantizing_consumers(qdq_path)
    allowed = set(quantized) if quantized is not None else None
    ranked = []
    for tensor, error in errors.items():
        # local error (this tensor, quantized vs not) finds where drift comes from; the cross-model error
        # (quantized model vs FP32 model) also counts what upstream nodes did. A tensor's quantization belongs to
        # the nodes that read its quantized form: excluding those is what takes it out of int8.
        local, drift = float(error.get("qdq_err", float("inf"))), float(error.get("xmodel_err", float("inf")))
        if np.isfinite(local):
            ranked += [
                {"node": node, "tensor": tensor, "local_sqnr_db": local, "sqnr_vs_fp32_db": drift}
                for node in consumers.get(tensor, [])
                if allowed is None or node in allowed
            ]
    ranked.sort(key=lambda item: item["local_sqnr_db"])
    return ranked[:top]


def quantizing_consumers(qdq_path: Path) -> dict[str, list[str]]:
    """Float tensor name -> the nodes of a QDQ model that read it through QuantizeLinear -> DequantizeLinear."""
    graph = onnx.load(str(qdq_path), load_external_data=False).graph
    readers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    found: dict[str, list[str]] = {}
    for quantize_node in (n for n in graph.node if n.op_type == "QuantizeLinear"):
        for dq in (r for r in readers.get(quantize_node.output[0], []) if r.op_type == "DequantizeLinear"):
            consumers = found.setdefault(quantize_node.input[0], [])
            for reader in readers.get(dq.output[0], []):
                if reader.op_type not in ("QuantizeLinear", "DequantizeLinear") and reader.name not in consumers:
                    consumers.append(reader.name)
    return found
