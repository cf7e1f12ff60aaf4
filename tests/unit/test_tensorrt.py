"""The TensorRT stage's own logic, on CPU. Nothing here builds or runs an engine: TensorRT is not installable here.

Tests named `..._with_fake_tensorrt` hand our code a stand-in `tensorrt` module that records what it is asked to
do; they check our calls and flags (and, with a child that really crashes, our crash handling), nothing more.
The one real build is `test_a_real_engine_is_built_verified_and_gated`, marked `tensorrt` and `gpu`.
"""

import importlib.util
import json
import os
import shlex
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest

from core.files import sha256_file
from core.results import Status
from core.runtimes import open_session
from export.onnx_export import ExportConfig, export_onnx
from export.tensorrt_build import configure, network_flags
from export.trt_checks import EngineTolerance, compare_outputs, judge
from export.trt_engine import (
    EngineConfig,
    build,
    build_in_child,
    engine_source,
    onnx_profile_problems,
    profile_shapes,
    run_stage,
    trtexec_command,
    unavailable_reason,
)
from export.variants import PrecisionConfig, VariantReport
from recipes import build_recipe
from tests.conftest import TINY_DIGITS, TINY_GPT

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    recipe = build_recipe("digits-cnn", TINY_DIGITS)
    onnx_path = export_onnx(recipe, recipe.build_model(), tmp_path_factory.mktemp("digits"), ExportConfig()).output.onnx
    return recipe, Path(onnx_path)


# --- profiles, sources, trtexec --------------------------------------------------------------------------------------
def test_profiles_come_from_the_recipe_ranges_and_the_batch_limit():
    gpt = profile_shapes(build_recipe("stdlib-gpt", TINY_GPT), max_batch_size=16)
    assert gpt == {"tokens": {"min": [1, 1], "opt": [16, 32], "max": [16, 32]}}  # context 1 / block_size / block_size
    tuned = profile_shapes(build_recipe("stdlib-gpt", TINY_GPT), max_batch_size=16, opt_batch_size=4)
    assert tuned["tokens"]["opt"] == [4, 32]
    assert (
        profile_shapes(build_recipe("stdlib-gpt", TINY_GPT), 16, opt_batch_size=64)["tokens"]["opt"][0] == 16
    )  # clamped
    digits = profile_shapes(build_recipe("digits-cnn", TINY_DIGITS), max_batch_size=8)
    assert digits == {"image": {"min": [1, 1, 8, 8], "opt": [8, 1, 8, 8], "max": [8, 1, 8, 8]}}


def test_profiles_are_checked_against_the_onnx_graph(digits):
    recipe, onnx_path = digits
    shapes = profile_shapes(recipe, max_batch_size=8)
    assert onnx_profile_problems(shapes, onnx_path) == []
    moved = {"image": {"min": [1, 1, 4, 8], "opt": [8, 1, 8, 8], "max": [8, 1, 8, 8]}}
    assert any("axis 2 is fixed at 8" in p for p in onnx_profile_problems(moved, onnx_path))
    renamed = {"pixels": shapes["image"]}
    problems = onnx_profile_problems(renamed, onnx_path)
    assert any("ONNX input 'image' has no profile" in p for p in problems) and any(
        "profile 'pixels'" in p for p in problems
    )


