"""The `native` repository flavour: every generated config parses into Triton's ModelConfig and keeps the invariants
Triton enforces at load; invalid configs and engines for another target are refused with the reason.

Engines here are stand-in files (a few bytes and a manifest written by the test): only the repository layout, the
configs and the compatibility checks are under test, never an engine. The bundled Triton has no onnxruntime or
tensorrt backend, so these models are not loaded.
"""

import json
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper
from tritonclient.grpc import model_config_pb2 as mc

from core.errors import RepositoryError
from core.files import sha256_file
from export.onnx_export import ExportConfig, export_onnx
from recipes import build_recipe
from serving.native_repository import (
    EngineMismatch,
    EngineTarget,
    check_engine,
    engine_problems,
    export_repository,
    onnx_config,
    plan_config,
    validate,
    write_native_version,
)
from serving.repository import ServingConfig, config_text, parse_config
from tests.conftest import TINY_GPT

SERVING = ServingConfig(max_batch_size=8)
H100_TRT = EngineTarget(tensorrt_version="10.3.0.26", compute_capabilities=("9.0",))


@pytest.fixture(scope="module")
def gpt_onnx(tmp_path_factory) -> Path:
    recipe = build_recipe("stdlib-gpt", TINY_GPT)
    return Path(export_onnx(recipe, recipe.build_model(), tmp_path_factory.mktemp("gpt"), ExportConfig()).output.onnx)


def _manifest(onnx_path: Path, capability: str = "9.0", **fields) -> dict:
    """What export/tensorrt_build.py records for a stdlib-gpt engine built with batch 1..8."""
    return {
        "engine": "model.plan",
        "precision": "fp16",
        "tensorrt": "10.3.0.26",
        "gpu": "stand-in",
        "compute_capability": capability,
        "hardware_compatibility": "none",
        "version_compatible": False,
        "onnx_sha256": sha256_file(onnx_path),
        "profiles": {"tokens": {"min": [1, 1], "opt": [8, 32], "max": [8, 32]}},
        "engine_bytes": 9,
        "engine_sha256": "0" * 64,
        "tensors": [
            {"name": "tokens", "dtype": "int64", "shape": [-1, -1], "mode": "input"},
            {"name": "logits", "dtype": "float32", "shape": [-1, 256], "mode": "output"},
        ],
    } | fields


