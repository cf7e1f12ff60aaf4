"""The `native` repository flavour: every generated config parses into Triton's ModelConfig and keeps the invariants
Triton and its backends enforce at load; invalid configs and engines for another target are refused with the reason.

Engines here are stand-in files (a few bytes and a manifest written by the test): only the repository layout, the
configs and the compatibility checks are under test, never an engine. The bundled Triton has only the Python backend
(no onnxruntime, tensorrt or openvino backend), so these models are not loaded by Triton; an OpenVINO model is
instead read, batched and compiled with OpenVINO the way openvino_backend's src/openvino.cc does it.
"""

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from tritonclient.grpc import model_config_pb2 as mc

from core.errors import EngineMismatch, RepositoryError
from core.files import sha256_file
from export.onnx_export import ExportConfig, export_onnx
from recipes import build_recipe
from serving.native_configs import (
    check_engine,
    engine_problems,
    onnx_config,
    openvino_backend_config,
    plan_config,
    validate,
)
from serving.native_repository import EngineTarget, export_repository, write_native_version
from serving.repository import ServingConfig, config_text, parse_config, read_config
from tests.conftest import TINY_GPT

SERVING = ServingConfig(max_batch_size=8)
H100_TRT = EngineTarget(tensorrt_version="10.3.0.26", compute_capabilities=("9.0",))


@pytest.fixture(scope="module")
def gpt_onnx(tmp_path_factory) -> Path:
    recipe = build_recipe("stdlib-gpt", TINY_GPT)
    return Path(export_onnx(recipe, recipe.build_model(), tmp_path_factory.mktemp("gpt"), ExportConfig()).output.onnx)


@pytest.fixture(scope="module")
def gpt_ir(tmp_path_factory, gpt_onnx) -> Path:
    """The stdlib-gpt graph as an OpenVINO IR (model.xml, weights in model.bin), as openvino-nncf leaves one."""
    ov = pytest.importorskip("openvino")
    xml = tmp_path_factory.mktemp("ir") / "openvino-nncf.xml"
    ov.save_model(ov.convert_model(str(gpt_onnx)), str(xml), compress_to_fp16=False)
    return xml


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


# --- openvino ---------------------------------------------------------------------------------------------------------
MEASURED = {"performance_hint": "THROUGHPUT", "streams": 2, "threads": 4}  # what the precision stage kept, say


def _load_as_the_openvino_backend_does(version_dir: Path, config: mc.ModelConfig):
    """openvino_backend's load (src/openvino.cc), with OpenVINO's Python API: read the model file, set each input's
    type and layout N..., fix the batch axis to max_batch_size (ov::set_batch), compile on the CPU with the
    properties its parameters become."""
    ov = pytest.importorskip("openvino")
    from core.runtimes import openvino_has_bf16

    model = ov.Core().read_model(str(version_dir / config.default_model_filename))
    preprocess = ov.preprocess.PrePostProcessor(model)
    for tensor in config.input:
        preprocess.input(tensor.name).tensor().set_element_type({mc.TYPE_INT64: ov.Type.i64}[tensor.data_type])
        preprocess.input(tensor.name).tensor().set_layout(ov.Layout("N..."))
    model = preprocess.build()
    ov.set_batch(model, config.max_batch_size)
    parameters = {key: value.string_value for key, value in config.parameters.items()}
    properties = {"PERFORMANCE_HINT": parameters["PERFORMANCE_HINT"]}
    for key in ("INFERENCE_NUM_THREADS", "NUM_STREAMS"):
        if key in parameters:
            properties[key] = int(parameters[key])
    if parameters.get("HINT_BF16") == "YES" and openvino_has_bf16():
        properties["INFERENCE_PRECISION_HINT"] = "bf16"
    return ov.Core().compile_model(model, "CPU", properties)


