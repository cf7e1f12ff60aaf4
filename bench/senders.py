"""Lean request senders for the load generator: every request is serialized once, before the timed loop.

`tritonclient` builds the request message and decodes the answer inside every call, which costs Python time
per request that lands in the measured latency and, on a small machine, is taken from the server.
perf_analyzer's C++ client pays almost nothing there. These senders keep the KServe v2 wire format and the
transport (gRPC's C core; one keep-alive HTTP/1.1 connection with the binary tensor extension), send bytes
prepared up front, decode the first answer in full and check only the status of the rest.

    sender = open_sender("grpc", "127.0.0.1:8001", "digits-cnn", inputs, timeout_s=10)
    answer = sender.send(0)                # InferenceError with the server's message, or when no answer came in time
    decode_answer("grpc", answer)          # {"logits": array(...)}
    transport_floor_ms(sender)             # median liveness round trip: the client + transport floor
    sender.close()
"""

from __future__ import annotations

import json
import socket
import statistics
import time
from typing import Literal
from typing import Protocol as TypingProtocol
from urllib.parse import quote

import grpc
import numpy as np
from tritonclient.grpc import service_pb2
from tritonclient.utils import np_to_triton_dtype, triton_to_np_dtype

from core.errors import InferenceError

Protocol = Literal["http", "grpc"]
_MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
_SERVER_LIVE = "/inference.GRPCInferenceService/ServerLive"
_MAX_MESSAGE = 2**31 - 1  # bytes; what tritonclient allows, so large tensors pass the same way
_RETRY_HINT = "; is the server up, and is the timeout long enough?"


class Sender(TypingProtocol):
    def send(self, index: int) -> bytes: ...  # sends request `index` (cycled); returns the answer, undecoded

    def ping(self) -> None: ...  # the cheapest call over the same transport (liveness), for the floor

    def close(self) -> None: ...


def decode_answer(protocol: Protocol, answer: bytes) -> dict[str, np.ndarray]:
    """Every output of an undecoded answer by name (binary outputs, as the senders ask for)."""
    if protocol == "grpc":
        response = service_pb2.ModelInferResponse.FromString(answer)
        return {
            output.name: np.frombuffer(data, triton_to_np_dtype(output.datatype)).reshape(output.shape)
            for output, data in zip(response.outputs, response.raw_output_contents)
        }
    header, offset = json.JSONDecoder().raw_decode(answer.decode("latin-1"))  # latin-1: one char per byte
    arrays = {}
    for output in header.get("outputs", []):
        size = output.get("parameters", {}).get("binary_data_size")
        if size is None:
            raise InferenceError(f"output '{output.get('name')}': expected binary data, got JSON values")
        data = answer[offset : offset + size]
        arrays[output["name"]] = np.frombuffer(data, triton_to_np_dtype(output["datatype"])).reshape(output["shape"])
        offset += size
    return arrays


class _Sender:
    """What both senders share: checked inputs, requests built once (`_requests`, by `_build`), and the first
    answer decoded in full, which must carry every output's data."""

    _protocol: Protocol
    _checked = False

    def __init__(self, url: str, model: str, inputs: list[dict[str, np.ndarray]], timeout_s: float) -> None:
        if not inputs:
            raise ValueError("inputs: expected at least one request (a dict of input name -> array), got none")
        self._url, self._model, self._timeout_s = url, model, timeout_s

    def send(self, index: int) -> bytes:
        answer = self._send_request(self._requests[index % len(self._requests)])
        if not self._checked:
            self._check(answer)
        return answer

    def _send_request(self, request) -> bytes:
        raise NotImplementedError

    def _check(self, answer: bytes) -> None:
        try:
            outputs = decode_answer(self._protocol, answer)
        except (ValueError, KeyError, TypeError) as error:
            raise InferenceError(
                f"model '{self._model}' at {self._url} over {self._protocol}: the answer could not be decoded ({error})"
            ) from error
        if not outputs:
            raise InferenceError(
                f"model '{self._model}' at {self._url} over {self._protocol}: expected outputs, got none"
            )
        self._checked = True