@pytest.mark.parametrize(
    "precision, flags",
    [("fp32", ["--noTF32"]), ("fp16", ["--fp16"]), ("bf16", ["--bf16"]), ("int8-static", ["--int8", "--fp16"])],
)
def test_trtexec_command_has_the_profiles_precision_and_builder_settings(precision, flags):
    shapes = profile_shapes(build_recipe("stdlib-gpt", TINY_GPT), max_batch_size=4)
    config = EngineConfig(precision=precision, workspace_mb=2048, optimization_level=5, version_compatible=True)
    command = trtexec_command(Path("m.onnx"), Path("m.plan"), shapes, config, Path("/c/timing.cache"))
    assert command[:3] == ["trtexec", "--onnx=m.onnx", "--saveEngine=m.plan"]
    assert (
        "--minShapes=tokens:1x1" in command
        and "--optShapes=tokens:4x32" in command
        and "--maxShapes=tokens:4x32" in command
    )
    assert "--memPoolSize=workspace:2048M" in command and "--builderOptimizationLevel=5" in command
    assert "--versionCompatible" in command and "--timingCacheFile=/c/timing.cache" in command
    assert "--hardwareCompatibilityLevel=ampere+" not in command
    assert [c for c in command if c in ("--fp16", "--bf16", "--int8", "--noTF32")] == flags


def test_a_strongly_typed_build_takes_its_types_from_the_graph_not_from_flags():
    shapes = profile_shapes(build_recipe("digits-cnn", TINY_DIGITS), max_batch_size=4)
    config = EngineConfig(precision="int8-static", strongly_typed=True, hardware_compatibility="ampere_plus")
    command = trtexec_command(Path("m.onnx"), Path("m.plan"), shapes, config, Path("c"))
    assert "--stronglyTyped" in command and "--hardwareCompatibilityLevel=ampere+" in command
    assert not {"--fp16", "--int8", "--bf16"} & set(command)


def test_each_precision_is_built_from_its_own_variant():
    variants = [
        VariantReport(name="fp32", path="/r/export/model.onnx"),
        VariantReport(name="int8-static", path="/r/precision/int8-static.onnx"),
        VariantReport(name="fp16", path="/r/precision/fp16.onnx"),
    ]
    assert engine_source("fp16", "/r/export/model.onnx", variants) == ("/r/export/model.onnx", "")
    assert engine_source("bf16", "/r/export/model.onnx", variants)[0] == "/r/export/model.onnx"
    assert engine_source("int8-static", "/r/export/model.onnx", variants)[0] == "/r/precision/int8-static.onnx"
    assert engine_source("fp16", "/r/export/model.onnx", variants, strongly_typed=True)[0] == "/r/precision/fp16.onnx"
    missing, why = engine_source("int8-static", "/r/export/model.onnx", variants[:1])
    assert missing is None and "int8-static variant" in why and "precision.variants" in why
    refused, why = engine_source("int8-dynamic", "/r/export/model.onnx", variants)
    assert refused is None and "DynamicQuantizeLinear" in why


# --- the SKIPPED path -------------------------------------------------------------------------------------------------
def test_without_tensorrt_the_stage_is_skipped_with_the_reason_and_leaves_a_reproduce_script(tmp_path, digits):
    reason = unavailable_reason()
    if reason is None:
        pytest.skip("TensorRT and a GPU are present: the stage builds here")
    recipe, onnx_path = digits
    variants = [VariantReport(name="fp32", path=str(onnx_path), throughput_per_s=100.0)]
    config = EngineConfig(precision="fp16", timing_cache=str(tmp_path / "timing.cache"))
    result = run_stage(recipe, onnx_path, variants, tmp_path / "trt", config, PrecisionConfig(), max_batch_size=8)
    assert result.status is Status.SKIPPED and result.reason == reason
    assert reason == "no CUDA GPU" or reason.startswith("tensorrt not installed")
    script = tmp_path / "trt" / "fp16" / "reproduce.sh"
    assert os.access(script, os.X_OK)
    lines = script.read_text().splitlines()
    assert lines[0] == "#!/usr/bin/env bash" and "set -euo pipefail" in lines
    command = shlex.split(lines[-1])
    assert command[0] == "trtexec" and f"--onnx={onnx_path.resolve()}" in command and "--fp16" in command
    assert f"--saveEngine={(tmp_path / 'trt' / 'fp16' / 'model.plan').resolve()}" in command
    assert f"--timingCacheFile={tmp_path / 'timing.cache'}" in command and "--minShapes=image:1x1x8x8" in command
    assert not list((tmp_path / "trt").rglob("*.plan")) and not list((tmp_path / "trt").rglob("engine.json"))


