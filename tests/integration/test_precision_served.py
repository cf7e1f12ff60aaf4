"""The newer precision candidates served from a real Triton: NNCF's OpenVINO INT8 (an IR with its weights file)
and the torch-native ones (AOTInductor packages), each answering as it does in-process, with the runtime settings
the precision stage picked written into the served config."""

import json
from pathlib import Path

import numpy as np
import pytest

from core.runtimes import open_session
from export.onnx_export import ExportConfig, export_onnx
from export.variants import PrecisionConfig, PrecisionOutput, build_and_score
from flows.pipeline import _deployables
from recipes import build_recipe
from recipes.evaluation import load_trained
from serving import client, repository
from serving.deploy import deploy
from serving.repository import ServingConfig
from tests.conftest import TINY_DIGITS
from training.loop import TrainingConfig, train

pytestmark = pytest.mark.integration

CANDIDATES = ("openvino-nncf", "torch-compile", "torchao-int8")


@pytest.fixture(scope="module")
def served(triton_server, tmp_path_factory):
    """A briefly trained tiny digits model, its NNCF and torch-native variants built and gated, then deployed and
    loaded into the module's Triton; (recipe, reports by name, deploy output)."""
    recipe, folder = build_recipe("digits-cnn", TINY_DIGITS), tmp_path_factory.mktemp("candidates")
    training = TrainingConfig(steps=40, learning_rate=1e-2, warmup_steps=5, eval_every=1000, eval_samples=64)
    weights = train(recipe, training, folder / "train", progress=False).output.weights
    onnx_path = export_onnx(recipe, load_trained(recipe, weights), folder, ExportConfig()).output.onnx
    config = PrecisionConfig(
        variants=CANDIDATES,
        accuracy_budget=1,
        min_speedup=0,
        calibration_samples=32,
        score_samples=128,
        speed_repeats=3,
    )
    reports = build_and_score(recipe, onnx_path, folder / "precision", config, weights)
    output = PrecisionOutput(
        variants=tuple(reports),
        selected=next(r.name for r in reports if r.serves_alias),
        policy=config.policy,
        primary_metric=recipe.primary_metric,
    )
    deployed = deploy(
        triton_server.repository,
        "digits",
        _deployables(output),
        output.selected,
        ServingConfig(max_batch_size=16),
        {"recipe": recipe.name},
        triton_server.endpoint(),
    ).output
    return recipe, {r.name: r for r in reports}, deployed


@pytest.mark.parametrize("variant", CANDIDATES)
def test_candidate_served_from_triton_matches_in_process(triton_server, served, variant):
    recipe, reports, deployed = served
    report = reports[variant]
    assert report.status == "accepted", report.reason
    assert deployed.variants[variant].ready_version == str(deployed.variants[variant].version)
    session = open_session(report.path, report.runtime, report.runtime_precision, settings=report.runtime_settings())
    batch = next(iter(recipe.eval_batches(16, max_samples=16))).inputs
    expected = session.run(None, batch)[0]
    for protocol, url in (("http", triton_server.http_url), ("grpc", triton_server.grpc_url)):
        got = client.infer(url, f"digits-{variant}", batch, protocol)["logits"]
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5, err_msg=f"{variant} over {protocol}")


def test_served_config_records_the_runtime_and_settings_that_won(served):
    _, reports, deployed = served
    for variant in CANDIDATES:
        report, version = reports[variant], Path(deployed.variants[variant].path)
        config = repository.read_config(version.parent.parent, version.parent.name)
        parameters = {key: value.string_value for key, value in config.parameters.items()}
        assert parameters["runtime"] == report.runtime
        assert json.loads(parameters.get("runtime_settings", "{}")) == report.settings
        model_file = parameters.get("model_file", "model.onnx")
        assert model_file == "model" + Path(report.path).suffix
        manifest = json.loads((version / repository.VERSION_MANIFEST).read_text())
        assert model_file in manifest["files"]
    # the IR's weights travel with it, checksummed like the graph
    nncf_version = Path(deployed.variants["openvino-nncf"].path)
    assert {"model.xml", "model.bin"} <= set(json.loads((nncf_version / "manifest.json").read_text())["files"])
