"""How a load point is put together from measurement windows, the percentile intervals at every sample size,
and the wire format of the lean senders (no server needed)."""

import json

import numpy as np
import pytest
from tritonclient.grpc import service_pb2

from bench.loadgen import PERCENTILES, LoadSettings, Window, _merge, percentile_ci
from bench.senders import HttpSender, decode_answer
from core.errors import InferenceError

SETTINGS = LoadSettings(stability=0.1)


def window(requests: int, p50_ms: float, server_ns: float = 0.0, cpu_s: float = 0.1, spread: float = 0.0) -> Window:
    """One second of `requests` answers around `p50_ms`; the server spent `server_ns` per request in each part."""
    latencies = list(np.linspace(p50_ms * (1 - spread), p50_ms * (1 + spread), requests))
    server = {part: server_ns * requests for part in ("queue", "compute_input", "compute_infer", "compute_output")}
    return Window(
        seconds=1.0, latencies_ms=latencies, errors=0, server=server | {"count": float(requests)}, client_cpu_s=cpu_s
    )


def test_a_point_is_made_of_the_last_three_windows_only():
    windows = [window(40, 30.0), window(70, 12.0), window(100, 5.0), window(101, 5.1), window(99, 4.9)]
    point = _merge("m", "grpc", "concurrency", 4, windows, SETTINGS)
    assert point.stable and point.windows == 5
    assert point.requests == 300 and point.seconds == pytest.approx(3.0)
    assert point.throughput == pytest.approx(100.0)
    assert 4.9 <= point.latency_ms["p50"] <= 5.1  # the warm-ish first windows (30 ms, 12 ms) left no trace
    assert not any(w.startswith("unstable") for w in point.warnings)


def test_windows_that_keep_drifting_are_flagged_unstable_and_still_reported():
    windows = [window(100, 5.0 * 1.2**step) for step in range(6)]
    point = _merge("m", "grpc", "concurrency", 1, windows, SETTINGS)
    assert not point.stable
    assert any(w.startswith("unstable") and "6 windows" in w for w in point.warnings)
    assert point.requests == 300 and point.latency_ms["p50"] > 0


def test_server_split_is_per_request_in_microseconds():
    windows = [window(100, 5.0, server_ns=250_000.0) for _ in range(3)]
    point = _merge("m", "http", "concurrency", 1, windows, SETTINGS)
    assert point.server_us == {
        part: pytest.approx(250.0) for part in ("queue", "compute_input", "compute_infer", "compute_output")
    }
    assert sum(point.server_us.values()) / 1e3 <= point.latency_ms["mean"]


def test_a_busy_client_is_named_as_the_possible_bottleneck():
    def client_warnings(cpu_s: float) -> list[str]:
        point = _merge("m", "grpc", "concurrency", 8, [window(100, 5.0, cpu_s=cpu_s) for _ in range(3)], SETTINGS)
        return [w for w in point.warnings if "load generator" in w]

    assert client_warnings(0.95) and "0.95 cores" in client_warnings(0.95)[0]
    assert not client_warnings(0.30)