def test_a_disabled_stage_or_an_unbuildable_precision_is_skipped_with_the_reason(tmp_path, digits):
    recipe, onnx_path = digits
    off = run_stage(recipe, onnx_path, [], tmp_path, EngineConfig(enabled=False), PrecisionConfig(), 8)
    assert off.status is Status.SKIPPED and off.reason == "tensorrt.enabled is false"
    no_qdq = run_stage(
        recipe,
        onnx_path,
        [VariantReport(name="fp32", path=str(onnx_path))],
        tmp_path,
        EngineConfig(precision="int8-static"),
        PrecisionConfig(),
        8,
    )
    assert no_qdq.status is Status.SKIPPED and "int8-static variant" in no_qdq.reason


def test_a_profile_that_does_not_fit_the_graph_fails_the_stage_with_the_reason(tmp_path, digits):
    recipe, _ = digits
    gpt = build_recipe("stdlib-gpt", TINY_GPT)
    other = export_onnx(gpt, gpt.build_model(), tmp_path / "gpt", ExportConfig()).output.onnx
    result = build(recipe, other, tmp_path / "trt", EngineConfig(timing_cache=str(tmp_path / "c")), max_batch_size=8)
    assert result.status is Status.FAILED and "ONNX input 'tokens' has no profile" in result.reason


# --- our calls into TensorRT, against a stand-in module ---------------------------------------------------------------
class _FakeConfig:
    def __init__(self):
        self.flags, self.cleared, self.pools, self.profiles, self.cache_bytes = set(), set(), {}, [], None
        self.builder_optimization_level, self.hardware_compatibility_level = None, "NONE"

    def set_flag(self, flag):
        self.flags.add(flag)

    def clear_flag(self, flag):
        self.cleared.add(flag)

    def set_memory_pool_limit(self, pool, size):
        self.pools[pool] = size

    def create_timing_cache(self, data):
        self.cache_bytes = data
        return ("cache", data)

    def set_timing_cache(self, cache, ignore_mismatch):
        self.timing_cache = (cache, ignore_mismatch)

    def add_optimization_profile(self, profile):
        self.profiles.append(profile)

    def get_timing_cache(self):
        return types.SimpleNamespace(serialize=lambda: self.cache_bytes + b"+timings of this build")


class _FakeProfile:
    def __init__(self):
        self.shapes = {}

    def set_shape(self, name, low, opt, high):
        self.shapes[name] = (list(low), list(opt), list(high))


class _FakeBuilder:
    def create_builder_config(self):
        return _FakeConfig()

    def create_optimization_profile(self):
        return _FakeProfile()


FAKE_TRT = types.SimpleNamespace(
    BuilderFlag=types.SimpleNamespace(
        FP16="FP16", BF16="BF16", INT8="INT8", TF32="TF32", VERSION_COMPATIBLE="VERSION_COMPATIBLE"
    ),
    MemoryPoolType=types.SimpleNamespace(WORKSPACE="WORKSPACE"),
    HardwareCompatibilityLevel=types.SimpleNamespace(AMPERE_PLUS="AMPERE_PLUS"),
    NetworkDefinitionCreationFlag=types.SimpleNamespace(STRONGLY_TYPED=1),
)


def _spec(tmp_path, **settings):
    config = EngineConfig(**settings).model_dump(mode="json") | {"timing_cache": str(tmp_path / "timing.cache")}
    return {
        "config": config,
        "shapes": profile_shapes(build_recipe("stdlib-gpt", TINY_GPT), max_batch_size=8, opt_batch_size=4),
    }


