"""Rolling deploys over two real Triton replicas that read one S3 repository (moto): zero failed requests under
load while the new version rolls replica by replica, every answer checked; a replica that fails to load stops the
rollout and the others keep serving; a replica killed mid-rollout is named; a failed rollout is rolled back (the
repository names the old version again and the replicas that moved go back)."""

from __future__ import annotations

import collections
import time
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from bench import loadgen
from core.errors import InferenceError
from core.runtimes import open_session
from export.onnx_export import ExportConfig, export_onnx
from recipes import build_recipe
from serving import client, rollout, s3_repository, triton
from serving.deploy import Deployable, deploy
from serving.repository import ServingConfig
from serving.rollout import RolloutError
from tests.conftest import TINY_DIGITS

pytestmark = pytest.mark.integration

SERVING = ServingConfig(max_batch_size=16, value_ranges={"image": (0.0, 16.0)})


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two digits models with different weights (`a`, `b`), held-out inputs, and each model's answer to each."""
    recipe, folder = build_recipe("digits-cnn", TINY_DIGITS), tmp_path_factory.mktemp("models")
    files = {}
    for seed, name in ((1, "a"), (2, "b")):
        torch.manual_seed(seed)
        files[name] = export_onnx(recipe, recipe.build_model(), folder / name, ExportConfig()).output.onnx
    inputs = [batch.inputs for batch in recipe.eval_batches(1, 16)]
    answers = {name: [open_session(path).run(None, case)[0] for case in inputs] for name, path in files.items()}
    assert not np.allclose(answers["a"][0], answers["b"][0], atol=1e-3)  # a switch from a to b is observable
    return SimpleNamespace(files=files, inputs=inputs, answers=answers)


@pytest.fixture(scope="module")
def replicas(s3, tmp_path_factory, models):
    """Two Triton replicas over `s3://.../models/rollout`, serving model `a` as `digits` (alias of digits-fp32)."""
    location = s3.location("rollout")
    s3_repository.ensure_repository(location)
    env, servers = s3_repository.server_environment(location), []
    try:
        for _ in range(2):
            servers.append(triton.start(location.triton_url(), tmp_path_factory.mktemp("triton"), env=env))
        first = servers[0].endpoint()
        endpoint = replace(first, replicas=(first, servers[1].endpoint()))
        _deploy(location, models.files["a"], endpoint)
        yield SimpleNamespace(location=location, servers=servers, endpoint=endpoint)
    finally:
        for server in servers:
            triton.stop(server.pid)


def _deploy(location, onnx_path, endpoint, serving: ServingConfig = SERVING):
    return deploy(
        location.triton_url(), "digits", [Deployable("fp32", str(onnx_path))], "fp32", serving, {}, endpoint
    ).output


def _answers_like(server, models, name: str) -> None:
    for protocol, url in (("http", server.http_url), ("grpc", server.grpc_url)):
        served = client.infer(url, "digits", models.inputs[3], protocol)["logits"]
        np.testing.assert_allclose(served, models.answers[name][3], rtol=0, atol=1e-4)


def _ready(server, model: str) -> list[str]:
    states = client.model_states(server.http_url)
    return sorted(entry["version"] for entry in states if entry["name"] == model and entry.get("state") == "READY")


def _served_count(server) -> int:
    stats = client.connect(server.http_url).get_inference_statistics("digits")
    return sum(int(entry["inference_stats"]["success"]["count"]) for entry in stats["model_stats"])


def test_a_rolling_deploy_under_load_fails_no_request_and_every_answer_is_one_of_the_two_models(replicas, models):
    seen = collections.Counter()

    def check(case: int, outputs: dict) -> None:
        for name in ("a", "b"):
            if np.allclose(outputs["logits"], models.answers[name][case], rtol=0, atol=1e-4):
                seen[name] += 1
                return
        raise InferenceError(f"answer to input {case} is neither model's")

    urls = [server.grpc_url for server in replicas.servers]
    before_counts = [_served_count(server) for server in replicas.servers]
    with loadgen.running_load(urls, "grpc", "digits", models.inputs, rate=100, check=check) as load:
        time.sleep(1.0)
        steady, steady_errors, _ = load.drain()
        started = time.monotonic()
        deployed = _deploy(replicas.location, models.files["b"], replicas.endpoint)
        seconds = time.monotonic() - started
        time.sleep(0.5)
        during, during_errors, _ = load.drain()
    assert steady_errors == during_errors == 0, load.first_error
    assert len(steady) >= 50 and len(during) >= 50 * seconds, (len(steady), len(during), seconds)
    assert seen["a"] > 0 and seen["b"] > 0  # both models answered, and nothing else did
    assert all(_served_count(s) > before for s, before in zip(replicas.servers, before_counts))  # both took load

    assert [(r.replica, r.http, r.versions) for r in deployed.replicas] == [
        (n, s.http_url, {"digits-fp32": "2", "digits": "1"}) for n, s in enumerate(replicas.servers, 1)
    ]  # the alias kept its target, so its version stays; it forwards to the new fp32 everywhere
    assert all("2 answers matched their model files" in r.checked for r in deployed.replicas)
    assert deployed.replicas[0].seconds < deployed.replicas[1].seconds <= seconds
    for server in replicas.servers:
        assert _ready(server, "digits-fp32") == ["2"]
        _answers_like(server, models, "b")


