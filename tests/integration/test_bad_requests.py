"""A bad request is the client's fault: HTTP 400 / gRPC INVALID_ARGUMENT, with a message naming the tensor. A failure
inside the runtime is ours: HTTP 500 / gRPC INTERNAL, for that request only. Both hold for a variant model and for
the ensemble alias in front of it, and the server stays healthy either way (see docs/reliability.md).

Triton's core refuses what it can check against config.pbtxt (missing, unexpected or misnamed inputs, data types,
ranks and fixed dims, empty batches, batches over max_batch_size) before our model sees the request; our
Python-backend model (serving/backend/model.py) refuses the rest (empty or too long variable axes, values out of
range). The `by` column of BAD_REQUESTS says which one answers, and the test checks it from the message.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from core.errors import InferenceError
from core.runtimes import open_session
from export.onnx_export import ExportConfig, export_onnx
from recipes import build_recipe
from serving import client, repository
from serving.repository import ServingConfig
from tests.conftest import TINY_DIGITS, TINY_GPT

pytestmark = pytest.mark.integration

CLIENT_ERROR = {"http": "400", "grpc": "StatusCode.INVALID_ARGUMENT"}
SERVER_ERROR = {"http": "500", "grpc": "StatusCode.INTERNAL"}
CONTEXT = TINY_GPT["block_size"]  # 32

# model family -> (variant, alias, a good request, its output's shape)
FAMILIES = {
    "gpt": ("gpt-fp32", "gpt", {"tokens": np.arange(8, dtype=np.int64)[None]}, (1, 256)),
    "digits": ("digits-fp32", "digits", {"image": np.full((1, 1, 8, 8), 0.5, np.float32)}, (1, 10)),
}
GPT_SERVING = ServingConfig(max_batch_size=4, value_ranges={"tokens": (0, 255)}, max_dims={"tokens": [CONTEXT]})
DIGITS_SERVING = ServingConfig(max_batch_size=16, value_ranges={"image": (0.0, 1.0)})


def _tokens(shape, value=0, dtype=np.int64) -> dict[str, np.ndarray]:
    return {"tokens": np.full(shape, value, dtype)}


def _image(shape, value=0.5, dtype=np.float32) -> dict[str, np.ndarray]:
    return {"image": np.full(shape, value, dtype)}


# (id, family, request, by, what the message must say); by: "triton" (its core) or "model" (our Python backend)
BAD_REQUESTS = [
    ("gpt-missing-input", "gpt", {}, "triton", ["missing required input(s) ['tokens']"]),
    (
        "gpt-misnamed-input",
        "gpt",
        {"tokenz": np.zeros((1, 8), np.int64)},
        "triton",
        ["unexpected inference input 'tokenz'"],
    ),
    ("gpt-unexpected-input", "gpt", {**_tokens((1, 8)), "extra": np.zeros((1, 2), np.float32)}, "triton", ["'extra'"]),
    (
        "gpt-wrong-dtype",
        "gpt",
        _tokens((1, 8), dtype=np.float32),
        "triton",
        ["input 'tokens' data-type is 'FP32'", "'INT64'"],
    ),
    ("gpt-wrong-rank", "gpt", _tokens((1, 8, 1)), "triton", ["unexpected shape for input 'tokens'", "got [1,8,1]"]),
    ("gpt-empty-batch", "gpt", _tokens((0, 8)), "triton", ["input 'tokens'"]),
    ("gpt-batch-over-max", "gpt", _tokens((5, 8)), "triton", ["batch-size must be <= 4"]),
    ("gpt-empty-context", "gpt", _tokens((1, 0)), "model", ["input 'tokens' has shape [1, 0]", "any size >= 1"]),
    (
        "gpt-context-too-long",
        "gpt",
        _tokens((1, CONTEXT + 8)),
        "model",
        [f"input 'tokens' has shape [1, {CONTEXT + 8}]", f"expected at most [{CONTEXT}] per sample"],
    ),
    (
        "gpt-id-over-vocabulary",
        "gpt",
        _tokens((1, 8), 300),
        "model",
        ["input 'tokens' has values in [300, 300]", "[0, 255]"],
    ),
    ("gpt-negative-id", "gpt", _tokens((1, 8), -1), "model", ["input 'tokens' has values in [-1, -1]", "[0, 255]"]),
    ("digits-missing-input", "digits", {}, "triton", ["missing required input(s) ['image']"]),
    (
        "digits-wrong-dtype",
        "digits",
        _image((1, 1, 8, 8), dtype=np.float64),
        "triton",
        ["input 'image' data-type is 'FP64'"],
    ),
    (
        "digits-wrong-shape",
        "digits",
        _image((1, 1, 8, 7)),
        "triton",
        ["unexpected shape for input 'image'", "got [1,1,8,7]"],
    ),
    ("digits-wrong-rank", "digits", _image((1, 8, 8)), "triton", ["unexpected shape for input 'image'", "got [1,8,8]"]),
    ("digits-empty-batch", "digits", _image((0, 1, 8, 8)), "triton", ["input 'image'"]),
    ("digits-batch-over-max", "digits", _image((17, 1, 8, 8)), "triton", ["batch-size must be <= 16"]),
    (
        "digits-value-over-range",
        "digits",
        _image((1, 1, 8, 8), 2.0),
        "model",
        ["input 'image' has values in", "[0.0, 1.0]"],
    ),
    (
        "digits-nan",
        "digits",
        _image((1, 1, 8, 8), np.nan),
        "model",
        ["input 'image' has values in [nan, nan]", "[0.0, 1.0]"],
    ),
]


def _export(recipe, folder) -> str:
    torch.manual_seed(0)
    config = ExportConfig(verify_batch_sizes=(1,), verify_samples=1)
    return export_onnx(recipe, recipe.build_model(), folder, config).output.onnx


def _deploy(server, name: str, onnx_path: str, serving: ServingConfig, alias: str | None = None) -> None:
    repository.write_version(server.repository, name, onnx_path, serving)
    client.load_model(server.http_url, name)
    if alias:
        repository.write_alias(server.repository, alias, name)
        client.load_model(server.http_url, alias)


@pytest.fixture(scope="module")
def served(triton_server, tmp_path_factory) -> dict[str, str]:
    """Tiny untrained models, each exported once: the guarded GPT and digits variants behind their aliases, and the
    same GPT served without value ranges or maximum lengths (`gpt-unguarded`, alias `unguarded`), so requests our
    model would refuse reach ONNX Runtime and fail inside it. Returns the ONNX files by recipe."""
    folder = tmp_path_factory.mktemp("bad-requests")
    files = {
        "gpt": _export(build_recipe("stdlib-gpt", TINY_GPT), folder / "gpt"),
        "digits": _export(build_recipe("digits-cnn", TINY_DIGITS), folder / "digits"),
    }
    _deploy(triton_server, "gpt-fp32", files["gpt"], GPT_SERVING, alias="gpt")
    _deploy(triton_server, "digits-fp32", files["digits"], DIGITS_SERVING, alias="digits")
    _deploy(triton_server, "gpt-unguarded", files["gpt"], ServingConfig(max_batch_size=4), alias="unguarded")
    # two requests fill a batch at once; a lone one would wait 2 s for a partner
    _deploy(
        triton_server,
        "gpt-unguarded-batched",
        files["gpt"],
        ServingConfig(max_batch_size=2, max_queue_delay_microseconds=2_000_000),
    )
    return files


def _url(server, protocol: str) -> str:
    return server.http_url if protocol == "http" else server.grpc_url


def _refusal(server, protocol: str, model: str, inputs: dict[str, np.ndarray]) -> InferenceServerException:
    """Send `inputs` as they are (`serving.client.infer` checks nothing itself) and return the server's error,
    with its status; fail if it answered."""
    with pytest.raises(InferenceError) as caught:
        client.infer(_url(server, protocol), model, inputs, protocol)
    assert isinstance(caught.value.__cause__, InferenceServerException), caught.value
    return caught.value.__cause__


def _assert_healthy_and_serving(server, protocol: str, model: str, family: str) -> None:
    connection = (httpclient if protocol == "http" else grpcclient).InferenceServerClient(_url(server, protocol))
    try:
        assert connection.is_server_live() and connection.is_server_ready() and connection.is_model_ready(model)
    finally:
        connection.close()
    _, _, good, shape = FAMILIES[family]
    assert client.infer(_url(server, protocol), model, good, protocol)["logits"].shape == shape


@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("through", ["variant", "alias"])
@pytest.mark.parametrize("case, family, inputs, by, says", BAD_REQUESTS, ids=[case[0] for case in BAD_REQUESTS])
def test_a_bad_request_is_a_client_error_naming_the_input(
    triton_server, served, protocol, through, case, family, inputs, by, says
):
    variant, alias, _, _ = FAMILIES[family]
    model = variant if through == "variant" else alias
    error = _refusal(triton_server, protocol, model, inputs)
    assert error.status() == CLIENT_ERROR[protocol], error
    message = error.message()
    for fragment in says:
        assert fragment in message, message
    ours = f"model '{variant}': input "
    assert (ours in message) == (by == "model"), f"expected {by} to refuse it: {message}"
    if by == "model" and through == "alias":
        assert f"in ensemble '{alias}'" in message
    _assert_healthy_and_serving(triton_server, protocol, model, family)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("model", ["gpt-unguarded", "unguarded"])
@pytest.mark.parametrize(
    "inputs, runtime_says",
    [
        (_tokens((1, 8), 300), "indices element out of data bounds"),  # the embedding's Gather, on an id it lacks
        (_tokens((1, CONTEXT + 8)), "broadcast"),  # the position embedding is CONTEXT long
    ],
    ids=["id-over-vocabulary", "context-too-long"],
)
def test_a_failure_inside_the_runtime_stays_a_server_error(
    triton_server, served, protocol, model, inputs, runtime_says
):
    """Without value ranges and maximum lengths in its config, our model cannot refuse these; ONNX Runtime raises
    while running them, which is the server's failure (500 / INTERNAL), not the client's, and harms nothing else."""
    error = _refusal(triton_server, protocol, model, inputs)
    assert error.status() == SERVER_ERROR[protocol], error
    assert "model 'gpt-unguarded': the runtime failed" in error.message() and runtime_says in error.message()
    _assert_healthy_and_serving(triton_server, protocol, model, "gpt")


def test_a_runtime_failure_in_a_batch_fails_only_its_own_request(triton_server, served):
    """Triton hands the model a good and a failing request in one call: the good one is answered (as if alone), the
    failing one alone gets INTERNAL. Before, the exception failed every request of the call."""
    model, good = "gpt-unguarded-batched", FAMILIES["gpt"][2]
    expected = open_session(served["gpt"]).run(None, good)[0]
    stats = httpclient.InferenceServerClient(triton_server.http_url)

    def counts() -> tuple[int, int]:
        entry = stats.get_inference_statistics(model)["model_stats"][0]
        return int(entry["execution_count"]), int(entry["inference_count"])

    answers: dict[str, object] = {}

    def send(tag: str, inputs: dict[str, np.ndarray]) -> None:
        try:
            answers[tag] = client.infer(triton_server.grpc_url, model, inputs, "grpc", timeout_s=60)["logits"]
        except Exception as error:  # kept for the asserts below
            answers[tag] = error

    before = counts()
    senders = [
        threading.Thread(target=send, args=("good", good)),
        threading.Thread(target=send, args=("bad", _tokens((1, 8), 300))),
    ]
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join(timeout=90)
    deadline = time.monotonic() + 10  # Triton counts a call after it has sent its responses
    while counts()[1] < before[1] + 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    after = counts()
    stats.close()
    assert (after[0] - before[0], after[1] - before[1]) == (1, 2), "the two requests were not run in one call"
    assert isinstance(answers["good"], np.ndarray), answers["good"]
    np.testing.assert_allclose(answers["good"], expected, rtol=0, atol=1e-5)
    bad = answers["bad"].__cause__
    assert bad.status() == SERVER_ERROR["grpc"] and "indices element out of data bounds" in bad.message()
    _assert_healthy_and_serving(triton_server, "grpc", model, "gpt")
