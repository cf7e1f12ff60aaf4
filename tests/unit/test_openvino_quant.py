"""NNCF's OpenVINO INT8 of a byte GPT: the quantized model answers in the shape the FP32 model declares, on both
NNCF paths, and a model that would not is refused with the shapes instead of failing later in a metric."""

from pathlib import Path

import numpy as np
import openvino as ov
import pytest
import torch

from core.errors import VariantSkipped
from core.runtimes import open_session
from export import openvino_quant
from export.onnx_export import ExportConfig, export_onnx
from recipes import build_recipe
from tests.conftest import TINY_GPT


@pytest.fixture(scope="module")
def gpt(tmp_path_factory):
    """An untrained tiny byte GPT (its logits are for the last position only: (B, 256)) and its FP32 export."""
    recipe, folder = build_recipe("stdlib-gpt", TINY_GPT), tmp_path_factory.mktemp("gpt")
    torch.manual_seed(0)
    onnx_path = export_onnx(recipe, recipe.build_model().eval(), folder, ExportConfig()).output.onnx
    return recipe, Path(onnx_path)


def _assert_answers_like_fp32(recipe, fp32_path: Path, int8_path: Path) -> None:
    tokens = next(iter(recipe.eval_batches(8))).inputs
    expected = open_session(fp32_path).run(None, tokens)[0]
    got = open_session(int8_path, "openvino", "f32").run(None, tokens)[0]
    assert got.shape == expected.shape == (8, 256)
    np.testing.assert_allclose(got, expected, atol=0.1)  # INT8 of an untrained model: logits within 0.1


def test_gpt_int8_answers_last_position_logits_in_the_fp32_shape(gpt, tmp_path):
    """OpenVINO's CPU plugin answered (1, B, 256) for the INT8 last-position Gather; scoring then hit an
    IndexError."""
    recipe, fp32_path = gpt
    int8_path = openvino_quant.build_openvino_nncf(fp32_path, tmp_path, recipe.calibration_inputs(16))
    _assert_answers_like_fp32(recipe, fp32_path, int8_path)


def test_accuracy_control_validates_a_gpt_with_few_held_out_samples(gpt, tmp_path):
    recipe, fp32_path = gpt
    held_out = list(recipe.eval_batches(4, 8))  # two batches of four

    def metric(predict, batches) -> float:
        outputs = [predict(b.inputs) for b in batches]
        return recipe.score(outputs, [b.targets for b in batches])[recipe.primary_metric]

    int8_path = openvino_quant.build_openvino_nncf_accuracy_control(
        fp32_path, tmp_path, recipe.calibration_inputs(16), held_out, metric, max_drop=0.0
    )
    _assert_answers_like_fp32(recipe, fp32_path, int8_path)


def test_an_output_shape_fp32_does_not_declare_is_refused_naming_the_output_and_both_shapes():
    declared = {"logits": ov.PartialShape([-1, 256])}
    openvino_quant.check_shapes(declared, {"logits": np.zeros((8, 256), np.float32)})
    with pytest.raises(VariantSkipped, match=r"`logits` \(1, 8, 256\) where FP32 declares \[\?,256\]"):
        openvino_quant.check_shapes(declared, {"logits": np.zeros((1, 8, 256), np.float32)})
