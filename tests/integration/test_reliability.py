"""Reliability and security promises, each against a real, locked-down Triton (see docs/reliability.md)."""

import dataclasses
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from core.errors import InferenceError, ServerError
from export.onnx_export import ExportConfig, export_onnx
from recipes import build_recipe
from serving import client, repository, triton
from serving.repository import ServingConfig
from tests.conftest import TINY_GPT

pytestmark = pytest.mark.integration

KEY = "test-admin-key"
MODEL = "gpt"
SERVING = ServingConfig(max_batch_size=4, value_ranges={"tokens": (0, 255)}, max_dims={"tokens": [32]})
GOOD = {"tokens": np.arange(8, dtype=np.int64)[None]}
_delays = iter(range(501, 10_000))


def _new_config() -> ServingConfig:
    """A config unlike every earlier one, so the writer makes a new version instead of reusing the newest."""
    return dataclasses.replace(SERVING, max_queue_delay_microseconds=next(_delays))


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory) -> str:
    recipe = build_recipe("stdlib-gpt", TINY_GPT)
    torch.manual_seed(0)
    return export_onnx(recipe, recipe.build_model(), tmp_path_factory.mktemp("onnx"), ExportConfig()).output.onnx


@pytest.fixture(scope="module")
def locked(tmp_path_factory, onnx_file):
    """Triton with the admin key, serving version 1 of the tiny GPT."""
    root = tmp_path_factory.mktemp("locked")
    server = triton.start(root / "repo", root / "work", admin_key=KEY)
    try:
        repository.write_version(server.repository, MODEL, onnx_file, SERVING)
        client.load_model(server.http_url, MODEL, admin_key=KEY)
        yield server
    finally:
        triton.stop(server.pid)


def _url(server, protocol: str) -> str:
    return server.http_url if protocol == "http" else server.grpc_url


def _ready_versions(server) -> list[str]:
    return sorted(
        e["version"]
        for e in client.model_states(server.http_url, KEY)
        if e["name"] == MODEL and e.get("state") == "READY"
    )


# 1. Bad requests are refused cleanly, naming the tensor, and the server stays healthy --------------------------
@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize(
    "bad, expected",
    [
        ({}, "tokens"),  # missing input
        ({"tokenz": np.zeros((1, 8), np.int64)}, "tokenz"),  # misnamed input
        ({"tokens": np.zeros((1, 8), np.int64), "extra": np.zeros((1, 2), np.float32)}, "extra"),  # unexpected input
        ({"tokens": np.zeros((0, 8), np.int64)}, "tokens"),  # empty batch
        ({"tokens": np.zeros((5, 8), np.int64)}, "batch"),  # batch over max_batch_size=4
        ({"tokens": np.zeros((1, 8), np.float32)}, "FP32"),  # wrong dtype
        ({"tokens": np.full((1, 8), 300, np.int64)}, "expected values in [0, 255]"),  # id outside the vocabulary
        ({"tokens": np.zeros((1, 40), np.int64)}, "expected at most [32]"),  # context over the maximum
    ],
)
def test_bad_request_is_refused_and_the_next_good_one_succeeds(locked, protocol, bad, expected):
    with pytest.raises(InferenceError) as caught:
        client.infer(_url(locked, protocol), MODEL, bad, protocol)
    assert expected in str(caught.value)
    # the client's fault, whether Triton or our model refused it (tests/integration/test_bad_requests.py has them all)
    assert caught.value.__cause__.status() == {"http": "400", "grpc": "StatusCode.INVALID_ARGUMENT"}[protocol]
    assert client.infer(_url(locked, protocol), MODEL, GOOD, protocol)["logits"].shape == (1, 256)


# 2. Oversized payloads are refused, and repeating them does not make the server grow ----------------------------
def test_oversized_payloads_are_refused_and_memory_stays_bounded(locked):
    """The bundled Triton (2.51) has no request-size limit, so a payload is buffered before our model refuses it:
    memory rises by a few payloads while the allocator warms up, then stays flat. 16 more refused requests
    (512 MB in all) must add less than four payloads' worth (a leak would add all of it)."""
    huge = {"tokens": np.zeros((1, 4_000_000), np.int64)}  # 32 MB
    server = psutil.Process(locked.pid)

    def rss_mb() -> float:
        return sum(p.memory_info().rss for p in [server, *server.children(recursive=True)]) / 1e6

    def refuse_rounds(count: int) -> None:
        for _ in range(count):
            for protocol in ("http", "grpc"):
                with pytest.raises(InferenceError, match="expected at most"):
                    client.infer(_url(locked, protocol), MODEL, huge, protocol)

    refuse_rounds(12)
    warmed = rss_mb()
    refuse_rounds(8)
    assert rss_mb() - warmed < 128, "memory grew with every oversized request"
    assert client.infer(locked.grpc_url, MODEL, GOOD, "grpc")["logits"].shape == (1, 256)


