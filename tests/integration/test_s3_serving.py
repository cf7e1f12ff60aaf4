"""The pipeline with its repository on S3: `repository=s3://models/pipeline` (endpoint from AWS_ENDPOINT_URL, as
boto3 reads it), a real Triton started by `triton.start` on `s3://127.0.0.1:PORT/models/pipeline`, the served check
over HTTP and gRPC, and the benchmark reading what it needs from S3."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.errors import ConfigError
from flows.params import parse_params
from flows.pipeline import run_pipeline
from serving import client, s3_repository, triton
from serving.deploy import Deployable, deploy
from serving.repository import ServingConfig
from tests.conftest import TINY_DIGITS

pytestmark = pytest.mark.integration

RUN = {
    "recipe": "digits-cnn",
    "digits_cnn": TINY_DIGITS,
    "training": {"steps": 20, "learning_rate": 1e-2, "eval_every": 1000, "eval_samples": 64},
    "precision": {
        "variants": ["fp32", "int8-dynamic"],
        "calibration_samples": 16,
        "score_samples": 64,
        "speed_repeats": 3,
        "accuracy_budget": 1.0,
        "min_speedup": 0.0,
    },
    "benchmark": {"protocols": ["grpc"], "concurrencies": [2], "samples": 8},
    "repository": "s3://models/pipeline",
}


@pytest.fixture(scope="module")
def served(s3, tmp_path_factory):
    """A Triton reading the S3 repository, and AWS_ENDPOINT_URL pointing boto3 at the same store."""
    location = s3.location("pipeline")
    s3_repository.ensure_repository(location)
    server = triton.start(
        location.triton_url(), tmp_path_factory.mktemp("triton"), env=s3_repository.server_environment(location)
    )
    try:
        with pytest.MonkeyPatch.context() as env:
            env.setenv("AWS_ENDPOINT_URL", s3.endpoint)
            yield server, location
    finally:
        triton.stop(server.pid)


@pytest.fixture(scope="module")
def runs(served, tmp_path_factory):
    """The same tiny run twice: the second reuses every artifact, so the deploy publishes nothing new."""
    server, _ = served
    params = parse_params(
        RUN
        | {
            "runs_dir": str(tmp_path_factory.mktemp("runs")),
            "serving": {"triton_url": server.http_url, "triton_grpc_url": server.grpc_url},
        }
    )
    return run_pipeline(params), run_pipeline(params)


def test_the_pipeline_publishes_to_s3_and_checks_the_served_model_over_http_and_grpc(served, runs):
    server, location = served
    first, _ = runs
    deployed = first.deploy.output
    assert deployed.loaded and deployed.repository == location.triton_url()
    assert deployed.path == "s3://models/pipeline/digits-cnn/1" and deployed.ready_version == "1"
    assert {name: v.path for name, v in deployed.variants.items()} == {
        "fp32": "s3://models/pipeline/digits-cnn-fp32/1",
        "int8-dynamic": "s3://models/pipeline/digits-cnn-int8-dynamic/1",
    }
    assert sorted(s3_repository.list_models(location)) == ["digits-cnn", "digits-cnn-fp32", "digits-cnn-int8-dynamic"]
    check = first.served_check.output
    assert set(check.protocols) == {"http", "grpc"}
    assert all(comparison.max_abs_diff_vs_in_process <= 1e-5 for comparison in check.protocols.values())
    assert all(diff <= 1e-5 for diffs in check.variants.values() for diff in diffs.values())
    assert first.benchmark.status.value == "ok" and first.benchmark.output.points[0].errors == 0
    states = {(e["name"], e["version"]): e["state"] for e in client.model_states(server.http_url)}
    assert states[("digits-cnn", "1")] == "READY" and states[("digits-cnn-fp32", "1")] == "READY"


def test_an_identical_run_publishes_nothing_new(served, runs):
    _, location = served
    _, second = runs
    deployed = second.deploy.output
    assert deployed.reused and all(v.reused for v in deployed.variants.values())
    assert s3_repository.list_versions(location, "digits-cnn-fp32") == [1]
    assert s3_repository.list_versions(location, "digits-cnn") == [1]
    assert second.served_check.status.value == "ok"


def test_a_deploy_into_another_repository_than_the_server_reads_is_refused_before_writing(served, runs, tmp_path):
    server, _ = served
    first, _ = runs
    fp32 = first.precision.output.variant("fp32")
    with pytest.raises(ConfigError, match=r"serves the repository s3://127\.0\.0\.1:\d+/models/pipeline, but"):
        deploy(
            tmp_path / "local",
            "digits-cnn",
            [Deployable("fp32", fp32.path)],
            "fp32",
            ServingConfig(max_batch_size=16),
            {},
            server.endpoint(),
        )
    assert not Path(tmp_path / "local").exists()
