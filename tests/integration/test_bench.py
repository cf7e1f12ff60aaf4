"""The load generator's lean senders, and what a dead or frozen server does to a benchmark, against a real Triton."""

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from bench import loadgen, senders
from core.errors import InferenceError, ServerError, TesError
from serving import client, repository, triton
from serving.repository import ServingConfig
from tests.conftest import serve_tiny_digits

pytestmark = pytest.mark.integration
PROTOCOLS = ["grpc", "http"]


def url_of(server, protocol: str) -> str:
    return server.grpc_url if protocol == "grpc" else server.http_url


def freeze(pid: int) -> None:
    """SIGSTOP, then wait until every thread is stopped: the signal lands asynchronously, and a server thread
    still running on the other core could otherwise answer the next request."""
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        states = [
            (task / "stat").read_text().rsplit(")", 1)[1].split()[0] for task in Path(f"/proc/{pid}/task").iterdir()
        ]
        if all(state in ("T", "t") for state in states):
            return
        time.sleep(0.01)
    raise AssertionError(f"tritonserver {pid} did not stop within 5 s of SIGSTOP")


def resume(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGCONT)
    except ProcessLookupError:  # already stopped by the test
        pass


@pytest.fixture(scope="module")
def digits(triton_server, tmp_path_factory):
    """(onnx path, held-out inputs) of a tiny digits-cnn served as 'digits' by the shared Triton."""
    onnx_path, recipe = serve_tiny_digits(triton_server, tmp_path_factory.mktemp("d"))
    return onnx_path, [batch.inputs for batch in recipe.eval_batches(1, 8)]


@pytest.fixture
def private_server(tmp_path, digits):
    """A second Triton serving the same model, for the tests that stop or freeze it; always stopped after."""
    server = triton.start(tmp_path / "repo", tmp_path / "work")
    try:
        repository.write_version(server.repository, "digits", digits[0], ServingConfig(max_batch_size=16))
        client.load_model(server.http_url, "digits")
        yield server
    finally:
        resume(server.pid)  # a frozen server must be able to take its SIGTERM
        triton.stop(server.pid)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_senders_get_the_same_answers_as_tritonclient(triton_server, digits, protocol):
    _, inputs = digits
    url = url_of(triton_server, protocol)
    sender = senders.open_sender(protocol, url, "digits", inputs)
    try:
        for index, case in enumerate(inputs + inputs[:2]):  # past the end: requests cycle
            served = senders.decode_answer(protocol, sender.send(index))
            expected = client.infer(url, "digits", case, protocol)
            assert served.keys() == expected.keys()
            for name in expected:
                assert served[name].shape == expected[name].shape and served[name].dtype == expected[name].dtype
                np.testing.assert_array_equal(served[name], expected[name])
        assert 0 < senders.transport_floor_ms(sender, calls=20) < 1e4
    finally:
        sender.close()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_bad_request_gives_the_servers_message(triton_server, digits, protocol):
    _, inputs = digits
    wrong_dtype = [{name: array.astype(np.float64) for name, array in case.items()} for case in inputs[:1]]
    sender = senders.open_sender(protocol, url_of(triton_server, protocol), "digits", wrong_dtype)
    try:
        with pytest.raises(InferenceError, match=r"'digits'.*(FP64|dtype|data-type|datatype)"):
            sender.send(0)
    finally:
        sender.close()
    missing = senders.open_sender(protocol, url_of(triton_server, protocol), "no-such-model", inputs)
    try:
        with pytest.raises(InferenceError, match="no-such-model"):
            missing.send(0)
    finally:
        missing.close()


def test_inputs_and_urls_are_checked_before_anything_is_sent():
    with pytest.raises(ValueError, match="inputs"):
        senders.open_sender("grpc", "127.0.0.1:1", "m", [])
    with pytest.raises(ValueError, match="host:port"):
        senders.open_sender("http", "no-port-here", "m", [{"x": np.ones(1, np.float32)}])
    with pytest.raises(ValueError, match="protocol"):
        senders.open_sender("udp", "127.0.0.1:1", "m", [{"x": np.ones(1, np.float32)}])  # type: ignore[arg-type]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_stopped_server_gives_a_clear_error_quickly(private_server, digits, protocol):
    url = url_of(private_server, protocol)
    sender = senders.open_sender(protocol, url, "digits", digits[1], timeout_s=2.0)
    try:
        sender.send(0)  # connected and answering
        triton.stop(private_server.pid)
        started = time.monotonic()
        with pytest.raises(InferenceError, match=r"127\.0\.0\.1.*server up"):
            sender.send(1)
        assert time.monotonic() - started < 5
    finally:
        sender.close()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_frozen_server_gives_a_clear_error_after_the_timeout(private_server, digits, protocol):
    sender = senders.open_sender(protocol, url_of(private_server, protocol), "digits", digits[1], timeout_s=1.0)
    try:
        sender.send(0)
        freeze(private_server.pid)  # alive, connected, and silent: the case a deadline is for
        started = time.monotonic()
        with pytest.raises(InferenceError, match="timeout|DEADLINE_EXCEEDED|timed out"):
            sender.send(1)
        assert time.monotonic() - started < 5
    finally:
        resume(private_server.pid)
        sender.close()


def test_a_server_frozen_during_a_benchmark_ends_it_with_an_error_not_a_hang(private_server, digits):
    settings = loadgen.LoadSettings(window_s=0.5, warmup_s=0.3, max_windows=4, timeout_s=1.0)
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["point"] = loadgen.measure(
                private_server.grpc_url, "grpc", "digits", digits[1], concurrency=2, settings=settings
            )
        except TesError as error:  # the assertions below say which
            outcome["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    time.sleep(0.6)  # inside the first measurement window, with every connection open
    freeze(private_server.pid)
    thread.join(timeout=8)
    finished = not thread.is_alive()
    resume(private_server.pid)  # lets a hung benchmark finish, so no thread outlives the test
    thread.join(timeout=30)
    assert finished, "the benchmark was still waiting 8 s after the server froze (timeout_s=1)"
    assert isinstance(outcome.get("error"), (InferenceError, ServerError)), outcome
    assert "127.0.0.1" in str(outcome["error"])
