"""Rolling deploys under steady load: two Triton replicas over one S3 repository (moto's S3 server), Poisson load at
`--rate` requests/s spread over both (gRPC, every answer checked against the two models' own answers), and a deploy
that switches the served model, `--rounds` times.

    .venv/bin/python benchmarks/rollout.py --rounds 3 --rate 100

Per round: failed requests during the deploy (goal 0), seconds from the deploy's start until both replicas serve the
new version (watched from outside, every 50 ms), the deploy's own duration, and p50/p99 during the deploy against
the steady period before it. Client, store and both servers share this machine, so the p99 ratio is the figure to
compare, not the absolute milliseconds.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from _common import WORK

from bench import loadgen
from core.errors import InferenceError
from core.runtimes import open_session
from export.onnx_export import ExportConfig, export_onnx
from recipes import build_recipe
from serving import client, s3_repository, triton
from serving.deploy import Deployable, deploy
from serving.repository import ServingConfig
from serving.s3_repository import S3Location

SERVING = ServingConfig(max_batch_size=16, value_ranges={"image": (0.0, 16.0)})


@contextlib.contextmanager
def moto_store() -> Iterator[str]:
    """moto's S3 server on a free loopback port with bucket `models`; its endpoint. Any credentials do."""
    import boto3

    port = triton.free_port()
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    log = open(WORK / "moto.log", "ab")
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        while triton.port_is_free(port):
            time.sleep(0.1)
        endpoint = f"http://127.0.0.1:{port}"
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="models")
        yield endpoint
    finally:
        process.terminate()
        process.wait(10)
        log.close()


def two_models() -> tuple[dict[str, str], list[dict], dict[str, list[np.ndarray]]]:
    """Two digits-cnn ONNX files with different weights, held-out inputs, and each file's answer to each input."""
    recipe = build_recipe("digits-cnn", {})
    files = {}
    for seed, name in ((1, "a"), (2, "b")):
        torch.manual_seed(seed)
        files[name] = export_onnx(recipe, recipe.build_model(), WORK / name, ExportConfig()).output.onnx
    inputs = [batch.inputs for batch in recipe.eval_batches(1, 64)]
    answers = {name: [open_session(path).run(None, case)[0] for case in inputs] for name, path in files.items()}
    return files, inputs, answers


def watch_until_serving(servers, version: str, started: float, found: dict) -> None:
    """Record, per replica, the seconds from `started` until `digits-fp32` `version` is READY there."""
    while len(found) < len(servers):
        for server in servers:
            if server.http_url not in found:
                states = client.model_states(server.http_url)
                if any(
                    s["name"] == "digits-fp32" and s["version"] == version and s["state"] == "READY" for s in states
                ):
                    found[server.http_url] = time.monotonic() - started
        time.sleep(0.05)


def percentiles(latencies: list[float]) -> str:
    if not latencies:
        return "no requests"
    p50, p99 = np.percentile(latencies, [50, 99])
    return f"p50 {p50:6.2f} ms  p99 {p99:7.2f} ms  ({len(latencies)} requests)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rate", type=float, default=100.0, help="Poisson requests/s over both replicas")
    parser.add_argument("--steady-s", type=float, default=8.0, help="steady load before each deploy")
    parser.add_argument(
        "--model", default="digits", choices=["digits", "digits-fp32"], help="the alias, or the variant behind it"
    )
    args = parser.parse_args()
    files, inputs, answers = two_models()
    with moto_store() as endpoint:
        location = S3Location.parse("s3://models/rollout", endpoint_url=endpoint)
        s3_repository.ensure_repository(location)
        env, servers = s3_repository.server_environment(location), []
        try:
            for number in range(2):
                servers.append(triton.start(location.triton_url(), WORK / f"triton-{number}", env=env))
            first = servers[0].endpoint()
            replicas = replace(first, replicas=(first, servers[1].endpoint()))
            rounds(args, location, servers, replicas, files, inputs, answers)
        finally:
            for server in servers:
                triton.stop(server.pid)


def deployer(commands, location_url: str, replicas, files: dict[str, str]) -> None:
    """A child process that deploys model `name` for each name it receives: the deploy's own Python work (hashing,
    S3 requests, probe sessions) then never holds the load generator's GIL, which would delay its sends."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    while (name := commands.recv()) is not None:
        started = time.monotonic()
        result = deploy(location_url, "digits", [Deployable("fp32", files[name])], "fp32", SERVING, {}, replicas)
        commands.send((result.status.value, time.monotonic() - started))


def rounds(args, location, servers, replicas, files, inputs, answers) -> None:
    ours, theirs = multiprocessing.get_context("spawn").Pipe()
    child = multiprocessing.get_context("spawn").Process(
        target=deployer, args=(theirs, location.triton_url(), replicas, files), daemon=True
    )
    child.start()
    try:
        _rounds(args, location, servers, files, inputs, answers, ours)
    finally:
        ours.send(None)
        child.join(30)


def _rounds(args, location, servers, files, inputs, answers, deployer_pipe) -> None:
    def run_deploy(name: str) -> tuple[str, float]:
        deployer_pipe.send(name)
        return deployer_pipe.recv()

    def check(case: int, outputs: dict) -> None:
        if not any(np.allclose(outputs["logits"], answers[n][case], rtol=0, atol=1e-4) for n in answers):
            raise InferenceError(f"the answer to input {case} is neither model's")

    run_deploy("a")
    print(
        f"2 replicas over {location.triton_url()}; Poisson load {args.rate:.0f}/s on '{args.model}' over both (gRPC)",
        flush=True,
    )
    urls = [server.grpc_url for server in servers]
    with loadgen.running_load(urls, "grpc", args.model, inputs, rate=args.rate, check=check) as load:
        for number in range(1, args.rounds + 1):
            time.sleep(args.steady_s)
            before, before_errors, before_late = load.drain()
            name = "b" if number % 2 else "a"
            found, started = {}, time.monotonic()
            watcher = threading.Thread(
                target=watch_until_serving, args=(servers, str(number + 1), started, found), daemon=True
            )
            watcher.start()
            status, deploy_s = run_deploy(name)
            watcher.join(30)
            during, during_errors, during_late = load.drain()
            p99_ratio = np.percentile(during, 99) / np.percentile(before, 99) if during and before else float("nan")
            print(
                f"round {number}: deploy to v{number + 1} ({'a->b' if name == 'b' else 'b->a'}): "
                f"failed requests during it {during_errors} (before: {before_errors}); both replicas serving the "
                f"new version {max(found.values()):.2f} s after the deploy started (each: "
                f"{', '.join(f'{s:.2f}' for s in found.values())}); deploy took {deploy_s:.2f} s "
                f"(status {status})\n"
                f"  before: {percentiles(before)}, {before_late} sent > 2 ms late\n"
                f"  during: {percentiles(during)}, {during_late} sent > 2 ms late   p99 during/before {p99_ratio:.2f}",
                flush=True,
            )
    if load.first_error:
        print(f"first error: {load.first_error}")


if __name__ == "__main__":
    main()
