"""Which Triton a command or a run talks to: given URLs, the stack's servers (every replica), or both together."""

import json
import os

import pytest

from core.errors import ConfigError, ServerError
from flows import stack
from serving.triton import Endpoint


def _replica(tes_home, http_port: int, pid: int) -> dict:
    return {
        "host": "127.0.0.1",
        "http_port": http_port,
        "grpc_port": http_port + 1,
        "metrics_port": http_port + 2,
        "pid": pid,
        "repository": str(tes_home / "model_repository"),
        "log_path": "x.log",
        "admin_key": "key",
    }


def _write_state(tes_home, state: dict) -> None:
    (tes_home / ".tes").mkdir(exist_ok=True)
    (tes_home / ".tes" / "stack.json").write_text(json.dumps(state))


@pytest.fixture
def stack_up(tes_home):
    """A stack.json from before replicas (one "triton") whose Triton is alive (this test process stands in)."""
    _write_state(tes_home, {"triton": _replica(tes_home, 8000, os.getpid())})
    return str(tes_home / "model_repository")


@pytest.fixture
def two_replicas(tes_home):
    """A stack.json with two live replicas (this process stands in for both) and a third that is gone."""
    gone = 2**22 + 1  # above the usual pid_max: no such process
    replicas = [_replica(tes_home, port, pid) for port, pid in ((8000, os.getpid()), (9000, os.getpid()), (9100, gone))]
    _write_state(tes_home, {"triton": replicas[0], "replicas": replicas})
    return str(tes_home / "model_repository")


def test_without_urls_the_stack_s_server_is_used_with_its_key_pid_and_repository(stack_up):
    assert stack.endpoint() == Endpoint("127.0.0.1:8000", "127.0.0.1:8001", "key", os.getpid(), repository=stack_up)
    assert stack.endpoint().every() == (stack.endpoint(),)


def test_a_grpc_url_alone_takes_the_place_of_the_stack_s_own(stack_up):
    assert stack.endpoint(grpc_url="gpu-box:8001") == Endpoint(
        "127.0.0.1:8000", "gpu-box:8001", "key", os.getpid(), repository=stack_up
    )


def test_another_server_gets_neither_the_stack_s_key_nor_its_pid(stack_up):
    assert stack.endpoint("gpu-box:8000") == Endpoint("gpu-box:8000", None, None, None)
    assert stack.endpoint("127.0.0.1:8000").admin_key == "key"  # the stack's server, named by its URL


def test_with_no_stack_and_no_url_there_is_no_endpoint(tes_home):
    assert stack.endpoint() is None and stack.endpoint(grpc_url="gpu-box:8001") is None
    assert stack.repository() is None and stack.triton_url() is None


def test_the_stack_s_endpoint_lists_every_live_replica_first_one_first(two_replicas):
    found = stack.endpoint()
    assert [replica.http for replica in found.every()] == ["127.0.0.1:8000", "127.0.0.1:9000"]  # not the gone one
    assert found.http == "127.0.0.1:8000" and found.every()[0].replicas == ()
    assert all(replica.admin_key == "key" and replica.repository == two_replicas for replica in found.every())
    assert stack.endpoint("127.0.0.1:9000").every() == (stack.endpoint("127.0.0.1:9000"),)  # one replica, by URL
    assert stack.triton_url("grpc") == "127.0.0.1:8001" and stack.repository() == two_replicas


def test_several_urls_make_one_endpoint_with_replicas_paired_in_order(tes_home):
    found = stack.endpoints(["a:1", "b:1"], ["a:2", "b:2"], "k")
    assert [(r.http, r.grpc, r.admin_key) for r in found.every()] == [("a:1", "a:2", "k"), ("b:1", "b:2", "k")]
    assert stack.endpoints(["a:1", "b:1"], []).every()[1] == Endpoint("b:1")
    assert stack.endpoints(["a:1"], ["a:2"]) == Endpoint("a:1", "a:2")
    with pytest.raises(ConfigError, match="one per --url"):
        stack.endpoints(["a:1", "b:1"], ["a:2"])


def test_up_refuses_an_s3_endpoint_without_an_s3_repository_and_a_bad_url_before_starting_anything(tes_home):
    with pytest.raises(ConfigError, match="only for an s3:// repository"):
        stack.up(s3_endpoint="http://127.0.0.1:9000", say=lambda _: None)
    with pytest.raises(ConfigError, match="explicit port"):
        stack.up(repository="s3://models/repo", s3_endpoint="http://127.0.0.1", say=lambda _: None)
    assert not (tes_home / ".tes" / "stack.json").exists()


def test_up_refuses_to_switch_the_repository_under_a_running_triton(two_replicas, tes_home):
    with pytest.raises(ServerError, match=r"stop the stack \(`tes down`\) before serving"):
        stack.up(repository=str(tes_home / "elsewhere"), say=lambda _: None)