@pytest.mark.parametrize("size", [1, 2, 3, 10, 101, 2000])
def test_percentile_intervals_hold_the_estimate_and_stay_inside_the_data(size):
    drawn = np.random.default_rng(size).lognormal(0.0, 1.0, size)
    values = np.sort(drawn)
    for q in PERCENTILES:
        low, high = percentile_ci(values, q / 100)
        assert values[0] <= low <= np.percentile(values, q) <= high <= values[-1]
    wide, narrow = percentile_ci(np.sort(drawn[: max(1, size // 10)]), 0.5), percentile_ci(values, 0.5)
    if size >= 101:  # ten times the samples, a narrower interval around the median
        assert narrow[1] - narrow[0] < wide[1] - wide[0]


def test_grpc_answers_decode_to_every_output():
    response = service_pb2.ModelInferResponse(model_name="m")
    arrays = {"logits": np.arange(6, dtype=np.float32).reshape(2, 3), "ids": np.array([7, -1], dtype=np.int64)}
    for name, array in arrays.items():
        output = response.outputs.add(name=name, datatype={"float32": "FP32", "int64": "INT64"}[array.dtype.name])
        output.shape.extend(array.shape)
        response.raw_output_contents.append(array.tobytes())
    decoded = decode_answer("grpc", response.SerializeToString())
    assert decoded.keys() == arrays.keys()
    for name, array in arrays.items():
        np.testing.assert_array_equal(decoded[name], array)
        assert decoded[name].dtype == array.dtype


def test_http_requests_are_a_json_header_then_the_raw_tensors_and_answers_decode_back():
    case = {"tokens": np.array([[1, 2, 3]], dtype=np.int64), "mask": np.array([[1.0, 0.5, 0.0]], dtype=np.float32)}
    body, headers = HttpSender._serialize(case)
    length = int(headers["Inference-Header-Content-Length"])
    header = json.loads(body[:length])
    assert header["parameters"] == {"binary_data_output": True}
    assert [(t["name"], t["shape"], t["datatype"]) for t in header["inputs"]] == [
        ("tokens", [1, 3], "INT64"),
        ("mask", [1, 3], "FP32"),
    ]
    assert body[length:] == case["tokens"].tobytes() + case["mask"].tobytes()

    outputs = [
        {
            "name": name,
            "datatype": t["datatype"],
            "shape": t["shape"],
            "parameters": {"binary_data_size": len(array.tobytes())},
        }
        for (name, array), t in zip(case.items(), header["inputs"])
    ]
    answer = json.dumps({"model_name": "m", "outputs": outputs}).encode() + body[length:]
    decoded = decode_answer("http", answer)
    for name, array in case.items():
        np.testing.assert_array_equal(decoded[name], array)

    as_json = json.dumps({"outputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0]}]}).encode()
    with pytest.raises(InferenceError, match="'x'.*binary"):
        decode_answer("http", as_json)


def _one_shot_server(responses: list[bytes]):
    """A loopback server that answers each request it reads with the next of `responses` (raw HTTP bytes)."""
    import socket
    import threading

    listener = socket.create_server(("127.0.0.1", 0))
    requests: list[bytes] = []

    def serve() -> None:
        pending = list(responses)
        while pending:
            connection, _ = listener.accept()
            with connection:
                while pending:
                    data = connection.recv(65536)
                    if not data:
                        break
                    requests.append(data)
                    answer = pending.pop(0)
                    connection.sendall(answer)
                    if b"Connection: close" in answer:
                        break
        listener.close()

    threading.Thread(target=serve, daemon=True).start()
    return f"127.0.0.1:{listener.getsockname()[1]}", requests


def test_http_sender_reads_sized_and_chunked_answers_and_reconnects_after_close():
    case = {"x": np.array([[1.0, 2.0]], dtype=np.float32)}
    header = json.dumps(
        {"outputs": [{"name": "y", "datatype": "FP32", "shape": [1, 2], "parameters": {"binary_data_size": 8}}]}
    ).encode()
    answer = header + case["x"].tobytes()
    sized = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(answer) + answer
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        + b"%x\r\n" % 10
        + answer[:10]
        + b"\r\n"
        + b"%x;ext=1\r\n" % (len(answer) - 10)
        + answer[10:]
        + b"\r\n0\r\n\r\n"
    )
    refused = b'HTTP/1.1 400 Bad Request\r\nContent-Length: 24\r\n\r\n{"error": "bad input x"}'
    url, requests = _one_shot_server([sized, chunked, refused])
    sender = HttpSender(url, "m", [case], timeout_s=5)
    try:
        for _ in range(2):  # the second answer is chunked and closes the connection
            np.testing.assert_array_equal(decode_answer("http", sender.send(0))["y"], case["x"])
        with pytest.raises(InferenceError, match="HTTP 400: bad input x"):
            sender.send(0)  # on a new connection
    finally:
        sender.close()
    assert all(
        r.startswith(b"POST /v2/models/m/infer HTTP/1.1\r\n") and r.endswith(case["x"].tobytes()) for r in requests
    )
