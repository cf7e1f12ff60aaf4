"""Lean request senders for the load generator: every request is serialized once, before the timed loop.

`tritonclient` builds the request message and decodes the answer inside every call; on a 2-core machine that
costs about 0.1 ms of Python per request, which lands in the measured latency and is taken from the server.
perf_analyzer's C++ client pays almost nothing there. These senders keep the KServe v2 wire format and the
transport (gRPC's C core; one keep-alive HTTP/1.1 connection with the binary tensor extension) but send bytes
prepared up front and, after checking the first answer in full, only check the status of the rest.

    sender = open_sender("grpc", "127.0.0.1:8001", "digits-cnn", inputs, timeout_s=10)
    sender.send(0)          # raises InferenceError with the server's message, or when no answer came in time
    sender.close()
"""

from __future__ import annotations

import http.client
import json
from typing import Literal, Protocol as TypingProtocol
from urllib.parse import quote

import grpc
import numpy as np
from tritonclient.grpc import service_pb2
from tritonclient.utils import np_to_triton_dtype

from core.errors import InferenceError

Protocol = Literal["http", "grpc"]
_MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
_MAX_MESSAGE = 2**31 - 1  # bytes; what tritonclient allows, so large tensors pass the same way


class Sender(TypingProtocol):
    def send(self, index: int) -> int: ...  # sends request `index` (cycled), returns the answer's size in bytes

    def close(self) -> None: ...


def _check_inputs(inputs: list[dict[str, np.ndarray]]) -> None:
    if not inputs:
        raise ValueError("inputs: expected at least one request (a dict of input name -> array), got none")


class GrpcSender:
    """ModelInfer over one gRPC channel with pre-serialized `ModelInferRequest` bytes (no (de)serializer)."""

    def __init__(self, url: str, model: str, inputs: list[dict[str, np.ndarray]], timeout_s: float = 10.0):
        _check_inputs(inputs)
        self._url, self._model, self._timeout_s = url, model, timeout_s
        self._requests = [self._serialize(case) for case in inputs]
        # No proxy: a benchmark measures the server, and an https_proxy in the environment would reroute loopback.
        self._channel = grpc.insecure_channel(url, options=[("grpc.max_send_message_length", _MAX_MESSAGE),
                                                            ("grpc.max_receive_message_length", _MAX_MESSAGE),
                                                            ("grpc.enable_http_proxy", 0)])
        self._call = self._channel.unary_unary(_MODEL_INFER)  # bytes in, bytes out
        self._checked = False

    def _serialize(self, case: dict[str, np.ndarray]) -> bytes:
        request = service_pb2.ModelInferRequest(model_name=self._model)
        for name, array in case.items():
            tensor = request.inputs.add(name=name, datatype=np_to_triton_dtype(array.dtype))
            tensor.shape.extend(array.shape)
            request.raw_input_contents.append(np.ascontiguousarray(array).tobytes())
        return request.SerializeToString()

    def send(self, index: int) -> int:
        try:
            answer = self._call(self._requests[index % len(self._requests)], timeout=self._timeout_s)
        except grpc.RpcError as error:
            code = error.code().name if hasattr(error, "code") else "UNKNOWN"
            details = error.details() if hasattr(error, "details") else str(error)
            hint = "; is the server up, and is the timeout long enough?" if code in ("UNAVAILABLE", "DEADLINE_EXCEEDED") else ""
            raise InferenceError(f"model '{self._model}' at {self._url} over grpc: {code}: {details}{hint}") from error
        if not self._checked:
            self._check(answer)
        return len(answer)

    def _check(self, answer: bytes) -> None:
        """The first answer is decoded in full: it must carry at least one output with its data."""
        response = service_pb2.ModelInferResponse.FromString(answer)
        if not response.outputs or len(response.raw_output_contents) != len(response.outputs):
            raise InferenceError(f"model '{self._model}' at {self._url} over grpc: expected outputs with raw data, "
                                 f"got {len(response.outputs)} output(s) and {len(response.raw_output_contents)} buffer(s)")
        self._checked = True

    def close(self) -> None:
        self._channel.close()


class HttpSender:
    """POST /v2/models/<model>/infer with the binary tensor extension over one keep-alive connection."""

    def __init__(self, url: str, model: str, inputs: list[dict[str, np.ndarray]], timeout_s: float = 10.0):
        _check_inputs(inputs)
        self._url, self._model = url, model
        host, _, port = url.removeprefix("http://").rstrip("/").rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"url: expected host:port for Triton's HTTP endpoint, got {url!r}")
        self._connection = http.client.HTTPConnection(host, int(port), timeout=timeout_s)
        self._path = f"/v2/models/{quote(model)}/infer"
        self._requests = [self._serialize(case) for case in inputs]
        self._checked = False

    @staticmethod
    def _serialize(case: dict[str, np.ndarray]) -> tuple[bytes, dict[str, str]]:
        buffers = [np.ascontiguousarray(array).tobytes() for array in case.values()]
        header = {"inputs": [{"name": name, "shape": list(array.shape), "datatype": np_to_triton_dtype(array.dtype),
                              "parameters": {"binary_data_size": len(data)}}
                             for (name, array), data in zip(case.items(), buffers)],
                  "parameters": {"binary_data_output": True}}  # every output as raw bytes, not JSON numbers
        head = json.dumps(header).encode()
        return head + b"".join(buffers), {"Inference-Header-Content-Length": str(len(head)),
                                          "Content-Type": "application/octet-stream"}

    def send(self, index: int) -> int:
        body, headers = self._requests[index % len(self._requests)]
        try:
            self._connection.request("POST", self._path, body, headers)
            response = self._connection.getresponse()
            answer = response.read()
        except (OSError, http.client.HTTPException) as error:  # refused, reset, timed out, half-closed
            self._connection.close()  # the next send reconnects
            raise InferenceError(f"model '{self._model}' at {self._url} over http: no answer ({type(error).__name__}: {error}); "
                                 "is the server up, and is the timeout long enough?") from error
        if response.status != 200:
            raise InferenceError(f"model '{self._model}' at {self._url} over http: HTTP {response.status}: {_error_text(answer)}")
        if not self._checked:
            self._check(answer, response.getheader("Inference-Header-Content-Length"))
        return len(answer)

    def _check(self, answer: bytes, header_length: str | None) -> None:
        """The first answer is decoded in full: a JSON header naming outputs, each with binary data behind it."""
        head = json.loads(answer[: int(header_length)] if header_length else answer)
        outputs = head.get("outputs", [])
        sizes = [output.get("parameters", {}).get("binary_data_size") for output in outputs]
        if not outputs or None in sizes or sum(sizes) != len(answer) - int(header_length or 0):
            raise InferenceError(f"model '{self._model}' at {self._url} over http: expected binary outputs, got {head}")
        self._checked = True

    def close(self) -> None:
        self._connection.close()


def _error_text(answer: bytes) -> str:
    try:
        return json.loads(answer).get("error", answer.decode(errors="replace"))
    except ValueError:
        return answer[:200].decode(errors="replace")


def open_sender(protocol: Protocol, url: str, model: str, inputs: list[dict[str, np.ndarray]], timeout_s: float = 10.0) -> Sender:
    if protocol == "grpc":
        return GrpcSender(url, model, inputs, timeout_s)
    if protocol == "http":
        return HttpSender(url, model, inputs, timeout_s)
    raise ValueError(f"protocol: expected 'http' or 'grpc', got {protocol!r}")