class GrpcSender(_Sender):
    """ModelInfer over one gRPC channel with pre-serialized `ModelInferRequest` bytes (no (de)serializer)."""

    _protocol: Protocol = "grpc"

    def __init__(self, url: str, model: str, inputs: list[dict[str, np.ndarray]], timeout_s: float = 10.0):
        super().__init__(url, model, inputs, timeout_s)
        self._requests = [self._serialize(case) for case in inputs]
        # No proxy: a benchmark measures the server, and a proxy in the environment would reroute loopback.
        self._channel = grpc.insecure_channel(
            url,
            options=[
                ("grpc.max_send_message_length", _MAX_MESSAGE),
                ("grpc.max_receive_message_length", _MAX_MESSAGE),
                ("grpc.enable_http_proxy", 0),
            ],
        )
        self._infer = self._channel.unary_unary(_MODEL_INFER)  # bytes in, bytes out
        self._live = self._channel.unary_unary(_SERVER_LIVE)

    def _serialize(self, case: dict[str, np.ndarray]) -> bytes:
        request = service_pb2.ModelInferRequest(model_name=self._model)
        for name, array in case.items():
            tensor = request.inputs.add(name=name, datatype=np_to_triton_dtype(array.dtype))
            tensor.shape.extend(array.shape)
            request.raw_input_contents.append(np.ascontiguousarray(array).tobytes())
        return request.SerializeToString()

    def _call(self, method, message: bytes, what: str) -> bytes:
        try:
            return method(message, timeout=self._timeout_s)  # a deadline on every call: a frozen server never hangs us
        except grpc.RpcError as error:
            code = error.code().name if hasattr(error, "code") else "UNKNOWN"
            details = error.details() if hasattr(error, "details") else str(error)
            hint = _RETRY_HINT if code in ("UNAVAILABLE", "DEADLINE_EXCEEDED") else ""
            raise InferenceError(f"{what} at {self._url} over grpc: {code}: {details}{hint}") from error

    def _send_request(self, request: bytes) -> bytes:
        return self._call(self._infer, request, f"model '{self._model}'")

    def ping(self) -> None:
        self._call(self._live, b"", "liveness of Triton")  # an empty ServerLiveRequest serializes to no bytes

    def close(self) -> None:
        self._channel.close()