def test_openvino_models_name_their_files_as_the_backend_expects_with_the_measured_parameters(
    tmp_path, gpt_onnx, gpt_ir
):
    serving = ServingConfig(max_batch_size=8, instance_count=2)
    onnx_model = openvino_backend_config("gpt-openvino-int8", "model.onnx", gpt_onnx, serving, "bf16", MEASURED)
    parsed = parse_config(config_text(onnx_model))
    assert parsed == onnx_model and parsed.backend == "openvino" and not parsed.platform
    assert parsed.default_model_filename == "model.onnx"
    assert {key: value.string_value for key, value in parsed.parameters.items()} == {
        "PERFORMANCE_HINT": "THROUGHPUT",
        "NUM_STREAMS": "2",
        "INFERENCE_NUM_THREADS": "4",
        "HINT_BF16": "YES",
        "ENABLE_BATCH_PADDING": "YES",  # the backend runs every batch at max_batch_size
    }
    assert [(g.kind, g.count) for g in parsed.instance_group] == [(mc.ModelInstanceGroup.KIND_CPU, 2)]
    assert parsed.HasField("dynamic_batching") and parsed.max_batch_size == 8
    assert [(t.name, t.data_type, list(t.dims)) for t in parsed.input] == [("tokens", mc.TYPE_INT64, [-1])]
    assert [(t.name, list(t.dims)) for t in parsed.output] == [("logits", [256])]
    version = write_native_version(tmp_path, onnx_model, {"model.onnx": gpt_onnx})
    assert version.files == {"model.onnx": sha256_file(gpt_onnx)}

    ir_model = openvino_backend_config("gpt-openvino-nncf", "model.xml", gpt_onnx, serving, "f32")
    assert ir_model.default_model_filename == "model.xml"
    assert {key: value.string_value for key, value in ir_model.parameters.items()} == {
        "PERFORMANCE_HINT": "LATENCY",  # core.runtimes.openvino_config's default
        "ENABLE_BATCH_PADDING": "YES",
    }
    version = write_native_version(tmp_path, ir_model, {"model.xml": gpt_ir, "model.bin": gpt_ir.with_suffix(".bin")})
    assert sorted(p.name for p in version.path.iterdir()) == ["manifest.json", "model.bin", "model.xml"]
    recorded = json.loads((version.path / "manifest.json").read_text())["files"]
    assert recorded == {"model.bin": sha256_file(gpt_ir.with_suffix(".bin")), "model.xml": sha256_file(gpt_ir)}
    unbatched = openvino_backend_config("gpt-ov", "model.onnx", gpt_onnx, ServingConfig(max_batch_size=0), "f32")
    assert "ENABLE_BATCH_PADDING" not in unbatched.parameters and list(unbatched.input[0].dims) == [-1, -1]


def test_an_openvino_model_compiles_as_the_backend_loads_it_and_answers_a_padded_batch(tmp_path, gpt_onnx, gpt_ir):
    config = openvino_backend_config(
        "gpt-openvino-nncf",
        "model.xml",
        gpt_onnx,
        ServingConfig(max_batch_size=8),
        "bf16",
        {"threads": 2, "streams": 1},
    )
    version = write_native_version(tmp_path, config, {"model.xml": gpt_ir, "model.bin": gpt_ir.with_suffix(".bin")})
    compiled = _load_as_the_openvino_backend_does(version.path, config)
    tokens = np.array([[3, 1, 4, 1, 5, 9]], dtype=np.int64)
    padded = np.concatenate([tokens, np.zeros((7, tokens.shape[1]), dtype=np.int64)])  # ENABLE_BATCH_PADDING's zeros
    logits = next(iter(compiled.create_infer_request().infer({"tokens": padded}).values()))
    expected = ort.InferenceSession(str(gpt_onnx), providers=["CPUExecutionProvider"]).run(None, {"tokens": tokens})[0]
    assert logits.shape == (8, 256)
    np.testing.assert_allclose(logits[:1], expected, atol=0.02)  # bf16 float layers: ~0.002 off here


@pytest.mark.parametrize(
    "breakage, message",
    [
        (
            lambda c: c.instance_group[0].__setattr__("kind", mc.ModelInstanceGroup.KIND_GPU),
            "instance group kind KIND_GPU: the openvino backend runs KIND_CPU (or KIND_AUTO) instances only",
        ),
        (
            lambda c: c.parameters["INFERENCE_PRECISION_HINT"].__setattr__("string_value", "f32"),
            "parameter 'INFERENCE_PRECISION_HINT' is not one the openvino backend reads",
        ),
        (lambda c: c.parameters["HINT_BF16"].__setattr__("string_value", "NO"), "HINT_BF16 is 'NO'"),
        (lambda c: c.parameters["PERFORMANCE_HINT"].__setattr__("string_value", "FAST"), "PERFORMANCE_HINT is 'FAST'"),
        (lambda c: c.parameters.pop("ENABLE_BATCH_PADDING"), "refuses every batch but 8"),
        (lambda c: c.output[0].__setattr__("name", "probs"), "output 'probs' is not in the IR model.xml"),
        (lambda c: c.input[0].dims.append(4), "config says TYPE_INT64 [-1, 4], the IR model.xml has TYPE_INT64 [-1]"),
        (lambda c: c.__setattr__("default_model_filename", "model.pt2"), "'model.pt2' is not in"),
        (lambda c: c.__setattr__("backend", "openvin"), "expected platform onnxruntime_onnx or tensorrt_plan, or"),
    ],
)
def test_invalid_openvino_configs_are_refused_with_the_reason(tmp_path, gpt_onnx, gpt_ir, breakage, message):
    config = openvino_backend_config("gpt-openvino-nncf", "model.xml", gpt_onnx, SERVING, "bf16")
    (tmp_path / "model.xml").write_bytes(gpt_ir.read_bytes())
    (tmp_path / "model.bin").write_bytes(gpt_ir.with_suffix(".bin").read_bytes())
    validate(config, tmp_path)
    breakage(config)
    with pytest.raises(RepositoryError, match="would not load") as refused:
        validate(config, tmp_path)
    assert message in str(refused.value)


