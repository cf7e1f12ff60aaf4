"""Precision variants of a verified FP32 ONNX model: dynamic INT8, calibrated static INT8 (QDQ), FP16.

Each builder writes one ONNX file atomically and returns its path; a variant that cannot be built here raises
`VariantSkipped` with the reason. `qdq_drift` ranks the nodes of a QDQ model whose activations drift most from
FP32, using ONNX Runtime's QDQ debugging utilities, so they can be excluded from quantization.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from core.errors import ExportError
from core.files import atomic_write

log = logging.getLogger(__name__)

ALL_VARIANTS: tuple[str, ...] = ("fp32", "int8-dynamic", "int8-static", "fp16", "openvino-bf16", "openvino-int8")
# variant -> (runtime, inference precision hint) for the variants that run outside ONNX Runtime
CALIBRATION_METHODS = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy, "percentile": CalibrationMethod.Percentile}


class VariantSkipped(ExportError):
    """The variant cannot be built or run on this machine; the message is the reason."""


class _Batches(CalibrationDataReader):
    """Feeds calibration batches (training split only) to ONNX Runtime's calibrator."""

    def __init__(self, batches: list[dict[str, np.ndarray]]):
        self._batches = batches
        self._iterator = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._iterator, None)

    def rewind(self) -> None:
        self._iterator = iter(self._batches)


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """The quantizer warns on the root logger once per 1-D weight that per-channel axis 1 does not apply
    (LayerNorm scales): noise for our users, so it is held back while it runs."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def preprocess(fp32_path: Path, out_dir: Path) -> Path:
    """ONNX Runtime's recommended pre-processing before static quantization (shape inference, graph optimizations)."""
    target = out_dir / "preprocessed.onnx"
    if not target.exists():
        atomic_write(target, lambda tmp: quant_pre_process(str(fp32_path), str(tmp), skip_symbolic_shape=False))
    return target


def build_int8_dynamic(fp32_path: Path, out_dir: Path, per_channel: bool = False, exclude: Iterable[str] = ()) -> Path:
    target = out_dir / "int8-dynamic.onnx"
    with _quiet_root_logger():
        atomic_write(target, lambda tmp: quantize_dynamic(
            str(fp32_path), str(tmp), weight_type=QuantType.QInt8, per_channel=per_channel, nodes_to_exclude=list(exclude)))
    return target


def build_int8_static(fp32_path: Path, out_dir: Path, calibration: list[dict[str, np.ndarray]], method: str = "minmax",
                      per_channel: bool = True, exclude: Iterable[str] = (), name: str = "int8-static",
                      op_types: Iterable[str] | None = ("MatMul", "Gemm", "Conv")) -> Path:
    """QDQ (S8 weights, U8 activations) calibrated on `calibration`, which must come from the training split.

    By default only MatMul/Gemm/Conv are quantized: quantizing everything also quantizes the additive attention
    mask and the softmax, which took stdlib-gpt's next-byte accuracy from 0.55 to 0.13 (matmuls only: 0.547).
    """
    if method not in CALIBRATION_METHODS:
        raise ExportError(f"calibration method {method!r}: expected one of {sorted(CALIBRATION_METHODS)}")
    target = out_dir / f"{name}.onnx"
    preprocessed = preprocess(fp32_path, out_dir)
    with _quiet_root_logger():
        atomic_write(target, lambda tmp: quantize_static(
            str(preprocessed), str(tmp), _Batches(calibration), quant_format=QuantFormat.QDQ, per_channel=per_channel,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=CALIBRATION_METHODS[method],
            nodes_to_exclude=list(exclude), calibration_providers=["CPUExecutionProvider"],
            op_types_to_quantize=list(op_types) if op_types else None))
    return target


def build_fp16(fp32_path: Path, out_dir: Path) -> Path:
    """FP16 weights and compute, FP32 inputs and outputs (the safer interface for clients)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    target = out_dir / "fp16.onnx"
    converted = convert_float_to_float16(onnx.load(str(fp32_path)), keep_io_types=True)
    atomic_write(target, lambda tmp: onnx.save(converted, str(tmp)))
    return target


def producing_nodes(model_path: Path) -> dict[str, str]:
    """Tensor name -> name of the node that produces it."""
    graph = onnx.load(str(model_path), load_external_data=False).graph
    return {output: node.name for node in graph.node for output in node.output}


def qdq_drift(fp32_path: Path, qdq_path: Path, out_dir: Path, calibration: list[dict[str, np.ndarray]], top: int = 5) -> list[dict]:
    """The nodes whose quantized outputs are furthest from their float values (lowest SQNR in dB first).

    ONNX Runtime's `qdq_loss_debug` runs both models with every intermediate tensor as an output and pairs them.
    """
    from onnxruntime.quantization.qdq_loss_debug import (
        collect_activations, compute_activation_error, create_activation_matching, modify_model_output_intermediate_tensors)

    float_model = preprocess(fp32_path, out_dir)
    with tempfile.TemporaryDirectory() as scratch, _quiet_root_logger():
        float_aug, qdq_aug = Path(scratch) / "float.onnx", Path(scratch) / "qdq.onnx"
        modify_model_output_intermediate_tensors(str(float_model), str(float_aug))
        modify_model_output_intermediate_tensors(str(qdq_path), str(qdq_aug))
        float_acts = collect_activations(str(float_aug), _Batches(calibration))
        qdq_acts = collect_activations(str(qdq_aug), _Batches(calibration))
    errors = compute_activation_error(create_activation_matching(qdq_acts, float_acts))
    producers = producing_nodes(float_model)
    ranked = []
    for tensor, error in errors.items():
        node = producers.get(tensor)
        # local error (this tensor, quantized vs not) finds the node that causes drift; the cross-model
        # error (quantized model vs FP32 model) also counts what upstream nodes did
        local, drift = float(error.get("qdq_err", float("inf"))), float(error.get("xmodel_err", float("inf")))
        if node and np.isfinite(local):
            ranked.append({"node": node, "tensor": tensor, "local_sqnr_db": local, "sqnr_vs_fp32_db": drift})
    ranked.sort(key=lambda item: item["local_sqnr_db"])
    return ranked[:top]