def _stand_in_engine(folder: Path, manifest: dict, verdict: str | None = "accepted") -> Path:
    """An engine folder as the tensorrt stage leaves it; the .plan holds stand-in bytes, not an engine."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.plan").write_bytes(b"stand-in")
    (folder / "engine.json").write_text(json.dumps(manifest))
    if verdict:
        (folder / "verification.json").write_text(
            json.dumps({"status": verdict, "reason": "" if verdict == "accepted" else "accuracy gate"})
        )
    return folder


def _version_dir(tmp_path: Path, engines: dict[str, dict]) -> Path:
    """A version folder holding stand-in engines (file name -> manifest) with their manifests beside them."""
    for file_name, manifest in engines.items():
        (tmp_path / file_name).write_bytes(b"stand-in")
        (tmp_path / file_name).with_suffix(".json").write_text(json.dumps(manifest))
    return tmp_path


# --- onnxruntime_onnx -------------------------------------------------------------------------------------------------
def test_onnxruntime_config_round_trips_and_matches_the_graph(tmp_path, gpt_onnx):
    config = onnx_config("gpt-fp32", gpt_onnx, ServingConfig(max_batch_size=8, instance_count=2, max_queue_size=64))
    parsed = parse_config(config_text(config))
    assert parsed == config and parsed.platform == "onnxruntime_onnx" and parsed.default_model_filename == "model.onnx"
    assert [(t.name, t.data_type, list(t.dims)) for t in parsed.input] == [("tokens", mc.TYPE_INT64, [-1])]
    assert [(t.name, list(t.dims)) for t in parsed.output] == [("logits", [256])]
    assert parsed.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU and parsed.instance_group[0].count == 2
    assert parsed.HasField("dynamic_batching") and parsed.dynamic_batching.default_queue_policy.max_queue_size == 64
    version = write_native_version(tmp_path, config, {"model.onnx": gpt_onnx})
    assert sorted(p.name for p in version.path.iterdir()) == ["manifest.json", "model.onnx"]
    assert parse_config((tmp_path / "gpt-fp32" / "config.pbtxt").read_text()) == config


@pytest.mark.parametrize(
    "breakage, message",
    [
        (lambda c: c.input[0].__setattr__("name", "ids"), "input 'ids' is not in the ONNX graph"),
        (
            lambda c: c.input[0].__setattr__("data_type", mc.TYPE_FP32),
            "config says TYPE_FP32 [-1], the ONNX graph model.onnx has TYPE_INT64 [-1]",
        ),
        (lambda c: c.output[0].dims.__setitem__(0, 255), "config says TYPE_FP32 [255]"),
        (
            lambda c: c.__setattr__("default_model_filename", "other.onnx"),
            "default_model_filename 'other.onnx' is not in",
        ),
        (lambda c: c.input[0].dims.__setitem__(0, 0), "must be -1 or positive"),
        (lambda c: c.__setattr__("platform", "onnx"), "platform is 'onnx'"),
    ],
)
def test_invalid_onnxruntime_configs_are_refused_before_anything_is_published(tmp_path, gpt_onnx, breakage, message):
    config = onnx_config("gpt-fp32", gpt_onnx, SERVING)
    breakage(config)
    with pytest.raises(RepositoryError, match="would not load") as refused:
        write_native_version(tmp_path, config, {"model.onnx": gpt_onnx})
    assert message in str(refused.value)
    assert not (tmp_path / "gpt-fp32" / "1").exists()  # nothing half-written


def test_max_batch_size_needs_a_dynamic_batch_axis_in_the_graph(tmp_path):
    fixed = helper.make_model(
        helper.make_graph(
            [helper.make_node("Relu", ["x"], ["y"])],
            "fixed",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        )
    )
    onnx.save(fixed, tmp_path / "model.onnx")
    with pytest.raises(RepositoryError, match="expected a dynamic batch axis"):
        onnx_config("fixed", tmp_path / "model.onnx", SERVING)
    unbatched = onnx_config("fixed", tmp_path / "model.onnx", ServingConfig(max_batch_size=0))
    assert list(unbatched.input[0].dims) == [1, 4] and not unbatched.HasField("dynamic_batching")
    validate(unbatched, tmp_path)
    unbatched.max_batch_size = 4  # now the config promises batching the graph cannot do
    with pytest.raises(RepositoryError, match="dynamic batch axis"):
        validate(unbatched, tmp_path)


# --- tensorrt_plan ----------------------------------------------------------------------------------------------------
def test_plan_config_maps_compute_capabilities_to_engines_and_matches_their_tensors(tmp_path, gpt_onnx):
    engines = {"model-sm80.plan": _manifest(gpt_onnx, "8.0"), "model-sm90.plan": _manifest(gpt_onnx, "9.0")}
    config = plan_config("gpt-trt", _manifest(gpt_onnx), {"8.0": "model-sm80.plan", "9.0": "model-sm90.plan"}, SERVING)
    parsed = parse_config(config_text(config))
    assert parsed.platform == "tensorrt_plan" and dict(parsed.cc_model_filenames) == {
        "8.0": "model-sm80.plan",
        "9.0": "model-sm90.plan",
    }
    assert not parsed.default_model_filename  # two engines: Triton picks by the GPU's compute capability
    assert [(t.name, t.data_type, list(t.dims)) for t in parsed.input] == [("tokens", mc.TYPE_INT64, [-1])]
    assert all(g.kind == mc.ModelInstanceGroup.KIND_GPU for g in parsed.instance_group) and parsed.HasField(
        "dynamic_batching"
    )
    validate(parsed, _version_dir(tmp_path, engines))
    single = plan_config("gpt-trt", _manifest(gpt_onnx), {"9.0": "model-sm90.plan"}, SERVING)
    assert single.default_model_filename == "model-sm90.plan"


@pytest.mark.parametrize(
    "breakage, message",
    [
        (lambda c: c.cc_model_filenames.__setitem__("sm90", "model-sm90.plan"), "'sm90' is not a compute capability"),
        (lambda c: c.cc_model_filenames.__setitem__("9.0", "missing.plan"), "'missing.plan' is not in"),
        (lambda c: c.output[0].__setattr__("name", "tokens"), "tensor names repeat"),
        (lambda c: c.output[0].__setattr__("name", "probs"), "output 'probs' is not in engine model-sm90.plan"),
        (
            lambda c: c.input[0].__setattr__("data_type", mc.TYPE_INT32),
            "config says TYPE_INT32 [-1], engine model-sm90.plan has TYPE_INT64 [-1]",
        ),
        (lambda c: c.__setattr__("max_batch_size", 16), "takes batch 1..8, the config sends 1..16"),
    ],
)
def test_invalid_plan_configs_are_refused_with_the_reason(tmp_path, gpt_onnx, breakage, message):
    config = plan_config("gpt-trt", _manifest(gpt_onnx), {"9.0": "model-sm90.plan"}, SERVING)
    breakage(config)
    with pytest.raises(RepositoryError) as refused:
        validate(config, _version_dir(tmp_path, {"model-sm90.plan": _manifest(gpt_onnx)}))
    assert message in str(refused.value)


def test_an_engine_without_its_manifest_is_refused(tmp_path, gpt_onnx):
    (tmp_path / "model.plan").write_bytes(b"stand-in")
    config = plan_config("gpt-trt", _manifest(gpt_onnx), {"9.0": "model.plan"}, SERVING)
    with pytest.raises(RepositoryError, match="no manifest"):
        validate(config, tmp_path)


# --- engine compatibility ---------------------------------------------------------------------------------------------
def test_an_engine_for_another_gpu_or_tensorrt_is_refused(gpt_onnx):
    manifest = _manifest(gpt_onnx, "9.0", tensorrt="10.3.0.26")
    check_engine(manifest, "9.0", "10.3.0.26")
    with pytest.raises(EngineMismatch, match="built for compute capability 9.0, the target GPU has 8.0"):
        check_engine(manifest, "8.0", "10.3.0.26")
    with pytest.raises(
        EngineMismatch,
        match=r"built with TensorRT 10.3.0.26, the target runs 10.5.0.18 \(the versions must match exactly\)",
    ):
        check_engine(manifest, "9.0", "10.5.0.18")
    assert engine_problems(manifest, "9.0", "10.3.0")  # another build of 10.3.0 is another version
    with pytest.raises(EngineMismatch) as both:
        check_engine(manifest, "8.6", "8.6.1")
    assert (
        "compute capability" in str(both.value) and "TensorRT" in str(both.value) and "reproduce.sh" in str(both.value)
    )


def test_compatibility_settings_widen_what_is_accepted_and_no_further(gpt_onnx):
    ampere_plus = _manifest(gpt_onnx, "8.0", hardware_compatibility="ampere_plus")
    assert (
        engine_problems(ampere_plus, "9.0", "10.3.0.26") == []
        and engine_problems(ampere_plus, "8.6", "10.3.0.26") == []
    )
    assert "Ampere+ engines need 8.0 or later" in engine_problems(ampere_plus, "7.5", "10.3.0.26")[0]
    forward = _manifest(gpt_onnx, version_compatible=True)
    assert engine_problems(forward, "9.0", "10.7.0.23") == []
    assert engine_problems(forward, "9.0", "10.1.0.27")  # never backwards
    assert engine_problems(forward, "9.0", "11.0.0.1")  # never across major versions


# --- a whole repository from a run ------------------------------------------------------------------------------------
def _run(tmp_path: Path, gpt_onnx: Path, engines: dict[str, tuple[dict, str | None]] | None = None) -> Path:
    run = tmp_path / "run"
    (run / "precision").mkdir(parents=True)
    variants = [
        {
            "name": "fp32",
            "status": "accepted",
            "runtime": "onnxruntime",
            "path": str(gpt_onnx),
            "sha256": sha256_file(gpt_onnx),
        },
        {"name": "fp16", "status": "rejected", "runtime": "onnxruntime", "path": str(gpt_onnx), "sha256": ""},
        {"name": "openvino-bf16", "status": "accepted", "runtime": "openvino", "path": str(gpt_onnx), "sha256": ""},
    ]
    (run / "precision" / "variants.json").write_text(json.dumps(variants))
    for name, (manifest, verdict) in (engines or {}).items():
        _stand_in_engine(run / "tensorrt" / name, manifest, verdict)
    return run


def test_export_repository_writes_a_native_model_per_accepted_onnxruntime_variant(tmp_path, gpt_onnx):
    exported = export_repository(_run(tmp_path, gpt_onnx), tmp_path / "out", "gpt", SERVING)
    assert [v.model_name for v in exported.versions] == ["gpt-fp32"]
    # the accepted OpenVINO variant is not written, and the output says so
    assert len(exported.left_out) == 1 and exported.left_out[0].startswith("openvino-bf16: runs in openvino")
    assert parse_config((tmp_path / "out" / "gpt-fp32" / "config.pbtxt").read_text()).platform == "onnxruntime_onnx"


def test_export_repository_ships_verified_engines_that_fit_the_target(tmp_path, gpt_onnx):
    run = _run(tmp_path, gpt_onnx, {"fp16": (_manifest(gpt_onnx, "9.0"), "accepted")})
    exported = export_repository(run, tmp_path / "out", "gpt", SERVING, target=H100_TRT)
    assert [v.model_name for v in exported.versions] == ["gpt-fp32", "gpt-tensorrt-fp16"]
    version = exported.versions[1].path
    assert sorted(p.name for p in version.iterdir()) == ["manifest.json", "model-sm90.json", "model-sm90.plan"]
    config = parse_config((tmp_path / "out" / "gpt-tensorrt-fp16" / "config.pbtxt").read_text())
    assert config.platform == "tensorrt_plan" and dict(config.cc_model_filenames) == {"9.0": "model-sm90.plan"}
    assert exported.server_args == []


def test_export_repository_refuses_engines_for_another_target_or_without_one(tmp_path, gpt_onnx):
    run = _run(tmp_path, gpt_onnx, {"fp16": (_manifest(gpt_onnx, "9.0"), "accepted")})
    a100 = EngineTarget(tensorrt_version="10.3.0.26", compute_capabilities=("8.0",))
    with pytest.raises(EngineMismatch, match="8.0: .*built for compute capability 9.0, the target GPU has 8.0"):
        export_repository(run, tmp_path / "out", "gpt", SERVING, target=a100)
    assert not (tmp_path / "out").exists()  # engines are checked before any model is written
    with pytest.raises(RepositoryError, match="--target-tensorrt"):
        export_repository(run, tmp_path / "out2", "gpt", SERVING)
    onnx_only = export_repository(run, tmp_path / "out3", "gpt", SERVING, include_engines=False)
    assert [v.model_name for v in onnx_only.versions] == ["gpt-fp32"]


def test_unverified_rejected_or_foreign_engines_are_left_out_with_the_reason(tmp_path, gpt_onnx):
    foreign = _manifest(gpt_onnx, precision="bf16", onnx_sha256="f" * 64)
    run = _run(
        tmp_path,
        gpt_onnx,
        {
            "fp16": (_manifest(gpt_onnx), "rejected"),
            "fp32": (_manifest(gpt_onnx, precision="fp32"), None),
            "bf16": (foreign, "accepted"),
        },
    )
    exported = export_repository(run, tmp_path / "out", "gpt", SERVING, target=H100_TRT)
    assert [v.model_name for v in exported.versions] == ["gpt-fp32"]
    reasons = "\n".join(exported.left_out)
    assert (
        "rejected by verification: accuracy gate" in reasons
        and "never verified" in reasons
        and "not this run's" in reasons
    )


def test_engines_from_several_gpus_cover_a_mixed_cluster_and_a_missing_one_can_be_rebuilt(tmp_path, gpt_onnx):
    run = _run(tmp_path, gpt_onnx, {"fp16": (_manifest(gpt_onnx, "9.0"), "accepted")})
    a100_engine = _stand_in_engine(tmp_path / "from-an-a100", _manifest(gpt_onnx, "8.0"))
    cluster = EngineTarget(tensorrt_version="10.3.0.26", compute_capabilities=("8.0", "9.0"))
    exported = export_repository(run, tmp_path / "out", "gpt", SERVING, target=cluster, engine_dirs=[a100_engine])
    assert "gpt-tensorrt-fp16" in {version.model_name for version in exported.versions}
    config = parse_config((tmp_path / "out" / "gpt-tensorrt-fp16" / "config.pbtxt").read_text())
    assert dict(config.cc_model_filenames) == {"8.0": "model-sm80.plan", "9.0": "model-sm90.plan"}
    asked = []

    def rebuild(precision: str, capability: str) -> Path:  # stands in for a build on a GPU of that capability
        asked.append((precision, capability))
        return _stand_in_engine(tmp_path / f"rebuilt-{capability}", _manifest(gpt_onnx, capability))

    rebuilt = export_repository(run, tmp_path / "out2", "gpt", SERVING, target=cluster, rebuild=rebuild)
    assert asked == [("fp16", "8.0")] and len(rebuilt.versions) == 2

    def unverified(precision: str, capability: str) -> Path:
        return _stand_in_engine(tmp_path / f"unverified-{capability}", _manifest(gpt_onnx, capability), verdict=None)

    with pytest.raises(EngineMismatch, match="rebuilt for compute capability 8.0 is not usable: .*never verified"):
        export_repository(run, tmp_path / "out3", "gpt", SERVING, target=cluster, rebuild=unverified)


def test_version_compatible_engines_tell_the_server_how_to_load_them(tmp_path, gpt_onnx):
    run = _run(
        tmp_path, gpt_onnx, {"fp16": (_manifest(gpt_onnx, version_compatible=True, tensorrt="10.1.0.27"), "accepted")}
    )
    exported = export_repository(run, tmp_path / "out", "gpt", SERVING, target=H100_TRT)
    assert exported.server_args == ["--backend-config=tensorrt,version-compatible=true"]