def test_an_ir_without_its_weights_is_refused(tmp_path, gpt_onnx, gpt_ir):
    config = openvino_backend_config("gpt-openvino-nncf", "model.xml", gpt_onnx, SERVING)
    with pytest.raises(RepositoryError, match="the IR model.xml has no weights model.bin beside it"):
        write_native_version(tmp_path, config, {"model.xml": gpt_ir})
    assert not (tmp_path / "gpt-openvino-nncf" / "1").exists()


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
def _variant(name: str, path: Path, runtime: str, throughput: float, latency_ms: float, **fields) -> dict:
    """A variants.json entry as the precision stage writes it (export/variants.py VariantReport)."""
    return {
        "name": name,
        "status": "accepted",
        "runtime": runtime,
        "path": str(path),
        "sha256": sha256_file(path),
        "throughput_per_s": throughput,
        "latency_p50_ms": latency_ms,
    } | fields


def _run(
    tmp_path: Path,
    gpt_onnx: Path,
    engines: dict[str, tuple[dict, str | None]] | None = None,
    extra: tuple[dict, ...] = (),
    selected: str = "fp32",
) -> Path:
    run = tmp_path / "run"
    (run / "precision").mkdir(parents=True)
    (run / "export").mkdir()
    (run / "export" / "model.onnx").write_bytes(gpt_onnx.read_bytes())  # the interface of an IR variant
    variants = [
        _variant("fp32", gpt_onnx, "onnxruntime", 100.0, 1.0),
        {"name": "fp16", "status": "rejected", "runtime": "onnxruntime", "path": str(gpt_onnx), "sha256": ""},
        _variant(
            "openvino-bf16",
            gpt_onnx,
            "openvino",
            300.0,
            2.0,
            runtime_precision="bf16",
            settings={"performance_hint": "THROUGHPUT"},
        ),
        *extra,
    ]
    for variant in variants:
        variant["serves_alias"] = variant["name"] == selected
    (run / "precision" / "variants.json").write_text(json.dumps(variants))
    for name, (manifest, verdict) in (engines or {}).items():
        _stand_in_engine(run / "tensorrt" / name, manifest, verdict)
    return run


def _parameters(config: mc.ModelConfig) -> dict[str, str]:
    return {key: value.string_value for key, value in config.parameters.items()}


def test_export_repository_writes_onnxruntime_and_openvino_models_and_the_alias_to_the_selection(
    tmp_path, gpt_onnx, gpt_ir
):
    nncf = _variant(
        "openvino-nncf",
        gpt_ir,
        "openvino",
        200.0,
        1.5,
        runtime_precision="f32",
        files=[str(gpt_ir.with_suffix(".bin"))],
    )
    run = _run(tmp_path, gpt_onnx, extra=(nncf,), selected="openvino-bf16")
    exported = export_repository(run, tmp_path / "out", "gpt", SERVING)
    out = tmp_path / "out"
    assert [v.model_name for v in exported.versions] == ["gpt-fp32", "gpt-openvino-bf16", "gpt-openvino-nncf"]
    assert exported.left_out == []
    assert read_config(out, "gpt-fp32").platform == "onnxruntime_onnx"
    bf16 = read_config(out, "gpt-openvino-bf16")
    assert bf16.backend == "openvino" and bf16.default_model_filename == "model.onnx"
    assert _parameters(bf16) == {"PERFORMANCE_HINT": "THROUGHPUT", "HINT_BF16": "YES", "ENABLE_BATCH_PADDING": "YES"}
    ir = read_config(out, "gpt-openvino-nncf")
    assert ir.default_model_filename == "model.xml" and "HINT_BF16" not in ir.parameters
    assert ir.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU  # whatever `gpu` says: the backend's only kind
    version = exported.versions[2]
    assert version.files == {
        "model.bin": sha256_file(gpt_ir.with_suffix(".bin")),
        "model.xml": sha256_file(gpt_ir),
    }  # every file copied under the backend's names and checksummed
    assert [note.split(":")[0] for note in exported.notes] == ["gpt-openvino-nncf"]  # f32 cannot be pinned
    assert "no parameter that pins f32" in exported.notes[0]

    alias = read_config(out, "gpt")
    assert exported.alias.model_name == "gpt" and exported.alias_target == "gpt-openvino-bf16"
    assert alias.platform == "ensemble" and alias.max_batch_size == bf16.max_batch_size
    assert list(alias.input) == list(bf16.input) and list(alias.output) == list(bf16.output)
    (step,) = alias.ensemble_scheduling.step
    assert step.model_name == "gpt-openvino-bf16" and step.model_version == -1
    assert dict(step.input_map) == {"tokens": "tokens"} and dict(step.output_map) == {"logits": "logits"}


