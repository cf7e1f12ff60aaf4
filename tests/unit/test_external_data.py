"""Models past 2 GB, in miniature: the export's size threshold forced down to 0 puts a tiny model's weights in an
external data file, and everything downstream (verification, precision variants, the repository writer, the
Python-backend model's manifest check) must carry that file along and checksum it."""

import gc
import importlib.util
import json
import sys
import types
import weakref
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from core.errors import ChecksumError, RepositoryError
from core.files import atomic_write_with_companions, model_companions, onnx_data_files, sha256_file
from core.runtimes import open_session
from export.onnx_export import ExportConfig, export_onnx
from export.variants import PrecisionConfig, build_and_score
from recipes import build_recipe
from serving import repository
from serving.repository import ServingConfig, verify_version, write_version
from tests.conftest import TINY_GPT

ROOT = Path(__file__).resolve().parents[2]
FORCED = ExportConfig(external_data_threshold_bytes=0, verify_batch_sizes=(1, 3), verify_samples=6)


@pytest.fixture(scope="module")
def external(tmp_path_factory):
    """A tiny random GPT exported with its weights forced into `model.onnx.data`; (recipe, model, result)."""
    recipe = build_recipe("stdlib-gpt", TINY_GPT)
    torch.manual_seed(0)
    model = recipe.build_model().eval()
    return recipe, model, export_onnx(recipe, model, tmp_path_factory.mktemp("external"), FORCED)


def test_the_threshold_puts_the_weights_in_one_data_file_beside_the_graph(external):
    recipe, model, result = external
    graph_path = Path(result.output.onnx)
    data_path = graph_path.with_name("model.onnx.data")
    assert onnx_data_files(graph_path) == [data_path] and data_path.stat().st_size > graph_path.stat().st_size
    assert sorted(p.name for p in graph_path.parent.iterdir()) == ["model.onnx", "model.onnx.data"]  # no scratch left
    assert [Path(a.path).name for a in result.artifacts] == ["model.onnx", "model.onnx.data"]
    assert result.artifacts[1].sha256 == sha256_file(data_path)
    assert result.output.verification.cases >= 3 and result.output.verification.max_abs_diff["logits"] < 1e-4
    tokens = np.random.default_rng(0).integers(0, 256, (2, 20), dtype=np.int64)
    with torch.no_grad():
        expected = model(torch.from_numpy(tokens)).numpy()
    np.testing.assert_allclose(open_session(graph_path).run(None, {"tokens": tokens})[0], expected, atol=1e-4)