def test_builder_sets_fp16_flag_workspace_level_and_profile_with_fake_tensorrt(tmp_path):
    config, cache_loaded = configure(
        FAKE_TRT, _FakeBuilder(), _spec(tmp_path, precision="fp16", workspace_mb=512, optimization_level=4)
    )
    assert config.flags == {"FP16"} and config.cleared == set()
    assert config.pools == {"WORKSPACE": 512 << 20} and config.builder_optimization_level == 4
    assert [p.shapes for p in config.profiles] == [{"tokens": ([1, 1], [4, 32], [8, 32])}]
    assert config.timing_cache == (("cache", b""), False) and cache_loaded is False
    assert config.hardware_compatibility_level == "NONE"


@pytest.mark.parametrize(
    "precision, flags, cleared",
    [("fp32", set(), {"TF32"}), ("bf16", {"BF16"}, set()), ("int8-static", {"INT8", "FP16"}, set())],
)
def test_builder_precision_flags_with_fake_tensorrt(tmp_path, precision, flags, cleared):
    config, _ = configure(FAKE_TRT, _FakeBuilder(), _spec(tmp_path, precision=precision))
    assert (config.flags, config.cleared) == (flags, cleared)


def test_builder_reuses_a_saved_timing_cache_with_fake_tensorrt(tmp_path):
    (tmp_path / "timing.cache").write_bytes(b"tactic timings from an earlier build")
    config, cache_loaded = configure(FAKE_TRT, _FakeBuilder(), _spec(tmp_path))
    assert cache_loaded and config.cache_bytes == b"tactic timings from an earlier build"


def test_builder_compatibility_and_strong_typing_with_fake_tensorrt(tmp_path):
    spec = _spec(
        tmp_path, precision="fp16", hardware_compatibility="ampere_plus", version_compatible=True, strongly_typed=True
    )
    config, _ = configure(FAKE_TRT, _FakeBuilder(), spec)
    assert config.hardware_compatibility_level == "AMPERE_PLUS" and config.flags == {"VERSION_COMPATIBLE"}  # no FP16
    assert network_flags(FAKE_TRT, strongly_typed=True) == 1 << 1 and network_flags(FAKE_TRT, strongly_typed=False) == 0


class _FakeNetwork:
    """The digits network as TensorRT would describe it after parsing: shapes with -1 for the batch axis."""

    inputs = [types.SimpleNamespace(name="image", dtype=np.float32, shape=(-1, 1, 8, 8))]
    outputs = [types.SimpleNamespace(name="logits", dtype=np.float32, shape=(-1, 10))]
    num_inputs, num_outputs = 1, 1

    def get_input(self, index):
        return self.inputs[index]

    def get_output(self, index):
        return self.outputs[index]


def _fake_tensorrt_module(parse_ok: bool = True) -> types.ModuleType:
    module = types.ModuleType("tensorrt")
    module.__dict__.update(vars(FAKE_TRT))
    module.__version__ = "10.3.0.26"
    module.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None})
    builder = _FakeBuilder()
    builder.create_network = lambda flags: _FakeNetwork()
    builder.build_serialized_network = lambda network, config: b"stand-in engine bytes"
    module.Builder = lambda logger: builder
    errors = ["In node 3 (Foo): UNSUPPORTED_NODE"]
    module.OnnxParser = lambda network, logger: types.SimpleNamespace(
        parse_from_file=lambda path: parse_ok, num_errors=0 if parse_ok else 1, get_error=lambda index: errors[index]
    )
    module.nptype = lambda dtype: dtype
    return module