class HttpSender(_Sender):
    """POST /v2/models/<model>/infer with the binary tensor extension over one keep-alive HTTP/1.1 connection.

    Each request's bytes (request line, headers, body) are built once; answers are read straight off the socket
    by Content-Length (or chunks), without `http.client`'s header parser, which cost about 0.1 ms per request.
    """

    _protocol: Protocol = "http"

    def __init__(self, url: str, model: str, inputs: list[dict[str, np.ndarray]], timeout_s: float = 10.0):
        super().__init__(url, model, inputs, timeout_s)
        host, _, port = url.removeprefix("http://").rstrip("/").rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"url: expected host:port of Triton's HTTP endpoint, got {url!r}")
        self._address = (host, int(port))
        self._socket: socket.socket | None = None
        self._buffer = b""
        infer_path = f"/v2/models/{quote(model)}/infer"
        self._requests = [self._message("POST", infer_path, *self._serialize(case)) for case in inputs]
        self._live = self._message("GET", "/v2/health/live", b"", {})

    @staticmethod
    def _serialize(case: dict[str, np.ndarray]) -> tuple[bytes, dict[str, str]]:
        buffers = [np.ascontiguousarray(array).tobytes() for array in case.values()]
        header = {
            "inputs": [
                {
                    "name": name,
                    "shape": list(array.shape),
                    "datatype": np_to_triton_dtype(array.dtype),
                    "parameters": {"binary_data_size": len(data)},
                }
                for (name, array), data in zip(case.items(), buffers)
            ],
            "parameters": {"binary_data_output": True},
        }  # every output as raw bytes, not JSON numbers
        head = json.dumps(header).encode()
        return head + b"".join(buffers), {
            "Inference-Header-Content-Length": str(len(head)),
            "Content-Type": "application/octet-stream",
        }

    def _message(self, method: str, path: str, body: bytes, headers: dict[str, str]) -> bytes:
        lines = [
            f"{method} {path} HTTP/1.1",
            f"Host: {self._address[0]}:{self._address[1]}",
            *(f"{k}: {v}" for k, v in headers.items()),
        ]
        if method == "POST":
            lines.append(f"Content-Length: {len(body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body

    def _connect(self) -> socket.socket:
        if self._socket is None:
            connection = socket.create_connection(
                self._address, timeout=self._timeout_s
            )  # timeout per socket operation
            connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._socket, self._buffer = connection, b""
        return self._socket

    def _read_until(self, connection: socket.socket, marker: bytes) -> bytes:
        while (end := self._buffer.find(marker)) < 0:
            self._fill(connection)
        taken, self._buffer = self._buffer[:end], self._buffer[end + len(marker) :]
        return taken

    def _read_exactly(self, connection: socket.socket, size: int) -> bytes:
        while len(self._buffer) < size:
            self._fill(connection)
        taken, self._buffer = self._buffer[:size], self._buffer[size:]
        return taken

    def _fill(self, connection: socket.socket) -> None:
        data = connection.recv(1 << 20)
        if not data:
            raise ConnectionResetError("the server closed the connection")
        self._buffer += data

    def _exchange(self, message: bytes) -> tuple[int, bytes, bool]:
        """(status, body, whether the server keeps the connection) of one request on the open connection."""
        connection = self._connect()
        connection.sendall(message)
        status_line, *header_lines = self._read_until(connection, b"\r\n\r\n").decode("latin-1").split("\r\n")
        status = int(status_line.split(" ", 2)[1])
        headers = {
            name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in header_lines)
        }
        if "chunked" in headers.get("transfer-encoding", "").lower():
            parts = []
            while size := int(self._read_until(connection, b"\r\n").split(b";")[0], 16):
                parts.append(self._read_exactly(connection, size))
                self._read_exactly(connection, 2)  # the CRLF after each chunk
            while self._read_until(connection, b"\r\n"):  # trailers, up to the empty line
                pass
            body = b"".join(parts)
        else:
            body = self._read_exactly(connection, int(headers.get("content-length", "0")))
        return status, body, headers.get("connection", "").lower() != "close"

    def _call(self, message: bytes, what: str) -> bytes:
        try:
            status, answer, keep = self._exchange(message)
        except (OSError, ValueError, IndexError) as error:  # refused, reset, timed out, half-closed, garbled
            self.close()  # the next call reconnects
            raise InferenceError(
                f"{what} at {self._url} over http: no answer ({type(error).__name__}: {error}){_RETRY_HINT}"
            ) from error
        if not keep:
            self.close()
        if status != 200:
            raise InferenceError(f"{what} at {self._url} over http: HTTP {status}: {_error_text(answer)}")
        return answer

    def _send_request(self, request: bytes) -> bytes:
        return self._call(request, f"model '{self._model}'")

    def ping(self) -> None:
        self._call(self._live, "liveness of Triton")

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket, self._buffer = None, b""


def _error_text(answer: bytes) -> str:
    try:
        return json.loads(answer).get("error", answer.decode(errors="replace"))
    except ValueError:
        return answer[:200].decode(errors="replace")


def transport_floor_ms(sender: Sender, calls: int = 200) -> float:
    """Median round trip of the liveness call over `sender`'s transport, in ms: what the client, the protocol
    stack and the loopback cost a request before any model runs. A served p50 close to it is mostly client."""
    for _ in range(10):  # warm the connection and the server's handler threads
        sender.ping()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        sender.ping()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def open_sender(
    protocol: Protocol, url: str, model: str, inputs: list[dict[str, np.ndarray]], timeout_s: float = 10.0
) -> Sender:
    if protocol == "grpc":
        return GrpcSender(url, model, inputs, timeout_s)
    if protocol == "http":
        return HttpSender(url, model, inputs, timeout_s)
    raise ValueError(f"protocol: expected 'http' or 'grpc', got {protocol!r}")
