"""The user path: `tes up`, `prefect deployment run --watch`, a READY model in Triton, `tes down`.

Everything runs for real on free loopback ports in a private project home; `tes down` must leave nothing.
"""

import contextlib
import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from serving import client, triton

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent
TINY = [
    "--param",
    "recipe=digits-cnn",
    "--param",
    'digits_cnn={"channels": 8, "hidden": 32}',
    "--param",
    'training={"steps": 40, "learning_rate": 0.01, "eval_every": 1000, "eval_samples": 128}',
    "--param",
    'precision={"calibration_samples": 32, "score_samples": 128, "speed_repeats": 5}',
]


def _flow_run_count(api_url: str) -> int:
    request = urllib.request.Request(
        f"{api_url}/flow_runs/count", data=b"{}", headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return int(json.loads(response.read()))


@contextlib.contextmanager
def _stack(home: Path):
    """`tes up` on free ports in `home`, yielding (environment, stack state); stops every process it started."""
    env = {**os.environ, "TES_HOME": str(home)}
    ports = [str(triton.free_port()) for _ in range(4)]
    up = subprocess.run(
        [
            str(BIN / "tes"),
            "up",
            "--prefect-port",
            ports[0],
            "--http-port",
            ports[1],
            "--grpc-port",
            ports[2],
            "--metrics-port",
            ports[3],
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    state_path = home / ".tes" / "stack.json"
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        state = json.loads(state_path.read_text())
        prefect_env = subprocess.run(
            [str(BIN / "tes"), "env"], env=env, capture_output=True, text=True, check=True
        ).stdout
        for line in prefect_env.splitlines():
            key, _, value = line.removeprefix("export ").partition("=")
            env[key] = value
        yield env, state
    finally:
        state = json.loads(state_path.read_text()) if state_path.exists() else None
        subprocess.run([str(BIN / "tes"), "down"], env=env, capture_output=True, timeout=120)
        for part in ("prefect", "runner", "triton"):  # never leave a process behind, even when `tes down` failed
            if state and triton.pid_alive(state[part]["pid"]):
                triton.stop(state[part]["pid"])


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    with _stack(home) as (env, state):
        yield home, env, state


def _deployment_run(env: dict, *params: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "prefect"), "deployment", "run", "train-export-serve/default", "--watch", *params],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_deployment_run_trains_exports_and_serves(stack):
    home, env, state = stack
    run = _deployment_run(env, *TINY)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "Completed" in run.stdout
    assert "train digits-cnn: step 40/40" in run.stdout and "steps/s" in run.stdout  # training progress, watched
    url = f"127.0.0.1:{state['triton']['http_port']}"
    ready = {
        e["name"]: e["version"]
        for e in client.model_states(url, state["triton"]["admin_key"])
        if e.get("state") == "READY"
    }
    assert ready["digits-cnn"] == "1" and ready["digits-cnn-fp32"] == "1"
    summary = json.loads(
        (Path(json.loads((home / ".tes" / "last-run.json").read_text())["run_dir"]) / "summary.json").read_text()
    )
    served = summary["served_check"]["output"]
    assert (
        served["protocols"]["grpc"]["max_abs_diff_vs_in_process"] <= 1e-5 and served["variants"]["fp32"]["grpc"] <= 1e-5
    )
    assert served["protocols"]["grpc"]["top1_agreement_with_torch"] >= 0.9


def test_invalid_parameter_exits_non_zero_and_creates_no_run(stack):
    home, env, state = stack
    before = _flow_run_count(state["prefect"]["api_url"])
    runs_before = sorted((home / "runs").iterdir()) if (home / "runs").exists() else []
    run = _deployment_run(env, "--param", 'training={"steps": 0}')
    assert run.returncode != 0
    assert "Validation failed" in run.stdout + run.stderr and "steps" in run.stdout + run.stderr
    assert _flow_run_count(state["prefect"]["api_url"]) == before
    assert (sorted((home / "runs").iterdir()) if (home / "runs").exists() else []) == runs_before


def test_tes_down_leaves_no_process_and_no_port(tmp_path):
    with _stack(tmp_path) as (env, state):  # a stack of its own: the other tests keep theirs, in any order
        subprocess.run([str(BIN / "tes"), "down"], env=env, check=True, capture_output=True, timeout=120)
        for part in ("prefect", "runner", "triton"):
            assert not triton.pid_alive(state[part]["pid"]), part
        ports = (
            state["prefect"]["port"],
            state["triton"]["http_port"],
            state["triton"]["grpc_port"],
            state["triton"]["metrics_port"],
        )
        for port in ports:
            assert triton.port_is_free(port), port
        assert not (tmp_path / ".tes" / "stack.json").exists()
        assert not [name for name in os.listdir("/dev/shm") if name.startswith(f"tes{state['triton']['http_port']}_")]


def test_two_workers_take_two_runs_at_once_into_distinct_folders_and_versions(stack):
    """A second worker joins the pool as another machine would (`prefect worker start --pool tes-process`); two
    deployment runs submitted at once both complete, each in its own run folder and repository version."""
    home, env, state = stack
    second = subprocess.Popen(
        [str(BIN / "prefect"), "worker", "start", "--pool", "tes-process", "--name", "second-machine"],
        env={**env, "PREFECT_WORKER_QUERY_SECONDS": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        runs_before = set((home / "runs").iterdir()) if (home / "runs").exists() else set()
        few_variants = 'precision={"variants": ["fp32", "int8-dynamic"], "score_samples": 64, "speed_repeats": 3}'
        steps = [
            [
                "--param",
                f'training={{"steps": {steps}, "learning_rate": 0.01, "eval_every": 1000, "eval_samples": 64}}',
                "--param",
                few_variants,
            ]
            for steps in (30, 31)  # two different trainings: the second may not reuse the first one's cache
        ]
        both = [
            subprocess.Popen(
                [str(BIN / "prefect"), "deployment", "run", "train-export-serve/default", "--watch", *TINY, *extra],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for extra in steps
        ]
        outputs = [run.communicate(timeout=600)[0] for run in both]
        assert [run.returncode for run in both] == [0, 0], [out[-2000:] for out in outputs]
    finally:
        triton.stop(second.pid)
    new_runs = set((home / "runs").iterdir()) - runs_before
    assert len(new_runs) == 2
    versions = [
        json.loads((run / "summary.json").read_text())["deploy"]["output"]["variants"]["fp32"]["version"]
        for run in new_runs
    ]
    assert len(set(versions)) == 2, versions