def test_build_writes_the_engine_timing_cache_and_manifest_with_fake_tensorrt(tmp_path, digits, monkeypatch):
    import export.tensorrt_build as child

    recipe, onnx_path = digits
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt_module())
    monkeypatch.setattr(child, "device", lambda: ("stand-in GPU", "9.0"))
    spec = {
        "onnx": str(onnx_path),
        "folder": str(tmp_path / "fp16"),
        "max_batch_size": 8,
        "shapes": profile_shapes(recipe, 8),
        "config": EngineConfig(precision="fp16").model_dump(mode="json")
        | {"timing_cache": str(tmp_path / "timing.cache")},
    }
    manifest = child.build(spec)
    assert (tmp_path / "fp16" / "model.plan").read_bytes() == b"stand-in engine bytes"
    assert json.loads((tmp_path / "fp16" / "engine.json").read_text()) == manifest
    assert manifest["onnx_sha256"] == sha256_file(onnx_path) and manifest["compute_capability"] == "9.0"
    assert (
        manifest["tensorrt"] == "10.3.0.26"
        and manifest["builder_flags"] == ["FP16"]
        and manifest["profiles"] == spec["shapes"]
    )
    assert manifest["tensors"] == [
        {"name": "image", "dtype": "float32", "shape": [-1, 1, 8, 8], "mode": "input"},
        {"name": "logits", "dtype": "float32", "shape": [-1, 10], "mode": "output"},
    ]
    assert (tmp_path / "timing.cache").read_bytes() == b"+timings of this build" and not manifest["timing_cache_loaded"]
    assert child.build(spec)["timing_cache_loaded"]  # the next build starts from the saved cache
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt_module(parse_ok=False))
    with pytest.raises(SystemExit, match="UNSUPPORTED_NODE"):
        child.build(spec)


# --- the child process ------------------------------------------------------------------------------------------------
def _child_with_fake_tensorrt(tmp_path, body: str) -> tuple[Path, dict]:
    """A build spec and an environment whose `tensorrt` is a stand-in module running `body` on import."""
    package = tmp_path / "fake" / "tensorrt"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(body)
    folder = tmp_path / "engine"
    folder.mkdir()
    spec = folder / "build-spec.json"
    spec.write_text(f'{{"folder": "{folder}", "onnx": "unused.onnx"}}')
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "fake"), str(ROOT)])}
    return spec, env


def test_a_crash_in_native_code_fails_the_stage_not_the_flow_with_fake_tensorrt(tmp_path):
    spec, env = _child_with_fake_tensorrt(
        tmp_path, "import os, sys\nprint('stand-in tensorrt aborting', flush=True)\nos.abort()\n"
    )
    result = build_in_child(spec, timeout_s=120, env=env)
    assert result.status is Status.FAILED and "killed by signal 6" in result.reason
    assert "stand-in tensorrt aborting" in result.reason and (tmp_path / "engine" / "build.log").is_file()
    assert not (tmp_path / "engine" / "model.plan").exists()


def test_a_failing_or_hanging_build_child_fails_the_stage_with_its_log_with_fake_tensorrt(tmp_path):
    spec, env = _child_with_fake_tensorrt(tmp_path, "raise SystemExit('parser: unsupported operator Foo')\n")
    failed = build_in_child(spec, timeout_s=120, env=env)
    assert (
        failed.status is Status.FAILED
        and "exited with 1" in failed.reason
        and "unsupported operator Foo" in failed.reason
    )
    hung_spec, hung_env = _child_with_fake_tensorrt(tmp_path / "hung", "import time\ntime.sleep(120)\n")
    hung = build_in_child(hung_spec, timeout_s=3, env=hung_env)
    assert hung.status is Status.FAILED and "ran past 3 s" in hung.reason


# --- verification logic (the engine's outputs stand in as arrays) ---------------------------------------------------
@pytest.fixture(scope="module")
def fp32_outputs(digits):
    recipe, onnx_path = digits
    session = open_session(onnx_path)
    batches = list(recipe.eval_batches(16, 64))
    reference = [{"logits": session.run(None, batch.inputs)[0]} for batch in batches]
    return recipe, reference, [batch.targets for batch in batches]