def test_below_the_threshold_the_weights_stay_inline(tmp_path: Path):
    recipe = build_recipe("stdlib-gpt", TINY_GPT)
    config = ExportConfig(verify_batch_sizes=(1,), verify_samples=1)
    result = export_onnx(recipe, recipe.build_model(), tmp_path, config)
    assert onnx_data_files(result.output.onnx) == [] and [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


def test_the_export_keeps_no_reference_to_the_weights(tmp_path: Path):
    """At 1 B parameters a leftover reference is 4 GB held through every later stage (onnxscript's rewriter kept
    the exported graph, which wraps the torch parameters)."""
    recipe = build_recipe("stdlib-gpt", TINY_GPT)
    model = recipe.build_model().eval()
    weight = weakref.ref(model.gpt.blocks[0].mlp[0].weight)
    export_onnx(recipe, model, tmp_path, ExportConfig(verify_batch_sizes=(1,), verify_samples=1))
    del model
    gc.collect()
    assert weight() is None


def test_variants_of_an_external_data_model_carry_their_own_data_files(external, tmp_path: Path):
    recipe, _, result = external
    config = PrecisionConfig(
        variants=("int8-dynamic", "fp16", "openvino-int8"),
        min_speedup=0,
        accuracy_budget=1,
        calibration_samples=16,
        score_samples=64,
        speed_repeats=3,
        tune_settings=False,
    )
    reports = {r.name: r for r in build_and_score(recipe, result.output.onnx, tmp_path, config)}
    assert reports["fp32"].files == [str(Path(result.output.onnx).with_name("model.onnx.data"))]
    for name in ("int8-dynamic", "fp16", "openvino-int8"):
        report = reports[name]
        assert report.status == "accepted", (name, report.reason)
        assert report.files == [str(tmp_path / f"{name}.onnx.data")], name
        assert report.bytes == sum(Path(p).stat().st_size for p in [report.path, *report.files])
        assert report.top1_agreement > 0.9 and report.max_abs_diff < 0.1, name
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no scratch folders or temp graphs left


def _backend(monkeypatch):
    """serving/backend/model.py with a stand-in for Triton's `triton_python_backend_utils`."""

    class TritonModelException(Exception):
        pass

    logger = types.SimpleNamespace(log_info=lambda line: None, log_warn=lambda line: None)
    stand_in = types.SimpleNamespace(Logger=logger, TritonModelException=TritonModelException)
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", stand_in)
    spec = importlib.util.spec_from_file_location("tes_backend_model", ROOT / "serving" / "backend" / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, TritonModelException


def test_a_version_holds_the_data_file_under_its_own_name_checksummed(external, tmp_path: Path, monkeypatch):
    _, _, result = external
    version = write_version(tmp_path, "gpt", result.output.onnx, ServingConfig(max_batch_size=4))
    assert sorted(p.name for p in version.path.iterdir()) == [
        "manifest.json",
        "model.onnx",
        "model.onnx.data",
        "model.py",
    ]
    manifest = json.loads((version.path / "manifest.json").read_text())
    assert manifest["files"]["model.onnx.data"] == sha256_file(Path(result.output.onnx).with_name("model.onnx.data"))
    assert model_companions(version.path / "model.onnx") == [version.path / "model.onnx.data"]
    tokens = np.zeros((1, 8), dtype=np.int64)
    np.testing.assert_array_equal(
        open_session(version.path / "model.onnx").run(None, {"tokens": tokens})[0],
        open_session(result.output.onnx).run(None, {"tokens": tokens})[0],
    )
    backend, refused = _backend(monkeypatch)
    backend.verify_manifest("gpt", str(version.path))  # intact: no exception

    data = version.path / "model.onnx.data"
    corrupted = bytearray(data.read_bytes())
    corrupted[len(corrupted) // 2] ^= 0xFF  # same size, one byte changed: ONNX Runtime alone would load it
    data.write_bytes(bytes(corrupted))
    with pytest.raises(ChecksumError, match="model.onnx.data"):
        verify_version(version.path)
    with pytest.raises(refused) as caught:
        backend.verify_manifest("gpt", str(version.path))
    message = str(caught.value)
    assert "model.onnx.data" in message and manifest["files"]["model.onnx.data"] in message
    assert sha256_file(data) in message and "publish a fresh version" in message


def test_data_files_named_as_companions_or_found_in_the_graph_are_copied_once(external, tmp_path: Path):
    _, _, result = external
    first = write_version(tmp_path, "gpt", result.output.onnx, ServingConfig())
    # what deploy passes (the variant's files, the data among them) is the same file the graph names
    again = write_version(
        tmp_path, "gpt", result.output.onnx, ServingConfig(), companions=onnx_data_files(result.output.onnx)
    )
    assert again.reused and again.version == first.version
    assert sorted(first.files) == ["model.onnx", "model.onnx.data", "model.py"]


def _graph_with_data_at(folder: Path, location: str) -> Path:
    weight = onnx.numpy_helper.from_array(np.ones((4, 4), dtype=np.float32), "w")
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 4])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 4])],
        [weight],
    )
    path = folder / "m.onnx"
    (folder / location).parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(
        onnx.helper.make_model(graph), str(path), save_as_external_data=True, location=location, size_threshold=0
    )
    return path


@pytest.mark.parametrize(
    ("location", "problem"), [("weights/m.data", "outside its own folder"), ("model.py", "would share a name")]
)
def test_data_files_the_flat_version_folder_cannot_hold_are_refused(tmp_path: Path, location, problem):
    path = _graph_with_data_at(tmp_path / "source", location)
    with pytest.raises(RepositoryError, match=problem):
        write_version(tmp_path / "repo", "m", path, ServingConfig())
    assert repository.versions(tmp_path / "repo" / "m") == []


def test_a_failed_write_leaves_neither_graph_nor_data(tmp_path: Path):
    def write_then_fail(scratch_path: Path) -> None:
        scratch_path.with_name(scratch_path.name + ".data").write_bytes(b"weights")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        atomic_write_with_companions(tmp_path / "model.onnx", write_then_fail)
    assert list(tmp_path.iterdir()) == []