# 7. Rollout without downtime; a version that fails to load leaves the old one serving ---------------------------
def test_requests_keep_succeeding_while_a_new_version_loads(locked, onnx_file):
    failures, answered, stop = [], [], threading.Event()

    def steady_load():
        deadline = time.monotonic() + 60  # bounded, whatever happens
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                client.infer(locked.grpc_url, MODEL, GOOD, "grpc")
                answered.append(1)
            except InferenceError as error:
                failures.append(str(error))

    sender = threading.Thread(target=steady_load)
    sender.start()
    try:
        time.sleep(0.5)
        version = repository.write_version(locked.repository, MODEL, onnx_file, _new_config()).version
        client.load_model(locked.http_url, MODEL, admin_key=KEY)
        time.sleep(0.5)
    finally:
        stop.set()
        sender.join()
    assert not failures and len(answered) > 20
    assert _ready_versions(locked) == [str(version)]


def test_a_corrupt_version_fails_to_load_and_the_previous_one_keeps_serving(locked, onnx_file):
    serving_before = _ready_versions(locked)
    bad = repository.write_version(locked.repository, MODEL, onnx_file, _new_config())
    (bad.path / "model.onnx").write_bytes(b"not an onnx file")  # reaches Triton despite the checksum
    with pytest.raises(ServerError, match="failed to load"):
        client.load_model(locked.http_url, MODEL, admin_key=KEY)
    assert _ready_versions(locked) == serving_before
    assert client.infer(locked.http_url, MODEL, GOOD)["logits"].shape == (1, 256)
    with pytest.raises(Exception, match="sha256"):
        repository.verify_version(bad.path)  # and the deploy step would have refused it before loading
    import shutil

    shutil.rmtree(bad.path)  # leave the repository as the other tests expect it


def test_a_deploy_whose_load_fails_is_rolled_back_so_a_restart_loads_the_old_version_too(locked, onnx_file):
    """Triton keeps the old version when the new one fails to load; the repository must say so too, or the next
    restart would load the broken version."""
    from serving.deploy import Deployable, deploy
    from serving.rollout import RolloutError

    endpoint, fp32 = locked.endpoint(), [Deployable("fp32", onnx_file)]
    deploy(locked.repository, "rollback", fp32, "fp32", SERVING, {}, endpoint)  # v1, served
    broken = dataclasses.replace(_new_config(), instance_kind="gpu")  # no GPU here: the load fails
    with pytest.raises(RolloutError, match="Rolled back: the repository serves rollback-fp32 v1 again") as caught:
        deploy(locked.repository, "rollback", fp32, "fp32", broken, {}, endpoint)
    assert "Not done" not in str(caught.value)
    config = repository.read_config(locked.repository, "rollback-fp32")
    assert list(config.version_policy.specific.versions) == [1]  # the v2 folder stays for the post-mortem
    assert repository.versions(Path(locked.repository) / "rollback-fp32") == [1, 2]
    states = {
        e["version"]: e.get("state") for e in client.model_states(locked.http_url, KEY) if e["name"] == "rollback-fp32"
    }
    assert states["1"] == "READY" and states.get("2") != "READY"
    assert client.infer(locked.http_url, "rollback", GOOD)["logits"].shape == (1, 256)


# 5. A deployment killed midway leaves no numbered version; the next write cleans up -----------------------------
KILLED_WRITER = """
import shutil, sys, time
from serving import repository
real_copy = shutil.copyfile
def slow_copy(source, target):
    real_copy(source, target)
    print("copied", flush=True)
    time.sleep(60)
shutil.copyfile = slow_copy
repository.write_version(sys.argv[1], "gpt", sys.argv[2], repository.ServingConfig(max_batch_size=4))
"""


def test_a_deployment_killed_midway_leaves_nothing_half_written(locked, onnx_file):
    folder = Path(locked.repository) / MODEL
    before, serving_before = repository.versions(folder), _ready_versions(locked)
    writer = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, locked.repository, onnx_file], stdout=subprocess.PIPE, text=True
    )
    try:
        assert writer.stdout.readline().strip() == "copied"
        writer.send_signal(signal.SIGKILL)
    finally:
        writer.wait(timeout=30)
    assert list(folder.glob(".staging-*")), "the kill happened inside the staging folder"
    assert repository.versions(folder) == before
    client.load_model(locked.http_url, MODEL, admin_key=KEY)  # what a reload now sees is still the old version
    assert _ready_versions(locked) == serving_before
    assert repository.write_version(locked.repository, MODEL, onnx_file, _new_config()).version == before[-1] + 1
    assert not list(folder.glob(".staging-*"))


