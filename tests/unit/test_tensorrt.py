"""The TensorRT stage's own logic, on CPU. Nothing here builds an engine: TensorRT is not installable here."""

import shlex
from pathlib import Path

import pytest

from export.onnx_export import ExportConfig, export_onnx
from export.trt_engine import EngineConfig, EngineMismatch, build, check_compatible, profile_shapes, trtexec_command, unavailable_reason
from tests.conftest import TINY_DIGITS, TINY_GPT
from training.recipes import build_recipe


def test_profiles_come_from_the_recipe_ranges_and_the_batch_limit():
    gpt = profile_shapes(build_recipe("stdlib-gpt", TINY_GPT), max_batch_size=16)
    assert gpt == {"tokens": {"min": [1, 1], "opt": [16, 32], "max": [16, 32]}}
    digits = profile_shapes(build_recipe("digits-cnn", TINY_DIGITS), max_batch_size=8)
    assert digits == {"image": {"min": [1, 1, 8, 8], "opt": [8, 1, 8, 8], "max": [8, 1, 8, 8]}}


@pytest.mark.parametrize("precision, flags", [("fp32", []), ("fp16", ["--fp16"]), ("bf16", ["--bf16"]), ("int8", ["--int8", "--fp16"])])
def test_trtexec_command_has_the_profiles_precision_and_builder_settings(precision, flags):
    shapes = profile_shapes(build_recipe("stdlib-gpt", TINY_GPT), max_batch_size=4)
    config = EngineConfig(precision=precision, workspace_mb=2048, optimization_level=5, version_compatible=True)
    command = trtexec_command(Path("m.onnx"), Path("m.plan"), shapes, config)
    assert command[:3] == ["trtexec", "--onnx=m.onnx", "--saveEngine=m.plan"]
    assert "--minShapes=tokens:1x1" in command and "--optShapes=tokens:4x32" in command and "--maxShapes=tokens:4x32" in command
    assert "--memPoolSize=workspace:2048M" in command and "--builderOptimizationLevel=5" in command
    assert "--versionCompatible" in command and f"--timingCacheFile={config.timing_cache}" in command
    assert [c for c in command if c in ("--fp16", "--bf16", "--int8")] == flags


def test_without_tensorrt_the_stage_is_skipped_with_the_reason_and_leaves_a_reproduce_script(tmp_path):
    if unavailable_reason() is None:
        pytest.skip("TensorRT and a GPU are present")
    recipe = build_recipe("digits-cnn", TINY_DIGITS)
    onnx_path = export_onnx(recipe, recipe.build_model(), tmp_path, ExportConfig()).outputs["onnx"]
    result = build(recipe, onnx_path, tmp_path / "trt", EngineConfig(), max_batch_size=8)
    assert result.status.value == "skipped"
    assert result.reason in ("no CUDA GPU",) or result.reason.startswith("tensorrt not installed")
    script = (tmp_path / "trt" / "reproduce.sh").read_text().splitlines()
    assert script[0] == "#!/usr/bin/env bash" and shlex.split(script[-1])[0] == "trtexec"
    assert not list((tmp_path / "trt").glob("*.plan"))  # nothing claims to be an engine


MANIFEST = {"engine": "model-fp16.plan", "tensorrt": "10.3.0", "compute_capability": "9.0", "hardware_compatibility": "none",
            "version_compatible": False}


def test_an_engine_for_another_gpu_or_tensorrt_is_refused():
    check_compatible(MANIFEST, "9.0", "10.3.0")
    with pytest.raises(EngineMismatch, match="compute capability 9.0, target has 8.0"):
        check_compatible(MANIFEST, "8.0", "10.3.0")
    with pytest.raises(EngineMismatch, match="TensorRT 10.3.0, target runs 10.5.0"):
        check_compatible(MANIFEST, "9.0", "10.5.0")
    with pytest.raises(EngineMismatch) as both:
        check_compatible(MANIFEST, "8.6", "8.6.1")
    assert "compute capability" in str(both.value) and "TensorRT" in str(both.value) and "reproduce.sh" in str(both.value)


def test_compatibility_settings_widen_what_is_accepted():
    check_compatible({**MANIFEST, "hardware_compatibility": "ampere_plus"}, "8.0", "10.3.0")
    check_compatible({**MANIFEST, "version_compatible": True}, "9.0", "10.7.1")
    with pytest.raises(EngineMismatch):
        check_compatible({**MANIFEST, "version_compatible": True}, "9.0", "11.0.0")  # not across major versions


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_a_real_engine_build(tmp_path):
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    recipe = build_recipe("digits-cnn", TINY_DIGITS)
    onnx_path = export_onnx(recipe, recipe.build_model(), tmp_path, ExportConfig()).outputs["onnx"]
    result = build(recipe, onnx_path, tmp_path / "trt", EngineConfig(timing_cache=str(tmp_path / "cache")), max_batch_size=8)
    assert result.status.value == "ok" and Path(result.outputs["engine"]).stat().st_size > 0
