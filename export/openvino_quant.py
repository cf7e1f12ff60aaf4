"""OpenVINO INT8 by NNCF, the quantizer OpenVINO recommends: post-training quantization (`nncf.quantize`) of the
FP32 model read into OpenVINO, and, where that fails the accuracy gate, NNCF's accuracy-controlled quantization
(`nncf.quantize_with_accuracy_control`), which keeps the layers that cost the most accuracy in float until the drop
is within the budget.

The result is OpenVINO IR: `<name>.xml` (the graph) beside `<name>.bin` (the weights). Both are written into a
scratch folder and renamed into place, the weights first, so an `.xml` never names a half-written `.bin`.
An FP32 ONNX model with external data is read by OpenVINO itself (the data resolves beside the graph).
NNCF's ONNX backend is not used: with onnx 1.22 on Python 3.11 it fails at import (a type annotation
`TensorProto.DataType | np.dtype` that Python evaluates).

A Gather that picks one position of an activation (a GPT's last-token logits: (B, T, V) -> (B, V)) is rewritten,
before quantization, as a Gather of a one-element index and a Squeeze: OpenVINO 2026.4's CPU plugin moves the INT8
MatMul's dequantization scale, shaped (1, 1, V), past a scalar-index Gather without dropping the picked axis, so the
compiled INT8 model answers (1, B, V) where the model declares (B, V). Every quantized model is run once on a
calibration batch and refused with the shapes (the variant is skipped) if it still answers a shape FP32 does not.
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


def read_for_quantization(ov, fp32_path: Path):
    """The FP32 model read into OpenVINO with each scalar-index Gather of an activation made a Gather of a
    one-element index and a Squeeze (the same values; see the module docstring for the CPU plugin bug it avoids)."""
    import openvino.opset13 as opset

    model = ov.Core().read_model(str(fp32_path))
    for gather in model.get_ordered_ops():
        if gather.get_type_name() != "Gather":
            continue
        indices, axis = (gather.input_value(i).get_node() for i in (1, 2))
        if not (
            gather.get_attributes().get("batch_dims") == 0
            and gather.get_input_element_type(0).is_real()  # an activation, not a shape computation
            and indices.get_type_name() == "Constant"
            and indices.get_output_partial_shape(0).rank.get_length() == 0
            and axis.get_type_name() == "Constant"
        ):
            continue
        picked = opset.gather(gather.input_value(0), indices.get_data().reshape(1), axis.output(0))
        squeezed = opset.squeeze(picked, axis.get_data().reshape(1))
        names = gather.output(0).get_names()
        gather.output(0).replace(squeezed.output(0))
        squeezed.output(0).get_tensor().set_names(names)  # the served output keeps its name
        squeezed.set_friendly_name(gather.get_friendly_name())
    model.validate_nodes_and_infer_types()
    return model


def declared_shapes(model) -> dict:
    """Output name -> the shape the FP32 model declares (an OpenVINO PartialShape, `?` for a dynamic axis)."""
    return {output.get_any_name(): output.get_partial_shape() for output in model.outputs}


def check_shapes(declared: dict, results: dict[str, np.ndarray]) -> None:
    """Raise VariantSkipped when the INT8 model answers with an output shape the FP32 model does not declare."""
    import openvino as ov

    wrong = [
        f"`{name}` {tuple(value.shape)} where FP32 declares {declared[name]}"
        for name, value in results.items()
        if not declared[name].compatible(ov.PartialShape(list(value.shape)))
    ]
    if wrong:
        raise VariantSkipped(
            "OpenVINO runs NNCF's INT8 model with the wrong output shape: "
            + "; ".join(wrong)
            + " (a CPU plugin transformation of the quantized graph); use openvino-int8 or int8-static instead"
        )


def build_openvino_nncf(
    fp32_path: Path,
    out_dir: Path,
    calibration: list[dict[str, np.ndarray]],
    kind: ModelKind = "auto",
    name: str = "openvino-nncf",
) -> Path:
    """NNCF post-training INT8 of the FP32 ONNX model, calibrated on `calibration` (training split only)."""
    nncf, ov = _nncf()
    model = read_for_quantization(ov, fp32_path)
    declared = declared_shapes(model)
    quantized = nncf.quantize(
        model,
        nncf.Dataset(calibration),
        model_type=model_type_of(fp32_path, kind),
        subset_size=len(calibration),  # every calibration batch (an item is a batch)
    )
    compiled = ov.Core().compile_model(quantized, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    results = compiled.create_infer_request().infer(calibration[0])
    check_shapes(declared, {output.get_any_name(): np.asarray(value) for output, value in results.items()})
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
    model = read_for_quantization(ov, fp32_path)
    declared = declared_shapes(model)

    def validate(compiled, items) -> float:
        request, output = compiled.create_infer_request(), compiled.outputs[0]

        def predict(inputs: dict[str, np.ndarray]) -> np.ndarray:
            value = np.array(request.infer(inputs)[output])
            check_shapes(declared, {output.get_any_name(): value})  # else the metric fails on the shape, obscurely
            return value

        return metric(predict, list(items))

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
