"""OpenVINO INT8 by NNCF, the quantizer OpenVINO recommends: post-training quantization (`nncf.quantize`) of the
FP32 model read into OpenVINO, and, where that fails the accuracy gate, NNCF's accuracy-controlled quantization
(`nncf.quantize_with_accuracy_control`), which keeps the layers that cost the most accuracy in float until the drop
is within the budget.

The result is OpenVINO IR: `<name>.xml` (the graph) beside `<name>.bin` (the weights). Both are written into a
scratch folder and renamed into place, the weights first, so an `.xml` never names a half-written `.bin`.
An FP32 ONNX model with external data is read by OpenVINO itself (the data resolves beside the graph).
NNCF's ONNX backend is not used: with onnx 1.22 on Python 3.11 it fails at import (a type annotation
`TensorProto.DataType | np.dtype` that Python evaluates).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Literal

import numpy as np
import onnx

from core.errors import VariantSkipped

log = logging.getLogger(__name__)

ModelKind = Literal["auto", "transformer", "default"]


def model_type_of(fp32_path: Path, kind: ModelKind):
    """NNCF's model-type preset: TRANSFORMER (which keeps attention's softmax and products of activations out of
    INT8 and quantizes activations asymmetrically) for a graph with attention (a Softmax), else NNCF's default."""
    import nncf

    if kind == "auto":
        graph = onnx.load(str(fp32_path), load_external_data=False).graph
        kind = "transformer" if any(node.op_type == "Softmax" for node in graph.node) else "default"
    return nncf.ModelType.TRANSFORMER if kind == "transformer" else None


def _nncf():
    try:
        import nncf
        import openvino as ov
    except ImportError as error:
        raise VariantSkipped(f"NNCF quantization needs nncf and openvino: {error}") from error
    logging.getLogger("nncf").setLevel(logging.WARNING)  # one progress bar per statistic otherwise
    return nncf, ov


def build_openvino_nncf(
    fp32_path: Path,
    out_dir: Path,
    calibration: list[dict[str, np.ndarray]],
    kind: ModelKind = "auto",
    name: str = "openvino-nncf",
) -> Path:
    """NNCF post-training INT8 of the FP32 ONNX model, calibrated on `calibration` (training split only)."""
    nncf, ov = _nncf()
    model = ov.Core().read_model(str(fp32_path))
    quantized = nncf.quantize(
        model,
        nncf.Dataset(calibration),
        model_type=model_type_of(fp32_path, kind),
        subset_size=len(calibration),  # every calibration batch (an item is a batch)
    )
    return _save(ov, quantized, out_dir, name)


def build_openvino_nncf_accuracy_control(
    fp32_path: Path,
    out_dir: Path,
    calibration: list[dict[str, np.ndarray]],
    validation: list,
    metric: Callable[[Callable[[dict[str, np.ndarray]], np.ndarray], Iterable], float],
    max_drop: float,
    kind: ModelKind = "auto",
    name: str = "openvino-nncf-ac",
) -> Path:
    """NNCF's accuracy-controlled INT8: quantize, then return layers to float, most harmful first, until `metric`
    on `validation` (held-out samples the accuracy gate does not score) drops at most `max_drop` (relative).
    `metric(predict, validation)` gets a function from input arrays to the first output."""
    nncf, ov = _nncf()
    if not validation:
        raise VariantSkipped("accuracy control needs held-out validation samples beyond those the gate scores")
    model = ov.Core().read_model(str(fp32_path))

    def validate(compiled, items) -> float:
        request = compiled.create_infer_request()
        return metric(lambda inputs: np.array(request.infer(inputs)[compiled.outputs[0]]), list(items))

    quantized = nncf.quantize_with_accuracy_control(
        model,
        nncf.Dataset(calibration),
        nncf.Dataset(validation),
        validate,
        max_drop=max_drop,
        drop_type=nncf.DropType.RELATIVE,
        model_type=model_type_of(fp32_path, kind),
        subset_size=len(calibration),
    )
    return _save(ov, quantized, out_dir, name)


def _save(ov, model, out_dir: Path, name: str) -> Path:
    target = out_dir / f"{name}.xml"
    scratch = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=out_dir))
    try:
        ov.save_model(model, str(scratch / target.name), compress_to_fp16=False)
        os.replace(scratch / target.with_suffix(".bin").name, target.with_suffix(".bin"))
        os.replace(scratch / target.name, target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target
