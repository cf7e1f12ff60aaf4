"""Dynamic INT8 is built in steps so that the weights are in memory once (`_dynamic_quantizer` in export/quantize.py,
instead of the three copies `quantize_dynamic` holds); the model it writes must still be the one ONNX Runtime's
`quantize_dynamic` writes, byte for byte, however the float model stores its weights.

Run: .venv/bin/python -m pytest -q tests/unit/test_quantize_memory.py
"""

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import QuantType, quantize_dynamic

from export.dynamic_quant import build_int8_dynamic

HIDDEN = 32


def tiny_model(opset: int = 17) -> onnx.ModelProto:
    """tokens (batch, seq) -> embedding -> MatMul/Add/Relu -> (batch*seq, HIDDEN) -> Gemm (transB) -> Relu -> Gemm ->
    logits; `w1` is read by its Gemm and by a MatMul too; a product of two activations (as attention's) -> scores;
    image (1, 3, 4, 4) -> Conv -> features."""
    rng = np.random.default_rng(0)
    weights = {
        "embedding": rng.standard_normal((50, HIDDEN)),
        "w0": rng.standard_normal((HIDDEN, HIDDEN)),
        "b0": rng.standard_normal(HIDDEN),
        "w1": rng.standard_normal((HIDDEN, HIDDEN)),
        "b1": rng.standard_normal(HIDDEN),
        "w2": rng.standard_normal((HIDDEN, 10)),
        "b2": rng.standard_normal(10),
        "conv_w": rng.standard_normal((8, 3, 3, 3)),
    }
    initializers = [numpy_helper.from_array(value.astype(np.float32), name) for name, value in weights.items()]
    initializers.append(numpy_helper.from_array(np.array([-1, HIDDEN], dtype=np.int64), "flat"))
    nodes = [
        helper.make_node("Gather", ["embedding", "tokens"], ["e"], name="embed"),
        helper.make_node("MatMul", ["e", "w0"], ["m0"], name="mm0"),
        helper.make_node("Add", ["m0", "b0"], ["a0"], name="add0"),
        helper.make_node("Relu", ["a0"], ["r0"], name="relu0"),
        helper.make_node("Reshape", ["r0", "flat"], ["flat_r0"], name="flatten"),
        helper.make_node("Gemm", ["flat_r0", "w1", "b1"], ["g1"], name="gemm1", transB=1),
        helper.make_node("MatMul", ["flat_r0", "w1"], ["shared"], name="mm_shared"),
        helper.make_node("Relu", ["g1"], ["r1"], name="relu1"),
        helper.make_node("Gemm", ["r1", "w2", "b2"], ["logits"], name="gemm2"),
        helper.make_node("Transpose", ["r1"], ["r1_t"], name="transpose"),
        helper.make_node("MatMul", ["r1", "r1_t"], ["scores"], name="activations_product"),  # stays float
        helper.make_node("Conv", ["image", "conv_w"], ["features"], name="conv", pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [
            helper.make_tensor_value_info("tokens", TensorProto.INT64, ["batch", "seq"]),
            helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 4, 4]),
        ],
        [
            helper.make_tensor_value_info(name, TensorProto.FLOAT, None)
            for name in ("logits", "shared", "scores", "features")
        ],
        initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def save(model: onnx.ModelProto, path: Path, layout: str) -> Path:
    """`layout`: "inline"; "external" (onnx's default threshold: small tensors stay inline); "external-all" (every
    tensor external, as the export's threshold forced to 0 gives)."""
    path.parent.mkdir(parents=True)
    if layout == "inline":
        onnx.save_model(model, str(path))
    else:
        threshold = 0 if layout == "external-all" else 1024
        onnx.save_model(
            model, str(path), save_as_external_data=True, location=f"{path.name}.data", size_threshold=threshold
        )
    return path


def outputs(model_path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"]).run(None, feeds)


@pytest.mark.parametrize(
    "layout, opset, options",
    [
        ("inline", 17, {}),
        ("inline", 17, {"per_channel": True}),
        ("inline", 17, {"exclude": ["mm0", "gemm1"]}),
        ("external", 17, {}),
        ("external", 17, {"per_channel": True, "exclude": ["embed"]}),
        ("external-all", 17, {}),
        ("external-all", 17, {"per_channel": True}),
        ("external-all", 17, {"exclude": ["mm0", "gemm1"]}),
        ("external-all", 9, {}),  # quantize_dynamic converts opsets before 10 to 11 first
        ("inline", 9, {"per_channel": True}),
    ],
)
def test_int8_dynamic_writes_what_quantize_dynamic_writes(tmp_path: Path, layout: str, opset: int, options: dict):
    fp32 = save(tiny_model(opset), tmp_path / "fp32" / "model.onnx", layout)
    expected = tmp_path / "expected" / "int8-dynamic.onnx"
    expected.parent.mkdir()
    quantize_dynamic(
        str(fp32),
        str(expected),
        weight_type=QuantType.QInt8,
        per_channel=options.get("per_channel", False),
        nodes_to_exclude=options.get("exclude", []),
        use_external_data_format=layout != "inline",
    )

    built = build_int8_dynamic(fp32, tmp_path / "built", **options)

    names = sorted(p.name for p in expected.parent.iterdir())
    assert sorted(p.name for p in built.parent.iterdir()) == names  # and no scratch left behind
    assert names == (["int8-dynamic.onnx"] if layout == "inline" else ["int8-dynamic.onnx", "int8-dynamic.onnx.data"])
    for name in names:
        assert (built.parent / name).read_bytes() == (expected.parent / name).read_bytes(), name
    rng = np.random.default_rng(1)
    feeds = {
        "tokens": rng.integers(0, 50, (2, 5), dtype=np.int64),
        "image": rng.standard_normal((1, 3, 4, 4)).astype(np.float32),
    }
    for got, want in zip(outputs(built, feeds), outputs(expected, feeds), strict=True):
        np.testing.assert_array_equal(got, want)


def test_int8_dynamic_quantizes_the_weights(tmp_path: Path):
    """The byte comparison above would also pass if neither quantized anything: the weights of MatMul, Gemm (now
    MatMul, with its weight transposed), Gather and Conv become 8-bit."""
    fp32 = save(tiny_model(), tmp_path / "fp32" / "model.onnx", "external-all")
    graph = onnx.load(str(build_int8_dynamic(fp32, tmp_path / "built")), load_external_data=False).graph
    eight_bit = {t.name for t in graph.initializer if t.data_type in (TensorProto.INT8, TensorProto.UINT8)}
    assert {"embedding_quantized", "w0_quantized", "w1_Transposed_quantized", "w2_quantized"} <= eight_bit
    assert "conv_w_quantized" in eight_bit
    assert {node.op_type for node in graph.node} >= {"MatMulInteger", "ConvInteger", "DynamicQuantizeLinear"}
