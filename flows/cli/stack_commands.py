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
Replicas = Annotated[
    Optional[int],
    typer.Option(
        min=1,
        max=32,
        show_default="as before, else 1",
        help="Triton processes over the one repository, each on its own ports (the first on the ports above).",
    ),
]
RepositoryOption = Annotated[
    Optional[str],
    typer.Option(
        "--repository",
        metavar="FOLDER|s3://BUCKET/PREFIX",
        show_default="as before, else model_repository",
        help="The model repository Triton serves: a folder, or S3 (credentials: boto3's chain, as for `aws`).",
    ),
]
S3Endpoint = Annotated[
    Optional[str],
    typer.Option(
        metavar="http(s)://HOST:PORT",
        show_default="AWS_ENDPOINT_URL, else AWS",
        help="The S3-compatible store (MinIO, Ceph...) of an s3:// repository.",
    ),
]


def up(
    prefect_port: PortOption = None,
    http_port: PortOption = None,
    grpc_port: PortOption = None,
    metrics_port: PortOption = None,
    replicas: Replicas = None,
    repository: RepositoryOption = None,
    s3_endpoint: S3Endpoint = None,
) -> None:
    """Start the Prefect server, the deployment runner and Triton (loopback only); only what is not running."""
    from flows import stack

    state = stack.up(
        prefect_port=prefect_port,
        http_port=http_port,
        grpc_port=grpc_port,
        metrics_port=metrics_port,
        replicas=replicas,
        repository=repository,
        s3_endpoint=s3_endpoint,
        say=output.say,
    )
    _print_stack(state)


def down() -> None:
    """Stop everything `tes up` started."""
    from flows import stack

    stack.down(say=output.say)


def status() -> int:
    """What is running, and every model version each Triton replica knows with its state."""
    from flows import stack
    from serving import triton

    state = stack.read()
    if not state:
        output.error(NO_STACK)
        return 1
    servers = _replica_names(state)
    parts = [(part, state[part]) for part in ("prefect", "runner") if part in state] + list(servers.items())
    output.table(
        ["process", "pid", "address", "state"],
        [
            [
                part,
                str(entry["pid"]),
                f"{entry['host']}:{entry['http_port']}" if "http_port" in entry else entry.get("api_url", ""),
                "running" if triton.pid_alive(entry["pid"]) else "GONE",
            ]
            for part, entry in parts
        ],
        title=f"stack (repository {stack.repository()})",
        numeric=frozenset({1}),
    )
    alive = {name: entry for name, entry in servers.items() if triton.pid_alive(entry["pid"])}
    if not alive:
        output.error("Triton is not running: `tes up` starts it again")
        return 1
    rows = _model_rows(alive)
    if rows:
        output.table(["replica", "model", "version", "state", "reason"], rows, title="models on each Triton replica")
    else:
        output.say("no model in the repository yet: deploy one with `tes run` or `tes demo`")
    gone = sorted(set(servers) - set(alive))
    if gone:
        output.error(f"{', '.join(gone)} not running: `tes up` starts what is gone and leaves the rest serving")
        return 1
    return 0


def _replica_names(state: dict) -> dict[str, dict]:
    from flows import stack

    known = stack.replicas(state)
    return {(f"triton-{n}" if len(known) > 1 else "triton"): entry for n, entry in enumerate(known, 1)}


def _model_rows(alive: dict[str, dict]) -> list[list[str]]:
    """replica, model, version, state, reason: every version each live replica knows."""
    from core.errors import ServerError
    from serving import client

    rows = []
    for name, entry in alive.items():
        try:
            models = client.model_states(f"{entry['host']}:{entry['http_port']}", entry.get("admin_key"))
        except ServerError as error:
            rows.append([name, "-", "-", "UNREACHABLE", str(error)])
            continue
        for model in models:
            rows.append(
                [
                    name,
                    model.get("name", "?"),
                    str(model.get("version", "-")),
                    model.get("state", "UNAVAILABLE"),
                    model.get("reason", ""),
                ]
            )
    return rows


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


ResumeOption = Annotated[
    Optional[str],
    typer.Option(
        "--resume",
        metavar="RUN",
        show_default=False,
        help="Continue a failed or killed run in its own folder (a run folder, `last`: the newest unfinished "
        "one, or s3://bucket/prefix/RUN_ID of an S3 runs_dir); its completed stages are reused after their sha256 "
        "are checked, training resumes from its checkpoint.",
    ),
]


def run(param: ParamPairs = None, params: ParamsJson = None, resume: ResumeOption = None) -> None:
    """Run the pipeline in-process, no servers needed (loads into Triton if the stack is up)."""
    from core.errors import TesError
    from flows.params import parse_params
    from flows.pipeline import resumable_run, run_pipeline

    if resume is None:
        result = run_pipeline(parse_params(_with_stack_repository(pipeline_overrides(params, param))))
    else:
        if param or params:
            raise TesError("--resume continues a run with the parameters it started with: leave out --param/--params")
        resumed_params, folder = resumable_run(resume)
        result = run_pipeline(resumed_params, resume=folder)
    output.markdown(rundata.report_of(result))


def demo(param: ParamPairs = None, params: ParamsJson = None) -> int:
    """tes up, then the pipeline through `prefect deployment run --watch`, then how to query the model."""
    from flows import stack
    from flows.params import parse_params

    parse_params(pipeline_overrides(params, param))  # refuse bad parameters before starting anything
    state = stack.up(say=output.say)
    overrides = _with_stack_repository(pipeline_overrides(params, param))
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


def _with_stack_repository(overrides: dict) -> dict:
    """The run deploys where the stack's Triton reads, unless told otherwise (it differs from the default when
    `tes up --repository` named S3 or another folder)."""
    from flows import stack

    served = stack.repository()
    if "repository" in overrides or not served or served == str(paths.resolve("model_repository")):
        return overrides
    return {**overrides, "repository": served}


def _print_stack(state: dict) -> None:
    from flows import stack

    output.say(f"Prefect API  {state['prefect']['api_url']}   (UI {state['prefect']['ui']})")
    for name, server in _replica_names(state).items():
        host = server["host"]
        output.say(
            f"{'Triton' if name == 'triton' else name:<12} HTTP {host}:{server['http_port']}   gRPC "
            f"{host}:{server['grpc_port']}   metrics {host}:{server['metrics_port']}"
        )
    output.say(f"Repository   {stack.repository()}")
    output.say(f"Logs         {paths.state_dir()}")
    output.say('Stop it all with `tes down`; point the prefect CLI at it with `eval "$(tes env)"`.')


def _print_demo_summary(state: dict) -> None:
    from flows.cli.serve_commands import recipe_of_model
    from recipes.requests import is_byte_model, sample_inputs

    run_summary = rundata.summary()
    model, version = rundata.deployed_model(run_summary)
    first = state.get("replicas", [state["triton"]])[0]
    host, http_port = first["host"], first["http_port"]
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