# 9. Faults under load: deadlines, full queues ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def slow_onnx(tmp_path_factory) -> str:
    """A model wide enough that one request takes milliseconds."""
    recipe = build_recipe("stdlib-gpt", {**TINY_GPT, "n_layer": 4, "n_embd": 256, "n_head": 4, "block_size": 128})
    folder = tmp_path_factory.mktemp("slow")
    return export_onnx(
        recipe, recipe.build_model(), folder, ExportConfig(verify_batch_sizes=(1,), verify_samples=1)
    ).output.onnx


def _serve_slow(server, onnx_path: str, name: str, config: ServingConfig) -> str:
    repository.write_version(server.repository, name, onnx_path, config)
    client.load_model(server.http_url, name, admin_key=KEY)
    return name


@pytest.fixture(scope="module")
def slow(locked, slow_onnx) -> str:
    """The slow model for deadlines: requests a client gave up on still run, so it has a model of its own."""
    return _serve_slow(locked, slow_onnx, "slow", ServingConfig(max_batch_size=1))


@pytest.fixture(scope="module")
def one_at_a_time(locked, slow_onnx) -> str:
    """The slow model run one request at a time, with room for one waiting request."""
    config = ServingConfig(max_batch_size=1, max_queue_size=1, max_queue_delay_microseconds=0)
    return _serve_slow(locked, slow_onnx, "one-at-a-time", config)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_a_client_deadline_gives_a_timeout_error(locked, slow, protocol):
    tokens = {"tokens": np.random.default_rng(0).integers(0, 256, (1, 128), dtype=np.int64)}
    with pytest.raises(InferenceError) as caught:
        client.infer(_url(locked, protocol), slow, tokens, protocol, timeout_s=1e-3)  # one request takes longer
    assert re.search("deadline exceeded|timed out", str(caught.value), re.IGNORECASE), str(caught.value)
    # the server is unharmed: a request with a sane deadline succeeds (the cancelled one may still be finishing)
    assert client.infer(_url(locked, protocol), MODEL, GOOD, protocol, timeout_s=10)["logits"].shape == (1, 256)


def test_a_full_queue_rejects_requests_fast(locked, one_at_a_time):
    tokens = {"tokens": np.random.default_rng(1).integers(0, 256, (1, 128), dtype=np.int64)}
    grpc = grpcclient.InferenceServerClient(locked.grpc_url)
    results, done = [], threading.Semaphore(0)
    request = grpcclient.InferInput("tokens", [1, 128], "INT64")
    request.set_data_from_numpy(tokens["tokens"])

    def callback(result, error):
        results.append((time.perf_counter(), error))
        done.release()

    start = time.perf_counter()
    for _ in range(24):
        grpc.async_infer(one_at_a_time, [request], callback)
    for _ in range(24):
        assert done.acquire(timeout=60)
    grpc.close()
    rejected = [(t, e) for t, e in results if e is not None]
    assert rejected and all("queue" in e.message().lower() for _, e in rejected)
    assert len(rejected) < 24  # the ones that fit were served
    assert min(t for t, _ in rejected) - start < 1.0  # refused at once, not after waiting their turn


# 10. Locked down by default: the repository API needs the key, inference does not --------------------------------
def test_unload_without_the_key_fails_while_inference_works(locked):
    for control in (
        httpclient.InferenceServerClient(locked.http_url),
        grpcclient.InferenceServerClient(locked.grpc_url),
    ):
        with pytest.raises(InferenceServerException, match="restricted"):
            control.unload_model(MODEL)
        control.close()
    assert _ready_versions(locked)
    for protocol in ("http", "grpc"):
        assert client.infer(_url(locked, protocol), MODEL, GOOD, protocol)["logits"].shape == (1, 256)
    assert locked.host == "127.0.0.1"
    listening = {
        c.laddr.ip.removeprefix("::ffff:")
        for c in psutil.Process(locked.pid).net_connections()
        if c.status == psutil.CONN_LISTEN
    }
    assert listening == {"127.0.0.1"}


# 11. SIGTERM leaves no process, port or shared-memory segment behind -----------------------------------------------
def test_sigterm_leaves_nothing_behind(tmp_path, onnx_file):
    server = triton.start(tmp_path / "repo", tmp_path / "work", admin_key=KEY)
    repository.write_version(server.repository, MODEL, onnx_file, SERVING)
    client.load_model(server.http_url, MODEL, admin_key=KEY)
    assert client.infer(server.grpc_url, MODEL, GOOD, "grpc")["logits"].shape == (1, 256)
    group = [server.pid, *(p.pid for p in psutil.Process(server.pid).children(recursive=True))]
    assert len(group) >= 2  # the server and its Python-backend stub
    prefix = f"tes{server.http_port}_"
    assert [name for name in os.listdir("/dev/shm") if name.startswith(prefix)]
    os.kill(server.pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while any(triton.pid_alive(pid) for pid in group) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(triton.pid_alive(pid) for pid in group)
    assert all(triton.port_is_free(port) for port in (server.http_port, server.grpc_port, server.metrics_port))
    assert not [name for name in os.listdir("/dev/shm") if name.startswith(prefix)]
