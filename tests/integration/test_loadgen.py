"""The load generator and the benchmark against a real Triton."""

import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from bench import loadgen
from core.errors import InferenceError, ServerError
from serving import client, triton
from tests.conftest import serve_tiny_digits

pytestmark = pytest.mark.integration
QUICK = loadgen.LoadSettings(window_s=0.5, warmup_s=0.3, max_windows=6, stability=0.5)


@pytest.fixture(scope="module")
def digits(triton_server, tmp_path_factory):
    _, recipe = serve_tiny_digits(triton_server, tmp_path_factory.mktemp("d"))
    return [batch.inputs for batch in recipe.eval_batches(1, 32)]


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_a_load_point_has_every_field_in_order(triton_server, digits, protocol):
    url = triton_server.grpc_url if protocol == "grpc" else triton_server.http_url
    point = loadgen.measure(url, protocol, "digits", digits, concurrency=2, settings=QUICK)
    assert point.requests > 50 and point.errors == 0 and point.throughput > 0 and point.windows >= 3
    lat = point.latency_ms
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p95"] <= lat["p99"]
    for name in ("p50", "p99"):
        low, high = point.latency_ci_ms[name]
        assert low <= lat[name] <= high
    assert set(point.server_us) == {"queue", "compute_input", "compute_infer", "compute_output"}
    assert point.server_us["compute_infer"] > 0
    assert sum(point.server_us.values()) / 1e3 <= lat["mean"]  # the server's share fits inside what the client saw
    assert point.client_cpu_cores > 0


def test_open_loop_offers_the_rate_it_was_asked(triton_server, digits):
    point = loadgen.measure(triton_server.grpc_url, "grpc", "digits", digits, rate=100, settings=QUICK)
    assert point.mode == "rate" and point.errors == 0
    assert 60 <= point.throughput <= 140  # Poisson arrivals at 100/s over ~1.5 s of windows
    assert point.latency_ms["p99"] >= point.latency_ms["p50"]


def test_all_zero_inputs_are_refused(triton_server):
    with pytest.raises(ValueError, match="real samples"):
        loadgen.measure(
            triton_server.grpc_url, "grpc", "digits", [{"image": np.zeros((1, 1, 8, 8), np.float32)}], concurrency=1
        )


def test_a_stopped_server_gives_a_clear_error_quickly(tmp_path, digits):
    server = triton.start(tmp_path / "repo", tmp_path / "work")
    triton.stop(server.pid)
    started = time.monotonic()
    with pytest.raises((ServerError, InferenceError), match="127.0.0.1"):
        loadgen.measure(server.grpc_url, "grpc", "digits", digits, concurrency=2, settings=QUICK)
    assert time.monotonic() - started < 15


SLOWER_AND_SLOWER = textwrap.dedent('''
    import time
    import numpy as np
    import triton_python_backend_utils as pb_utils

    class TritonPythonModel:
        """Each answer takes longer than the last: 2 ms, plus 4 ms for every second since loading."""
        def initialize(self, args):
            self.loaded = time.monotonic()

        def execute(self, requests):
            time.sleep(0.002 + 0.004 * (time.monotonic() - self.loaded))
            echo = [pb_utils.get_input_tensor_by_name(r, "x").as_numpy() for r in requests]
            return [pb_utils.InferenceResponse([pb_utils.Tensor("y", x)]) for x in echo]
''')


def test_windows_that_disagree_are_reported_unstable(triton_server):
    folder = Path(triton_server.repository) / "slower"
    (folder / "1").mkdir(parents=True)
    (folder / "1" / "model.py").write_text(SLOWER_AND_SLOWER)
    config = mc.ModelConfig(name="slower", backend="python", max_batch_size=0)
    config.input.add(name="x", data_type=mc.TYPE_FP32, dims=[1])
    config.output.add(name="y", data_type=mc.TYPE_FP32, dims=[1])
    (folder / "config.pbtxt").write_text(text_format.MessageToString(config))
    client.load_model(triton_server.http_url, "slower")
    settings = loadgen.LoadSettings(window_s=0.5, warmup_s=0.2, max_windows=5, stability=0.1)
    point = loadgen.measure(
        triton_server.grpc_url, "grpc", "slower", [{"x": np.ones(1, np.float32)}], concurrency=1, settings=settings
    )
    assert not point.stable and point.windows == 5
    assert any(w.startswith("unstable") for w in point.warnings)
