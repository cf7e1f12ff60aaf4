"""A model with external data served end to end by a real Triton: its data files reach the version folder, it loads
and answers over HTTP and gRPC as it does in-process, and a version whose data file changed after it was written
is refused at load while the version before it keeps answering."""

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from core.errors import ServerError
from core.files import onnx_data_files
from core.runtimes import open_session
from export.onnx_export import ExportConfig, export_onnx
from export.variants import PrecisionConfig, PrecisionOutput, build_and_score
from flows.pipeline import _deployables
from recipes import build_recipe
from serving import client, repository
from serving.deploy import deploy
from serving.repository import ServingConfig
from tests.conftest import TINY_GPT

pytestmark = pytest.mark.integration

SERVING = ServingConfig(max_batch_size=8)


@pytest.fixture(scope="module")
def served(triton_server, tmp_path_factory):
    """A tiny random GPT exported with its weights forced into external data, with its dynamic INT8 variant,
    deployed and loaded; (recipe, reports by name, deploy output)."""
    recipe, folder = build_recipe("stdlib-gpt", TINY_GPT), tmp_path_factory.mktemp("external")
    torch.manual_seed(0)
    config = ExportConfig(external_data_threshold_bytes=0, verify_batch_sizes=(1,), verify_samples=4)
    onnx_path = export_onnx(recipe, recipe.build_model(), folder, config).output.onnx
    precision = PrecisionConfig(
        variants=("int8-dynamic",), min_speedup=0, accuracy_budget=1, score_samples=64, speed_repeats=3
    )
    reports = build_and_score(recipe, onnx_path, folder / "precision", precision)
    output = PrecisionOutput(
        variants=tuple(reports),
        selected=next(r.name for r in reports if r.serves_alias),
        policy=precision.policy,
        primary_metric=recipe.primary_metric,
    )
    deployed = deploy(
        triton_server.repository,
        "gpt",
        _deployables(output),
        output.selected,
        SERVING,
        {"recipe": recipe.name},
        triton_server.endpoint(),
    ).output
    return recipe, {r.name: r for r in reports}, deployed


def _ready_versions(server, model: str) -> list[str]:
    states = client.model_states(server.http_url)
    return sorted(e["version"] for e in states if e["name"] == model and e.get("state") == "READY")


@pytest.mark.parametrize("variant", ["fp32", "int8-dynamic"])
def test_a_model_with_external_data_loads_and_answers_as_in_process(triton_server, served, variant):
    recipe, reports, deployed = served
    report, version = reports[variant], Path(deployed.variants[variant].path)
    assert report.files and deployed.variants[variant].ready_version == str(deployed.variants[variant].version)
    data_names = [Path(f).name for f in report.files]  # e.g. model.onnx.data: the name the graph records
    assert [p.name for p in onnx_data_files(version / "model.onnx")] == data_names
    assert set(data_names) <= set(repository.verify_version(version))  # in the manifest, checksummed
    batch = next(iter(recipe.eval_batches(8, max_samples=8))).inputs
    expected = open_session(report.path).run(None, batch)[0]
    for protocol, url in (("http", triton_server.http_url), ("grpc", triton_server.grpc_url)):
        got = client.infer(url, f"gpt-{variant}", batch, protocol)["logits"]
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5, err_msg=f"{variant} over {protocol}")


def test_a_new_version_with_a_corrupted_data_file_is_refused_and_the_old_one_keeps_serving(triton_server, served):
    recipe, reports, deployed = served
    model, fp32 = "gpt-fp32", reports["fp32"]
    before = _ready_versions(triton_server, model)
    assert before == [str(deployed.variants["fp32"].version)]
    # a genuinely new version (another config), then one byte of its weights changed after it was written
    changed = dataclasses.replace(SERVING, max_queue_delay_microseconds=100, runtime_settings=fp32.settings)
    bad = repository.write_version(triton_server.repository, model, fp32.path, changed)
    data = bad.path / Path(fp32.files[0]).name
    weights = bytearray(data.read_bytes())
    weights[len(weights) // 2] ^= 0xFF
    data.write_bytes(bytes(weights))

    with pytest.raises(ServerError, match="failed to load") as caught:
        client.load_model(triton_server.http_url, model)
    assert data.name in str(caught.value) and "publish a fresh version" in str(caught.value)
    assert _ready_versions(triton_server, model) == before
    batch = next(iter(recipe.eval_batches(4, max_samples=4))).inputs
    expected = open_session(fp32.path).run(None, batch)[0]
    for protocol, url in (("http", triton_server.http_url), ("grpc", triton_server.grpc_url)):
        np.testing.assert_allclose(client.infer(url, model, batch, protocol)["logits"], expected, rtol=0, atol=1e-5)
