"""Serving beyond one process, without servers: GPU instance groups in the generated config, where a deploy writes
(folder or S3), the words a stopped rollout says, and the probe requests a rollout checks each replica with."""

from __future__ import annotations

import numpy as np
import pytest
from tritonclient.grpc import model_config_pb2 as mc

from flows.params import parse_params
from serving import repository, rollout
from serving.repository import ServingConfig, build_config, serving_config_of
from serving.rollout import NewVersion
from serving.targets import LocalTarget, S3Target, open_target
from serving.triton import Endpoint
from tests.conftest import TINY_DIGITS


@pytest.fixture(scope="module")
def digits_onnx(tmp_path_factory):
    from export.onnx_export import ExportConfig, export_onnx
    from recipes import build_recipe

    recipe = build_recipe("digits-cnn", TINY_DIGITS)
    return export_onnx(recipe, recipe.build_model(), tmp_path_factory.mktemp("onnx"), ExportConfig()).output.onnx


@pytest.mark.parametrize(
    "kind, expected",
    [
        ("cpu", mc.ModelInstanceGroup.KIND_CPU),
        ("gpu", mc.ModelInstanceGroup.KIND_GPU),
        ("auto", mc.ModelInstanceGroup.KIND_AUTO),
    ],
)
def test_instance_kind_writes_the_instance_group_and_reads_back(digits_onnx, kind, expected):
    serving = ServingConfig(max_batch_size=8, instance_count=2, instance_kind=kind, precision="fp16")
    config = build_config("digits", digits_onnx, serving)
    (group,) = config.instance_group
    assert (group.kind, group.count, list(group.gpus)) == (expected, 2, [])  # no `gpus`: every GPU the server has
    assert config.parameters["precision"].string_value == "fp16"  # what the backend's TensorRT provider reads
    back = serving_config_of(config)
    assert (back.instance_kind, back.precision, back.instance_count) == (kind, "fp16", 2)


def test_the_default_stays_a_cpu_instance_without_a_precision_parameter(digits_onnx):
    config = build_config("digits", digits_onnx, ServingConfig())
    assert config.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU and "precision" not in config.parameters


def test_an_unknown_instance_kind_is_refused_naming_the_choices(digits_onnx):
    with pytest.raises(repository.RepositoryError, match=r"instance_kind 'tpu' is not one of \['auto', 'cpu', 'gpu'\]"):
        build_config("digits", digits_onnx, ServingConfig(instance_kind="tpu"))  # type: ignore[arg-type]


def test_the_flow_parameter_reaches_the_serving_config_and_bad_values_are_refused():
    params = parse_params({"recipe": "digits-cnn", "digits_cnn": TINY_DIGITS, "serving": {"instance_kind": "gpu"}})
    assert params.serving_config(params.build_recipe()).instance_kind == "gpu"
    with pytest.raises(Exception, match="serving.instance_kind"):
        parse_params({"serving": {"instance_kind": "tpu"}})


def test_a_repository_is_a_folder_or_an_s3_url(tes_home, monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    local = open_target("model_repository")
    assert isinstance(local, LocalTarget) and local.url == str(tes_home / "model_repository")
    assert local.same_as(str(tes_home / "model_repository")) and not local.same_as("s3://models/repo")
    remote = open_target("s3://127.0.0.1:9000/models/repo")
    assert isinstance(remote, S3Target) and remote.url == "s3://127.0.0.1:9000/models/repo"
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    assert remote.same_as("s3://models/repo")  # the same store, its endpoint from boto3's variable
    assert not remote.same_as("s3://models/other") and not remote.same_as(str(tes_home))


def test_an_endpoint_without_replicas_is_its_only_replica():
    alone = Endpoint("a:1", "a:2")
    assert alone.every() == (alone,)
    both = Endpoint("a:1", replicas=(alone, Endpoint("b:1")))
    assert [replica.http for replica in both.every()] == ["a:1", "b:1"]


def test_probe_values_stay_within_each_input_s_range():
    rng = np.random.default_rng(0)
    tokens = rollout._values("tokens", np.dtype("int64"), [2, 8], (0, 255), rng)
    assert tokens.dtype == np.int64 and tokens.min() >= 0 and tokens.max() <= 255
    image = rollout._values("image", np.dtype("float32"), [2, 1, 8, 8], (0.0, 16.0), rng)
    assert image.min() >= 0.0 and image.max() <= 16.0
    assert rollout._values("attention_mask", np.dtype("int64"), [1, 4], None, rng).tolist() == [[1, 1, 1, 1]]
    with pytest.raises(ValueError, match="input 'ids' .int64. has no value range"):
        rollout._values("ids", np.dtype("int64"), [1, 4], None, rng)


def test_a_probe_answers_like_the_model_file_and_a_wrong_answer_is_named(digits_onnx):
    serving = ServingConfig(max_batch_size=8, value_ranges={"image": (0.0, 16.0)})
    found = rollout.probe(digits_onnx, "onnxruntime", "", {}, digits_onnx, serving)
    assert found.inputs["image"].shape == (2, 1, 8, 8) and found.expected["logits"].shape == (2, 10)
    new = NewVersion("digits-fp32", 3, found)
    assert rollout._difference(new, {"logits": found.expected["logits"] + 1e-6}, "a:1", "http") < 1e-5
    with pytest.raises(rollout.ServerError, match=r"'digits-fp32' version 3 at a:1 over grpc: output 'logits' differs"):
        rollout._difference(new, {"logits": found.expected["logits"] + 100}, "a:1", "grpc")
    with pytest.raises(rollout.ServerError, match="non-finite"):
        rollout._difference(new, {"logits": found.expected["logits"] * np.nan}, "a:1", "grpc")


def test_a_stopped_rollout_says_where_every_replica_stands():
    replicas = (Endpoint("a:1"), Endpoint("b:1"), Endpoint("c:1"))
    variants = [NewVersion("digits-fp32", 4)]
    message = rollout._stopped("digits", 2, replicas, variants, RuntimeError("refused"), "")
    assert message.startswith("rollout of 'digits' stopped at replica 2 of 3 (b:1): refused\n")
    assert "Replicas 1 (a:1) serve the new variants (digits-fp32 v4); replica 2 and those after it" in message
    assert "the alias 'digits' was not moved" in message
    first = rollout._stopped("digits", 1, replicas, variants, RuntimeError("no GPU"), "")
    assert "No replica serves digits-fp32 v4" in first
    alias = rollout._stopped("digits", 3, replicas, variants, RuntimeError("x"), "alias")
    assert "while moving the alias" in alias and "moved on replicas before 3 only" in alias