def test_the_load_generator_spreads_requests_round_robin_over_the_replicas(replicas, models):
    before = [_served_count(server) for server in replicas.servers]
    settings = loadgen.LoadSettings(window_s=0.5, warmup_s=0.3, max_windows=4, stability=0.5)
    urls = [server.http_url for server in replicas.servers]
    point = loadgen.measure(urls, "http", "digits", models.inputs, concurrency=2, settings=settings)
    assert point.endpoints == 2 and point.errors == 0 and point.requests > 20
    served = [_served_count(server) - count for server, count in zip(replicas.servers, before)]
    assert min(served) >= 0.4 * sum(served), served  # round robin: about half each
    assert point.server_us["compute_infer"] > 0  # statistics summed over both


def test_a_replica_that_fails_to_load_stops_the_rollout_and_every_replica_keeps_serving(replicas, models):
    first, second = replicas.servers
    broken = replace(SERVING, instance_kind="gpu")  # no GPU here: Triton refuses the instances
    with pytest.raises(RolloutError) as caught:
        _deploy(replicas.location, models.files["a"], replicas.endpoint, broken)
    message = str(caught.value)
    assert message.startswith(f"rollout of 'digits' stopped at replica 1 of 2 ({first.http_url}): ")
    assert "failed to load model 'digits-fp32'" in message and "GPU" in message, message
    assert "No replica serves digits-fp32 v3; replica 1 and those after it still serve" in message
    assert "Rolled back: the repository serves digits-fp32 v2 again" in message and "Not done" not in message
    assert s3_repository.served_version(replicas.location, "digits-fp32") == 2  # a restarted replica loads v2
    for server in (first, second):
        assert _ready(server, "digits-fp32") == ["2"]  # the failing one kept its version; the other was not touched
        _answers_like(server, models, "b")


def test_instance_kind_auto_runs_on_the_cpu_of_servers_without_a_gpu(replicas, models):
    deployed = _deploy(replicas.location, models.files["a"], replicas.endpoint, replace(SERVING, instance_kind="auto"))
    assert [r.versions["digits-fp32"] for r in deployed.replicas] == ["4", "4"]
    for server in replicas.servers:
        config = client.connect(server.http_url).get_model_config("digits-fp32")
        assert [group["kind"] for group in config["instance_group"]] == ["KIND_CPU"]  # Triton's choice here
        assert config["parameters"]["precision"]["string_value"] == "fp32"  # for GPU instances' TensorRT
        _answers_like(server, models, "a")


def test_a_replica_killed_during_a_rollout_is_named_and_the_one_that_moved_serves_the_new_version(
    replicas, models, monkeypatch
):
    first, second = replicas.servers
    load_model = client.load_model

    def load_then_lose_the_second_replica(url: str, model: str, **kwargs) -> str:
        if url == first.http_url:
            triton.stop(second.pid)  # gone while the first replica takes the new version
        return load_model(url, model, **kwargs)

    monkeypatch.setattr(rollout.client, "load_model", load_then_lose_the_second_replica)
    with pytest.raises(RolloutError) as caught:
        _deploy(replicas.location, models.files["b"], replicas.endpoint)
    message = str(caught.value)
    assert message.startswith(f"rollout of 'digits' stopped at replica 2 of 2 ({second.http_url}): ")
    assert f"Triton at {second.http_url} is not answering" in message
    assert f"Replicas 1 ({first.http_url}) serve the new variants (digits-fp32 v5)" in message
    assert "`tes up` restarts a replica that is gone" in message
    # the deploy failed, so it changed nothing: the replica that moved went back, and the repository names v4
    assert "Rolled back: the repository serves digits-fp32 v4 again" in message
    assert f"Not done: {second.http_url} did not reload 'digits-fp32'" in message
    assert s3_repository.served_version(replicas.location, "digits-fp32") == 4
    assert _ready(first, "digits-fp32") == ["4"]
    _answers_like(first, models, "a")