def test_outputs_within_the_precisions_tolerance_pass_and_others_are_named(fp32_outputs):
    _, reference, _ = fp32_outputs
    assert compare_outputs(reference, reference, "fp32") == []
    scale = max(float(np.abs(r["logits"]).max()) for r in reference)
    nudged = [{"logits": r["logits"] + 5e-3 * scale} for r in reference]  # 0.5% of the range
    assert compare_outputs(reference, nudged, "fp16") == []
    lines = compare_outputs(reference, nudged, "fp32")
    assert (
        len(lines) == 1
        and "output 'logits'" in lines[0]
        and "100.00% of" in lines[0]
        and "tensorrt.tolerances['logits']" in lines[0]
    )
    assert compare_outputs(reference, nudged, "fp32", {"logits": EngineTolerance(range_atol=1e-2, rtol=0)}) == []
    broken = [{"logits": np.full_like(r["logits"], np.nan)} for r in reference]
    assert compare_outputs(reference, broken, "int8-static")
    reshaped = [{"logits": r["logits"][:, :5]} for r in reference]
    assert "shape" in compare_outputs(reference, reshaped, "fp16")[0]


def test_an_engine_is_gated_like_every_variant(fp32_outputs):
    recipe, reference, targets = fp32_outputs
    config, gates = EngineConfig(precision="fp16").tolerances, PrecisionConfig(accuracy_budget=0.01, min_speedup=1.05)
    same = judge(
        recipe, "fp16", reference, reference, targets, config, gates, throughput=5000.0, fp32_throughput=1000.0
    )
    assert same.status == "accepted" and same.name == "tensorrt-fp16" and same.runtime == "tensorrt"
    assert same.metrics == recipe.score([r["logits"] for r in reference], targets) and same.top1_agreement == 1.0
    # an untrained CNN's accuracy is near chance, so the accuracy gate is shown with a perfect reference instead
    perfect = [{"logits": 5.0 * np.eye(10, dtype=np.float32)[t]} for t in targets]
    off_by_one = [{"logits": 5.0 * np.eye(10, dtype=np.float32)[(t + 1) % 10]} for t in targets]
    wrong = judge(
        recipe, "fp16", perfect, off_by_one, targets, config, gates, throughput=5000.0, fp32_throughput=1000.0
    )
    assert wrong.status == "rejected" and "accuracy gate: accuracy 0.0000 vs FP32 1.0000" in wrong.reason
    assert "numerical check" in wrong.reason and wrong.top1_agreement == 0.0
    cut = judge(
        recipe,
        "fp16",
        reference,
        [{"logits": r["logits"][:, :5]} for r in reference],
        targets,
        config,
        gates,
        5000.0,
        1000.0,
    )
    assert cut.status == "rejected" and "shape" in cut.reason and cut.metrics == {}
    slow = judge(recipe, "fp16", reference, reference, targets, config, gates, throughput=900.0, fp32_throughput=1000.0)
    assert slow.status == "rejected" and "speed gate" in slow.reason and "ONNX Runtime FP32 on the CPU" in slow.reason


# --- the real thing, where it can run ---------------------------------------------------------------------------------
@pytest.mark.tensorrt
@pytest.mark.gpu
def test_a_real_engine_is_built_verified_and_gated(tmp_path, digits):
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    recipe, onnx_path = digits
    variants = [VariantReport(name="fp32", path=str(onnx_path), throughput_per_s=0.0)]
    config = EngineConfig(precision="fp16", timing_cache=str(tmp_path / "timing.cache"), verify_samples=64)
    result = run_stage(
        recipe, onnx_path, variants, tmp_path / "trt", config, PrecisionConfig(min_speedup=0), max_batch_size=8
    )
    assert result.status is Status.OK, result.reason
    assert Path(result.output.engine).stat().st_size > 0 and (tmp_path / "timing.cache").stat().st_size > 0
    assert result.output.verification.status == "accepted", result.output.verification.reason
    again = build(recipe, onnx_path, tmp_path / "again", config, max_batch_size=8)
    assert again.status is Status.OK and json.loads(Path(again.output.manifest).read_text())["timing_cache_loaded"]


