from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from core.errors import VerificationError
from export.onnx_export import ExportConfig, export_onnx, verify_onnx
from recipes import build_recipe
from tests.conftest import TINY_DIGITS, TINY_GPT


@pytest.fixture(scope="module")
def gpt_export(tmp_path_factory):
    recipe = build_recipe("stdlib-gpt", TINY_GPT)
    torch.manual_seed(0)
    model = recipe.build_model().eval()
    result = export_onnx(recipe, model, tmp_path_factory.mktemp("gpt"), ExportConfig())
    return recipe, model, result


def test_gpt_export_has_pinned_opset_and_dynamic_batch_and_sequence(gpt_export):
    recipe, model, result = gpt_export
    graph = onnx.load(result.output.onnx)
    assert {entry.domain: entry.version for entry in graph.opset_import}[""] == 18
    dims = graph.graph.input[0].type.tensor_type.shape.dim
    assert [d.HasField("dim_param") for d in dims] == [True, True]
    session = ort.InferenceSession(result.output.onnx, providers=["CPUExecutionProvider"])
    for batch, length in [(1, 1), (3, 17), (5, 32)]:
        tokens = np.random.default_rng(batch).integers(0, 256, (batch, length), dtype=np.int64)
        got = session.run(None, {"tokens": tokens})[0]
        with torch.no_grad():
            expected = model(torch.from_numpy(tokens)).numpy()
        assert got.shape == (batch, 256)
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-3)


def test_verification_covers_several_batch_sizes_and_lengths(gpt_export):
    _, _, result = gpt_export
    report = result.output.verification
    assert report.cases >= 4 and report.max_abs_diff["logits"] < 1e-4
    assert result.artifacts[0].sha256 and result.artifacts[0].bytes > 0


def test_verification_reports_every_mismatch_at_once(gpt_export):
    recipe, model, result = gpt_export
    other = recipe.build_model().eval()  # different random weights: every case must mismatch
    with pytest.raises(VerificationError) as caught:
        verify_onnx(recipe, other, result.output.onnx, ExportConfig(verify_batch_sizes=(1, 3)))
    mismatches = caught.value.mismatches
    assert len(mismatches) >= 3  # batch 1, batch 3, and the short-sequence cases
    assert all("output 'logits'" in line and "atol=" in line for line in mismatches)
    assert "[1, 32]" in str(caught.value) and "[3, 32]" in str(caught.value)


def test_digits_export_verifies(tmp_path: Path):
    recipe = build_recipe("digits-cnn", TINY_DIGITS)
    result = export_onnx(recipe, recipe.build_model(), tmp_path, ExportConfig())
    assert result.status.value == "ok" and Path(result.output.onnx).is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
