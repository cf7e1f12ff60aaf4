"""Which Triton a command or a run talks to: given URLs, the stack's server, or both together."""

import json
import os

import pytest

from flows import stack
from serving.triton import Endpoint


@pytest.fixture
def stack_up(tes_home):
    """A stack.json whose Triton is alive (this test process stands in for it)."""
    state = {
        "host": "127.0.0.1",
        "http_port": 8000,
        "grpc_port": 8001,
        "metrics_port": 8002,
        "pid": os.getpid(),
        "repository": str(tes_home / "model_repository"),
        "log_path": "x.log",
        "admin_key": "key",
    }
    (tes_home / ".tes").mkdir(exist_ok=True)
    (tes_home / ".tes" / "stack.json").write_text(json.dumps({"triton": state}))


def test_without_urls_the_stack_s_server_is_used_with_its_key_and_pid(stack_up):
    assert stack.endpoint() == Endpoint("127.0.0.1:8000", "127.0.0.1:8001", "key", os.getpid())


def test_a_grpc_url_alone_takes_the_place_of_the_stack_s_own(stack_up):
    assert stack.endpoint(grpc_url="gpu-box:8001") == Endpoint("127.0.0.1:8000", "gpu-box:8001", "key", os.getpid())


def test_another_server_gets_neither_the_stack_s_key_nor_its_pid(stack_up):
    assert stack.endpoint("gpu-box:8000") == Endpoint("gpu-box:8000", None, None, None)
    assert stack.endpoint("127.0.0.1:8000").admin_key == "key"  # the stack's server, named by its URL


def test_with_no_stack_and_no_url_there_is_no_endpoint(tes_home):
    assert stack.endpoint() is None and stack.endpoint(grpc_url="gpu-box:8001") is None
