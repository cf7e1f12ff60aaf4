"""A short soak under steady load (every answer checked), and a server killed under load."""

import threading
import time

import pytest
import torch

from bench.soak import soak
from core.errors import InferenceError
from core.runtimes import open_session
from export.onnx_export import ExportConfig, export_onnx
from recipes import build_recipe
from serving import client, repository, triton
from serving.repository import ServingConfig
from tests.conftest import TINY_GPT

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A tiny GPT on its own Triton, with held-out inputs and their expected outputs from ONNX Runtime."""
    root = tmp_path_factory.mktemp("soak")
    recipe = build_recipe("stdlib-gpt", TINY_GPT)
    torch.manual_seed(0)
    onnx_path = export_onnx(recipe, recipe.build_model(), root, ExportConfig()).output.onnx
    server = triton.start(root / "repo", root / "work")
    try:
        repository.write_version(server.repository, "gpt", onnx_path, ServingConfig(max_batch_size=8))
        client.load_model(server.http_url, "gpt")
        session = open_session(onnx_path)
        cases = [(b.inputs, session.run(None, b.inputs)[0]) for b in recipe.eval_batches(1, max_samples=16)]
        yield server, cases, onnx_path
    finally:
        triton.stop(server.pid)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_short_soak_loses_nothing_and_gets_nothing_wrong(served, protocol):
    server, cases, _ = served
    url = server.grpc_url if protocol == "grpc" else server.http_url
    report = soak(url, protocol, "gpt", cases, seconds=8, concurrency=4, server_pid=server.pid)
    assert report.requests > 100
    assert report.errors == 0 and report.wrong == 0, report.first_errors
    half = len(report.rss_mb_samples) // 2
    assert max(report.rss_mb_samples[half:]) - max(report.rss_mb_samples[:half]) < 50  # no steady growth


def test_killing_the_server_under_load_gives_clear_errors_not_a_hang(tmp_path, served):
    _, cases, onnx_path = served
    server = triton.start(tmp_path / "repo", tmp_path / "work")
    repository.write_version(server.repository, "gpt", onnx_path, ServingConfig(max_batch_size=8))
    client.load_model(server.http_url, "gpt")
    outcomes, stop = [], threading.Event()

    def load() -> None:
        deadline = time.monotonic() + 30
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                client.infer(server.grpc_url, "gpt", cases[0][0], "grpc", timeout_s=5)
                outcomes.append((time.monotonic(), "ok"))
            except InferenceError as error:
                outcomes.append((time.monotonic(), str(error)))

    sender = threading.Thread(target=load)
    sender.start()
    time.sleep(1.0)
    killed_at = time.monotonic()
    triton.stop(server.pid, timeout_s=0.1)  # SIGTERM, then SIGKILL almost at once
    time.sleep(2.0)
    stop.set()
    sender.join(timeout=20)
    assert not sender.is_alive(), "the client hung after the server died"
    after = [message for at, message in outcomes if at > killed_at + 0.5]
    assert after and all(message != "ok" for message in after)
    assert all("over grpc" in message for message in after)  # the error says where and how