def test_a_torch_native_selection_falls_back_to_the_best_written_variant_by_the_policy(tmp_path, gpt_onnx):
    package = tmp_path / "torch-compile.pt2"
    package.write_bytes(b"stand-in")
    torch_variant = _variant("torch-compile", package, "torch", 900.0, 0.5)
    run = _run(tmp_path, gpt_onnx, extra=(torch_variant,), selected="torch-compile")
    fastest = export_repository(run, tmp_path / "out", "gpt", SERVING)
    assert [v.model_name for v in fastest.versions] == ["gpt-fp32", "gpt-openvino-bf16"]
    assert fastest.left_out[0].startswith("torch-compile: runs in torch, which this flavour does not write")
    assert fastest.alias_target == "gpt-openvino-bf16"
    assert fastest.notes == [
        "the run serves torch-compile under the plain name, which this flavour does not write (it runs in torch); "
        "the alias forwards to openvino-bf16 instead, the best it wrote by max-throughput (300 samples/s)"
    ]
    quickest = export_repository(run, tmp_path / "out2", "gpt", SERVING, policy="min-latency")
    assert quickest.alias_target == "gpt-fp32" and "by min-latency (p50 1.00 ms at batch 1)" in quickest.notes[0]
    assert read_config(tmp_path / "out2", "gpt").ensemble_scheduling.step[0].model_name == "gpt-fp32"


def test_the_cli_prints_the_alias_and_why_it_is_not_the_run_selection(capsys, monkeypatch, tmp_path, gpt_onnx):
    from flows.cli import main

    monkeypatch.setenv("TES_HOME", str(tmp_path))  # the project home: nothing lands in the checkout

    package = tmp_path / "torch-compile.pt2"
    package.write_bytes(b"stand-in")
    run = _run(
        tmp_path, gpt_onnx, extra=(_variant("torch-compile", package, "torch", 900.0, 0.5),), selected="torch-compile"
    )
    params = {"model_name": "gpt", "stdlib_gpt": TINY_GPT, "serving": {"max_batch_size": 8}}
    (run / "manifest.json").write_text(json.dumps({"params": params}))
    (run / "summary.json").write_text("{}")  # a finished run
    code = main(["export-repository", str(tmp_path / "out"), "--run", str(run), "--cpu"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "gpt -> gpt-openvino-bf16" in out and "gpt-fp32" in out
    assert "note: the run serves torch-compile under the plain name, which this flavour does not write" in out
    assert "left out: torch-compile: runs in torch" in out


def test_export_repository_ships_verified_engines_that_fit_the_target(tmp_path, gpt_onnx):
    run = _run(tmp_path, gpt_onnx, {"fp16": (_manifest(gpt_onnx, "9.0"), "accepted")})
    exported = export_repository(run, tmp_path / "out", "gpt", SERVING, target=H100_TRT)
    assert [v.model_name for v in exported.versions] == ["gpt-fp32", "gpt-openvino-bf16", "gpt-tensorrt-fp16"]
    version = exported.versions[2].path
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
    assert [v.model_name for v in onnx_only.versions] == ["gpt-fp32", "gpt-openvino-bf16"]


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
    assert [v.model_name for v in exported.versions] == ["gpt-fp32", "gpt-openvino-bf16"]
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
    assert asked == [("fp16", "8.0")] and len(rebuilt.versions) == 3

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
