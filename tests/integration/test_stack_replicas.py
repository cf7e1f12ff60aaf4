"""`tes up --replicas 2 --repository s3://...`: two Triton replicas over one S3 repository (moto) beside the Prefect
server and runner; `tes status` shows every replica's versions; a second `tes up` restarts only what is gone."""

from __future__ import annotations

import json
import os
from contextlib import redirect_stderr, redirect_stdout
from io import StringIO

import pytest

from core.runtimes import open_session
from flows import stack
from flows.cli import main
from flows.cli.stack_commands import _with_stack_repository
from recipes import build_recipe
from serving import client, triton
from serving.check import check_served
from serving.deploy import Deployable, deploy
from serving.repository import ServingConfig
from tests.conftest import TINY_DIGITS

pytestmark = pytest.mark.integration


def _tiny_digits_onnx(folder):
    from export.onnx_export import ExportConfig, export_onnx

    recipe = build_recipe("digits-cnn", TINY_DIGITS)
    return export_onnx(recipe, recipe.build_model(), folder, ExportConfig()).output.onnx


def tes(*args: str) -> tuple[int, str, str]:
    out, err = StringIO(), StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def home(tmp_path_factory, s3):
    """A private project home with `tes up --replicas 2` on an S3 repository; everything stopped afterwards."""
    folder = tmp_path_factory.mktemp("home")
    ports = [str(triton.free_port()) for _ in range(4)]
    with pytest.MonkeyPatch.context() as env:
        env.setenv("TES_HOME", str(folder))
        try:
            code, out, err = tes(
                *("up", "--replicas", "2", "--repository", "s3://models/stack", "--s3-endpoint", s3.endpoint),
                *("--prefect-port", ports[0], "--http-port", ports[1], "--grpc-port", ports[2]),
                *("--metrics-port", ports[3]),
            )
            assert code == 0, out + err
            yield folder, out
        finally:
            state = stack.read()
            tes("down")
            for entry in [*stack.replicas(state), (state or {}).get("runner"), (state or {}).get("prefect")]:
                if entry and triton.pid_alive(entry["pid"]):
                    triton.stop(entry["pid"])


def test_up_starts_two_replicas_on_their_own_ports_over_the_one_repository(home, s3):
    _, printed = home
    state = stack.read()
    replicas = stack.replicas(state)
    assert len(replicas) == 2 and state["triton"] == replicas[0]
    assert state["repository"] == f"s3://{s3.endpoint.removeprefix('http://')}/models/stack"
    assert {entry["repository"] for entry in replicas} == {state["repository"]}
    ports = [(entry["http_port"], entry["grpc_port"], entry["metrics_port"]) for entry in replicas]
    assert len({port for group in ports for port in group}) == 6
    assert "triton-1" in printed and "triton-2" in printed and state["repository"] in printed
    assert _with_stack_repository({}) == {"repository": state["repository"]}  # tes run deploys where Triton reads
    assert _with_stack_repository({"repository": "elsewhere"}) == {"repository": "elsewhere"}


def test_a_deploy_rolls_over_both_replicas_and_status_shows_each_one(home, tmp_path):
    onnx_path = _tiny_digits_onnx(tmp_path)
    endpoint = stack.endpoint()
    assert len(endpoint.every()) == 2
    deployed = deploy(
        stack.repository(),
        "digits",
        [Deployable("fp32", str(onnx_path))],
        "fp32",
        ServingConfig(max_batch_size=16, value_ranges={"image": (0.0, 16.0)}),
        {"recipe": "digits-cnn", "options": TINY_DIGITS},
        endpoint,
    ).output
    assert [r.versions for r in deployed.replicas] == [{"digits-fp32": "1", "digits": "1"}] * 2
    session = open_session(onnx_path)
    batches = [batch.inputs for batch in build_recipe("digits-cnn", TINY_DIGITS).eval_batches(8, max_samples=16)]
    top1 = [session.run(None, inputs)[0].argmax(-1) for inputs in batches]
    check = check_served(deployed, {"fp32": session}, batches, top1).output
    second = stack.replicas(stack.read())[1]
    assert set(check.replicas) == {f"127.0.0.1:{second['http_port']}"}  # the first is checked in full, as before
    assert all(diff <= 1e-5 for diffs in check.replicas.values() for diff in diffs.values())
    assert set(next(iter(check.replicas.values()))) == {"http", "grpc"}
    code, out, _ = tes("status")
    assert code == 0
    rows = [line.split() for line in out.splitlines() if line.strip().startswith("triton-")]
    assert {(row[0], row[1], row[2], row[3]) for row in rows if row[1].startswith("digits")} == {
        (replica, model, "1", "READY") for replica in ("triton-1", "triton-2") for model in ("digits", "digits-fp32")
    }


def test_infer_finds_the_recipe_of_a_model_in_the_s3_repository(home):
    code, out, err = tes("infer", "digits", "--sample", "3", "--protocol", "grpc")
    assert code == 0, out + err
    assert "logits: shape [1, 10]" in out and "p=" in out


def test_bench_spreads_its_load_over_every_replica_and_reads_the_model_from_s3(home, tmp_path):
    code, out, err = tes("bench", "digits", "--protocol", "grpc", "--concurrency", "2", "--out", str(tmp_path))
    assert code == 0, out + err
    (point,) = json.loads((tmp_path / "benchmark.json").read_text())["points"]
    assert point["endpoints"] == 2 and point["errors"] == 0 and point["requests"] > 0


def test_up_again_restarts_only_what_is_gone_and_the_new_replica_serves_the_repository(home):
    before = stack.read()
    first, second = stack.replicas(before)
    triton.stop(second["pid"])
    triton.stop(before["runner"]["pid"])
    code, out, err = tes("status")
    assert code == 1 and "triton-2" in err and "tes up" in err
    assert any(line.split()[:1] == ["runner"] and "GONE" in line for line in out.splitlines())

    code, out, err = tes("up")
    assert code == 0, out + err
    after = stack.read()
    assert after["prefect"]["pid"] == before["prefect"]["pid"]  # healthy parts were left alone
    assert stack.replicas(after)[0]["pid"] == first["pid"]
    assert after["runner"]["pid"] != before["runner"]["pid"] and triton.pid_alive(after["runner"]["pid"])
    revived = stack.replicas(after)[1]
    assert revived["pid"] != second["pid"] and revived["http_port"] == second["http_port"]  # same address
    assert "replica 2 of 2 is gone: starting it again" in out and "loaded models already in" in out
    states = client.model_states(f"127.0.0.1:{revived['http_port']}", revived["admin_key"])
    assert {(e["name"], e["version"], e["state"]) for e in states} >= {("digits", "1", "READY")}
    assert json.loads((home[0] / ".tes" / "stack.json").read_text())["replicas"][1]["pid"] == revived["pid"]


def test_down_stops_every_replica_and_frees_their_ports(home):
    state = stack.read()
    code, out, _ = tes("down")
    assert code == 0 and "triton-1" in out and "triton-2" in out
    for entry in [*stack.replicas(state), state["runner"], state["prefect"]]:
        assert not triton.pid_alive(entry["pid"])
    for entry in stack.replicas(state):
        assert triton.port_is_free(entry["http_port"]) and triton.port_is_free(entry["grpc_port"])
    assert not [name for name in os.listdir("/dev/shm") if name.startswith(f"tes{state['triton']['http_port']}_")]
