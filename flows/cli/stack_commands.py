"""`tes up | down | status | env | run | demo`: the stack, and the pipeline run in-process or through Prefect."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from core import paths
from flows.cli import output, rundata
from flows.cli.arguments import ParamPairs, ParamsJson, pipeline_overrides, prefect_param_args

PortOption = Annotated[
    Optional[int],
    typer.Option(
        metavar="PORT", min=1, max=65535, show_default=False, help="Default: the usual port if free, else a free one."
    ),
]
NO_STACK = "no stack is up: start it with `tes up`"


def up(
    prefect_port: PortOption = None,
    http_port: PortOption = None,
    grpc_port: PortOption = None,
    metrics_port: PortOption = None,
) -> None:
    """Start the Prefect server, the deployment runner and Triton (loopback only)."""
    from flows import stack

    state = stack.up(
        prefect_port=prefect_port, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port, say=output.say
    )
    _print_stack(state)


def down() -> None:
    """Stop everything `tes up` started."""
    from flows import stack

    stack.down(say=output.say)


def status() -> int:
    """What is running, and every model version Triton knows with its state."""
    from flows import stack
    from serving import client, triton

    state = stack.read()
    if not state:
        output.error(NO_STACK)
        return 1
    output.table(
        ["process", "pid", "state"],
        [
            [part, str(state[part]["pid"]), "running" if triton.pid_alive(state[part]["pid"]) else "GONE"]
            for part in ("prefect", "runner", "triton")
        ],
        title="stack",
        numeric=frozenset({1}),
    )
    url = stack.triton_url("http")
    if url is None:
        output.error("Triton is not running: restart the stack with `tes down` and `tes up`")
        return 1
    models = client.model_states(url, stack.triton_admin_key())
    if not models:
        output.say(f"no model in the repository of Triton at {url} yet: deploy one with `tes run` or `tes demo`")
        return 0
    output.table(
        ["model", "version", "state", "reason"],
        [
            [
                entry.get("name", "?"),
                str(entry.get("version", "-")),
                entry.get("state", "UNAVAILABLE"),
                entry.get("reason", ""),
            ]
            for entry in models
        ],
        title=f"models on Triton at {url}",
        numeric=frozenset({1}),
    )
    return 0


def env() -> int:
    """Print the exports that point the prefect CLI at the stack: eval "$(tes env)"."""
    from flows import stack

    state = stack.read()
    if not state:
        output.error(NO_STACK)
        return 1
    for key, value in stack.prefect_env(state["prefect"]["api_url"]).items():
        print(f"export {key}={value}")  # plain print: the shell evaluates these lines
    return 0


def run(param: ParamPairs = None, params: ParamsJson = None) -> None:
    """Run the pipeline in-process, no servers needed (loads into Triton if the stack is up)."""
    from flows.params import parse_params
    from flows.pipeline import run_pipeline

    result = run_pipeline(parse_params(pipeline_overrides(params, param)))
    output.markdown(rundata.report_of(result))


def demo(param: ParamPairs = None, params: ParamsJson = None) -> int:
    """tes up, then the pipeline through `prefect deployment run --watch`, then how to query the model."""
    from flows import stack
    from flows.params import parse_params

    overrides = pipeline_overrides(params, param)
    parse_params(overrides)  # refuse bad parameters before starting anything
    state = stack.up(say=output.say)
    command = [
        str(Path(sys.executable).parent / "prefect"),
        "deployment",
        "run",
        f"{stack.FLOW_NAME}/{stack.DEPLOYMENT_NAME}",
        "--watch",
        *prefect_param_args(overrides),
    ]
    output.say("\n$ prefect " + shlex.join(command[1:]) + "\n")
    sys.stdout.flush()
    returncode = subprocess.call(command, env={**os.environ, **stack.prefect_env(state["prefect"]["api_url"])})
    if returncode != 0:
        log = paths.state_dir() / "prefect-runner.log"
        output.error(f"the flow run failed (exit code {returncode}); the runner's log is {log}")
        return returncode
    _print_demo_summary(state)
    return 0


def _print_stack(state: dict) -> None:
    triton_state, host = state["triton"], state["triton"]["host"]
    output.say(f"Prefect API  {state['prefect']['api_url']}   (UI {state['prefect']['ui']})")
    output.say(
        f"Triton       HTTP {host}:{triton_state['http_port']}   gRPC {host}:{triton_state['grpc_port']}"
        f"   metrics {host}:{triton_state['metrics_port']}"
    )
    output.say(f"Logs         {paths.state_dir()}")
    output.say('Stop it all with `tes down`; point the prefect CLI at it with `eval "$(tes env)"`.')


def _print_demo_summary(state: dict) -> None:
    from flows.cli.serve_commands import recipe_of_model
    from recipes.requests import is_byte_model, sample_inputs

    run_summary = rundata.summary()
    model, version = rundata.deployed_model(run_summary)
    host, http_port = state["triton"]["host"], state["triton"]["http_port"]
    recipe = recipe_of_model(model)
    tes, run_dir = str(Path(sys.executable).parent / "tes"), rundata.run_folder(run_summary)
    output.say(f"\nRun outputs : {run_dir}\nReport      : {run_dir}/report.md")
    output.say(f"Live model  : '{model}' version {version} on Triton at {host}:{http_port}")
    output.say("\nQuery it over HTTP (KServe v2 JSON):")
    output.say(
        f"  curl -s -X POST http://{host}:{http_port}/v2/models/{model}/infer -H 'Content-Type: application/json' "
        f"-d '{_kserve_json(sample_inputs(recipe))}'"
    )
    output.say("Query it over gRPC:")
    if is_byte_model(recipe):  # show the completion loop
        output.say(f"  {tes} complete 'def fib(n):' --model {model} --protocol grpc")
    else:
        output.say(f"  {tes} infer {model} --sample 0 --protocol grpc")
    output.say(f"\nThe stack stays up; stop it with `{tes} down`.")


def _kserve_json(inputs: dict) -> str:
    """A KServe v2 JSON request body for these arrays (floats rounded to keep the line short)."""
    from tritonclient.utils import np_to_triton_dtype

    return json.dumps(
        {
            "inputs": [
                {
                    "name": name,
                    "shape": list(array.shape),
                    "datatype": np_to_triton_dtype(array.dtype),
                    "data": [round(float(x), 4) if array.dtype.kind == "f" else int(x) for x in array.ravel()],
                }
                for name, array in inputs.items()
            ]
        }
    )