# --- the python flavour's execution providers -------------------------------------------------------------------------
def _backend_model(monkeypatch, logged: list):
    """serving/backend/model.py as Triton loads it, with a stand-in for Triton's `triton_python_backend_utils`
    (it only exists inside Triton) whose logger records the lines."""
    logger = types.SimpleNamespace(
        log_info=lambda line: logged.append(("info", line)), log_warn=lambda line: logged.append(("warn", line))
    )
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", types.SimpleNamespace(Logger=logger))
    spec = importlib.util.spec_from_file_location("tes_backend_model", ROOT / "serving" / "backend" / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_instances_ask_for_tensorrt_then_cuda_with_fake_providers(monkeypatch, tmp_path):
    module = _backend_model(monkeypatch, [])
    monkeypatch.setattr(
        module.ort,
        "get_available_providers",
        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
    )
    config = {
        "name": "digits-int8-static",
        "parameters": {"precision": {"string_value": "int8-static"}, "trt_cache_dir": {"string_value": str(tmp_path)}},
    }
    args = {"model_instance_kind": "GPU", "model_instance_device_id": "1", "model_version": "3"}
    (trt, trt_options), (cuda, cuda_options), cpu = module.TritonPythonModel._providers(args, config)
    assert (trt, cuda, cpu) == ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
    assert trt_options["device_id"] == 1 and cuda_options == {"device_id": 1}
    assert trt_options["trt_engine_cache_enable"] and trt_options["trt_engine_cache_path"] == str(
        tmp_path / "digits-int8-static" / "3"
    )
    assert (
        Path(trt_options["trt_timing_cache_path"]).is_dir()
        and trt_options["trt_int8_enable"]
        and trt_options["trt_fp16_enable"]
    )
    fp32 = module.TritonPythonModel._providers(
        args, {"name": "digits-fp32", "parameters": {"precision": {"string_value": "fp32"}}}
    )
    assert not fp32[0][1]["trt_fp16_enable"] and not fp32[0][1]["trt_int8_enable"]
    cpu_only = module.TritonPythonModel._providers({"model_instance_kind": "CPU"}, config)
    assert cpu_only == ["CPUExecutionProvider"]


def test_the_provider_onnx_runtime_really_got_is_logged_and_a_fallback_warned(monkeypatch):
    logged = []
    module = _backend_model(monkeypatch, logged)
    args = {"model_version": "1", "model_instance_name": "digits_0", "model_instance_kind": "GPU"}
    module._log_provider(
        "digits", args, [("TensorrtExecutionProvider", {}), "CPUExecutionProvider"], "CPUExecutionProvider"
    )
    module._log_provider("digits", args, ["CPUExecutionProvider"], "CPUExecutionProvider")
    assert [level for level, _ in logged] == ["warn", "info"]
    assert logged[0][1].startswith(
        "tes-provider model=digits version=1 instance=digits_0 kind=GPU got=CPUExecutionProvider"
    )
    assert "requested=TensorrtExecutionProvider,CPUExecutionProvider" in logged[0][1]


@pytest.mark.integration
def test_a_served_python_model_logs_its_provider_in_triton(triton_server, digits):
    from serving import client, repository

    _, onnx_path = digits
    repository.write_version(
        triton_server.repository, "digits-provider", onnx_path, repository.ServingConfig(max_batch_size=8)
    )
    client.load_model(triton_server.http_url, "digits-provider", admin_key=triton_server.admin_key)
    deadline, lines = time.monotonic() + 15, []
    while not lines and time.monotonic() < deadline:  # the server's log may reach the file a moment after READY
        log = Path(triton_server.log_path).read_text().splitlines()
        lines = [line for line in log if "tes-provider model=digits-provider" in line]
        time.sleep(0.1)
    assert lines and "got=CPUExecutionProvider requested=CPUExecutionProvider" in lines[-1]  # CPU instances here
