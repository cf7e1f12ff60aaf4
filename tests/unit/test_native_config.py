import json
from pathlib import Path

import pytest
from tritonclient.grpc import model_config_pb2 as mc

from core.errors import RepositoryError
from export.onnx_export import ExportConfig, export_onnx
from serving.native_repository import export_repository, onnx_config, plan_config, validate, write_native_version
from serving.repository import ServingConfig, config_text, parse_config
from tests.conftest import TINY_GPT
from training.recipes import build_recipe


@pytest.fixture(scope="module")
def gpt_onnx(tmp_path_factory) -> Path:
    recipe = build_recipe("stdlib-gpt", TINY_GPT)
    return Path(export_onnx(recipe, recipe.build_model(), tmp_path_factory.mktemp("gpt"), ExportConfig()).outputs["onnx"])


def test_onnxruntime_config_round_trips_and_matches_the_graph(tmp_path, gpt_onnx):
    config = onnx_config("gpt-fp32", gpt_onnx, ServingConfig(max_batch_size=8, instance_count=2))
    parsed = parse_config(config_text(config))
    assert parsed == config and parsed.platform == "onnxruntime_onnx" and parsed.default_model_filename == "model.onnx"
    assert [(t.name, t.data_type, list(t.dims)) for t in parsed.input] == [("tokens", mc.TYPE_INT64, [-1])]
    assert [(t.name, list(t.dims)) for t in parsed.output] == [("logits", [256])]
    assert parsed.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU and parsed.instance_group[0].count == 2
    version = write_native_version(tmp_path, config, {"model.onnx": gpt_onnx})
    assert sorted(p.name for p in version.path.iterdir()) == ["manifest.json", "model.onnx"]


def _engines(folder: Path, capabilities: list[str]) -> dict[str, Path]:
    files = {}
    for capability in capabilities:
        engine = folder / f"model-sm{capability.replace('.', '')}.plan"
        engine.write_bytes(b"stand-in bytes: only the repository layout is under test")
        engine.with_suffix(".json").write_text(json.dumps({"compute_capability": capability}))
        files[engine.name], files[engine.with_suffix(".json").name] = engine, engine.with_suffix(".json")
    return files


def test_plan_config_maps_compute_capabilities_to_engines(tmp_path, gpt_onnx):
    files = _engines(tmp_path, ["8.0", "9.0"])
    config = plan_config("gpt-trt", gpt_onnx, {"8.0": "model-sm80.plan", "9.0": "model-sm90.plan"}, ServingConfig(max_batch_size=8))
    parsed = parse_config(config_text(config))
    assert parsed.platform == "tensorrt_plan" and dict(parsed.cc_model_filenames) == {"8.0": "model-sm80.plan", "9.0": "model-sm90.plan"}
    version = write_native_version(tmp_path / "repo", config, files)
    assert (version.path / "model-sm90.plan").is_file()


@pytest.mark.parametrize("breakage, message", [
    (lambda c: c.cc_model_filenames.__setitem__("sm90", "model-sm90.plan"), "not a compute capability"),
    (lambda c: c.cc_model_filenames.__setitem__("9.0", "missing.plan"), "is not in"),
    (lambda c: c.input[0].dims.__setitem__(0, 0), "must be -1 or positive"),
    (lambda c: c.output[0].__setattr__("name", "tokens"), "tensor names repeat"),
])
def test_invalid_native_configs_are_refused_with_the_reason(tmp_path, gpt_onnx, breakage, message):
    files = _engines(tmp_path, ["9.0"])
    config = plan_config("gpt-trt", gpt_onnx, {"9.0": "model-sm90.plan"}, ServingConfig(max_batch_size=8))
    breakage(config)
    with pytest.raises(RepositoryError, match=message):
        write_native_version(tmp_path / "repo", config, files)
    assert not (tmp_path / "repo" / "gpt-trt" / "1").exists()  # nothing half-written


def test_an_engine_without_its_manifest_is_refused(tmp_path, gpt_onnx):
    engine = tmp_path / "model.plan"
    engine.write_bytes(b"x")
    config = plan_config("gpt-trt", gpt_onnx, {"9.0": "model.plan"}, ServingConfig(max_batch_size=8))
    with pytest.raises(RepositoryError, match="no manifest"):
        validate(config, tmp_path)


def test_export_repository_writes_a_native_model_per_accepted_onnxruntime_variant(tmp_path, gpt_onnx):
    run = tmp_path / "run"
    (run / "precision").mkdir(parents=True)
    variants = [{"name": "fp32", "status": "accepted", "runtime": "onnxruntime", "path": str(gpt_onnx)},
                {"name": "fp16", "status": "rejected", "runtime": "onnxruntime", "path": str(gpt_onnx)},
                {"name": "openvino-bf16", "status": "accepted", "runtime": "openvino", "path": str(gpt_onnx)}]
    (run / "precision" / "variants.json").write_text(json.dumps(variants))
    written = export_repository(run, tmp_path / "out", "gpt", ServingConfig(max_batch_size=8))
    assert [v.model_name for v in written] == ["gpt-fp32"]
    assert parse_config((tmp_path / "out" / "gpt-fp32" / "config.pbtxt").read_text()).platform == "onnxruntime_onnx"
