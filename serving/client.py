"""Client helpers over KServe v2 HTTP and gRPC (`tritonclient`), and model control through the repository API."""

from __future__ import annotations

import time
from typing import Iterator, Literal

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from core.errors import InferenceError, ServerError
from serving.triton import ADMIN_HEADER

Protocol = Literal["http", "grpc"]


def connect(url: str, protocol: Protocol = "http", timeout_s: float = 60.0):
    if protocol == "http":
        return httpclient.InferenceServerClient(url, connection_timeout=timeout_s, network_timeout=timeout_s)
    if protocol == "grpc":
        return grpcclient.InferenceServerClient(url)
    raise ValueError(f"protocol must be 'http' or 'grpc', got {protocol!r}")


def infer(
    url: str,
    model: str,
    inputs: dict[str, np.ndarray],
    protocol: Protocol = "http",
    version: str = "",
    client=None,
    timeout_s: float | None = None,
) -> dict[str, np.ndarray]:
    """One request; returns every output by name. Raises `InferenceError` with the server's message, or when
    no answer came within `timeout_s` (a gRPC deadline; for HTTP, the connection's network timeout)."""
    owned = client is None
    if client is None and protocol == "http" and timeout_s is not None:
        client = connect(url, protocol, timeout_s)
    client = client or connect(url, protocol)
    module = httpclient if protocol == "http" else grpcclient
    extra = {"client_timeout": timeout_s} if protocol == "grpc" and timeout_s is not None else {}
    try:
        request = []
        for name, array in inputs.items():
            tensor = module.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
            tensor.set_data_from_numpy(array)
            request.append(tensor)
        result = client.infer(model, request, **extra)
    except InferenceServerException as error:
        raise InferenceError(f"model '{model}' at {url} over {protocol}: {error.message()}") from error
    except (TimeoutError, OSError) as error:  # HTTP: socket timeouts and refused or reset connections
        raise InferenceError(
            f"model '{model}' at {url} over {protocol}: no answer ({type(error).__name__}: {error}); "
            "is the server up, and is the timeout long enough?"
        ) from error
    finally:
        if owned:
            client.close()
    response = result.get_response()
    outputs = response["outputs"] if protocol == "http" else response.outputs
    names = [output["name"] if protocol == "http" else output.name for output in outputs]
    return {name: result.as_numpy(name) for name in names}


def admin_headers(admin_key: str | None) -> dict[str, str] | None:
    return {ADMIN_HEADER: admin_key} if admin_key else None


def load_model(url: str, model: str, timeout_s: float = 120.0, admin_key: str | None = None) -> str:
    """Ask Triton (explicit model control) to load or reload `model`; returns the ready version."""
    client, headers = connect(url, "http", timeout_s), admin_headers(admin_key)
    try:
        client.load_model(model, headers=headers)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            index = client.get_model_repository_index(headers=headers)
            ready = [entry for entry in index if entry.get("name") == model and entry.get("state") == "READY"]
            if ready:
                return str(ready[0].get("version", ""))
            time.sleep(0.2)
    except InferenceServerException as error:
        raise ServerError(f"Triton at {url} failed to load model '{model}': {error.message()}") from error
    finally:
        client.close()
    raise ServerError(f"model '{model}' was not READY on {url} after {timeout_s:.0f} s")


def model_states(url: str, admin_key: str | None = None) -> list[dict]:
    """The repository index: name, version, state (and reason) of each model Triton knows."""
    client = connect(url, "http", 10)
    try:
        return client.get_model_repository_index(headers=admin_headers(admin_key))
    except Exception as error:  # connection refused comes as several exception types
        raise ServerError(f"cannot reach Triton at {url}: {error}") from error
    finally:
        client.close()


def complete_bytes(
    url: str,
    model: str,
    prompt: bytes,
    context: int,
    protocol: Protocol = "http",
    max_bytes: int = 80,
    temperature: float = 0.7,
    seed: int = 0,
    input_name: str = "tokens",
    output_name: str = "logits",
) -> Iterator[int]:
    """Continue `prompt` with a served next-byte model, one request per byte, yielding each byte as it comes.

    Each request sends the last `context` bytes as `input_name` (1, T) int64; the answer's `output_name` (1, 256)
    logits pick the next byte: the most likely one when `temperature` <= 0, else one drawn from
    softmax(logits / temperature) with a generator seeded by `seed`."""
    if not prompt:
        raise InferenceError(
            f"model '{model}': the prompt is empty; a next-byte model needs at least one byte of context"
        )
    rng, text = np.random.default_rng(seed), bytearray(prompt)
    client = connect(url, protocol)
    try:
        for _ in range(max_bytes):
            tokens = np.frombuffer(bytes(text[-context:]), dtype=np.uint8).astype(np.int64)[None]  # (1, T)
            logits = infer(url, model, {input_name: tokens}, protocol, client=client)[output_name][0]  # (256,)
            text.append(_next_byte(logits.astype(np.float64), temperature, rng))
            yield text[-1]
    finally:
        client.close()


def complete_tokens(
    url: str,
    model: str,
    inputs: dict[str, np.ndarray],
    protocol: Protocol = "http",
    max_tokens: int = 40,
    temperature: float = 0.7,
    seed: int = 0,
    context: int = 1024,
    output_name: str = "logits",
) -> Iterator[int]:
    """Continue a tokenized prompt (`inputs`: input_ids and, if the model takes them, attention_mask and
    token_type_ids, each (1, T) int64) with a served causal language model, one request per token, yielding each
    token id. The answer's (1, T, vocab) logits at the last position pick the next token (as `complete_bytes`)."""
    ids = inputs.get("input_ids")
    if ids is None or ids.shape[0] != 1 or ids.shape[1] == 0:
        raise InferenceError(f"model '{model}': the prompt must be one non-empty row of input_ids")
    rng, tokens = np.random.default_rng(seed), [int(t) for t in ids[0]]
    client = connect(url, protocol)
    try:
        for _ in range(max_tokens):
            window = np.array(tokens[-context:], dtype=np.int64)[None]
            feeds = {"input_ids": window}
            if "attention_mask" in inputs:
                feeds["attention_mask"] = np.ones_like(window)
            if "token_type_ids" in inputs:
                feeds["token_type_ids"] = np.zeros_like(window)
            logits = infer(url, model, feeds, protocol, client=client)[output_name][0]
            last = logits[-1] if logits.ndim == 2 else logits  # (T, vocab) for a causal LM, (vocab,) for a byte GPT
            tokens.append(_next_byte(last.astype(np.float64), temperature, rng))
            yield tokens[-1]
    finally:
        client.close()


def _next_byte(logits: np.ndarray, temperature: float, rng: np.random.Generator) -> int:
    if temperature <= 0:
        return int(logits.argmax())
    weights = np.exp((logits - logits.max()) / temperature)  # softmax, shifted so exp cannot overflow
    return int(rng.choice(len(weights), p=weights / weights.sum()))
