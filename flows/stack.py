"""The local stack behind `tes up` / `tes down`: the Prefect API server (SQLite in `.tes/prefect`), a worker of the
process work pool `tes-process` that runs the `train-export-serve/default` and `benchmark/default` deployments
(`flows/runner.py`; called "runner" in `.tes/stack.json` and `tes status`), and one or more Triton replicas over one
model repository (a folder, or S3). Their pids and ports live in `.tes/stack.json` ("replicas": every Triton;
"triton": the first, as before replicas); every process runs in its own session so `tes down` can stop it with its
children. `tes up` starts only what is not running, so a healthy part keeps serving.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

from core import paths
from core.errors import ConfigError, ServerError, TesError
from core.files import atomic_write_json
from serving import s3_repository, triton
from serving.s3_repository import S3Location
from serving.targets import LocalTarget, S3Target, Target, open_target
from serving.triton import Endpoint

FLOW_NAME = "train-export-serve"
DEPLOYMENT_NAME = "default"
WORK_POOL = "tes-process"  # a Prefect process work pool: `prefect worker start --pool tes-process` joins it
PREFECT_PREFERRED_PORT = 4200
TRITON_PREFERRED_PORTS = (8000, 8001, 8002)
STARTUP_TIMEOUT_S = 120.0
DEFAULT_REPOSITORY = "model_repository"


def stack_file() -> Path:
    return paths.state_dir() / "stack.json"


def read() -> dict | None:
    path = stack_file()
    return json.loads(path.read_text()) if path.is_file() else None


def replicas(state: dict | None) -> list[dict]:
    """Every Triton replica the state records (a stack from before replicas has one, under "triton")."""
    if not state:
        return []
    return state.get("replicas") or ([state["triton"]] if "triton" in state else [])


def _alive(state: dict | None) -> list[triton.TritonProcess]:
    return [triton.TritonProcess(**entry) for entry in replicas(state) if triton.pid_alive(entry["pid"])]


def triton_url(protocol: str = "http") -> str | None:
    """The running stack's (first live) Triton endpoint (`host:port`), or None when no stack is up."""
    alive = _alive(read())
    return f"{alive[0].host}:{getattr(alive[0], f'{protocol}_port')}" if alive else None


def triton_admin_key() -> str | None:
    """The key the stack's Triton wants for its model-repository API (None when no stack is up)."""
    known = replicas(read())
    return known[0].get("admin_key") if known else None


def repository() -> str | None:
    """The repository the stack's Triton replicas read (a folder or an s3:// URL), when a stack is up."""
    state = read()
    return (state.get("repository") or replicas(state)[0]["repository"]) if replicas(state) else None


def endpoint(http_url: str | None = None, grpc_url: str | None = None, admin_key: str | None = None) -> Endpoint | None:
    """The Triton to talk to: the given URLs (with the key for its repository API), else the stack's, with every
    live replica; None when neither is there. The stack's key, pid and repository are kept only when the stack's
    server is the one addressed."""
    ours = [server.endpoint() for server in _alive(read())]
    if http_url is None:  # the stack's servers; a given gRPC endpoint takes the place of the first one's own
        if not ours:
            return None
        first = dataclasses.replace(ours[0], grpc=grpc_url or ours[0].grpc, admin_key=admin_key or ours[0].admin_key)
        return first if grpc_url or len(ours) == 1 else dataclasses.replace(first, replicas=(first, *ours[1:]))
    match = next((server for server in ours if server.http == http_url), None)
    if match is not None:
        return dataclasses.replace(match, grpc=grpc_url or match.grpc, admin_key=admin_key or match.admin_key)
    return Endpoint(http_url, grpc_url, admin_key)


def endpoints(http_urls: list[str], grpc_urls: list[str], admin_key: str | None = None) -> Endpoint | None:
    """Several servers given by URL (gRPC URLs pair with HTTP URLs in order), as one endpoint with replicas; one
    URL or none: `endpoint`."""
    if len(http_urls) <= 1:
        return endpoint(http_urls[0] if http_urls else None, grpc_urls[0] if grpc_urls else None, admin_key)
    if grpc_urls and len(grpc_urls) != len(http_urls):
        raise ConfigError(
            [f"--grpc-url: {len(grpc_urls)} given for {len(http_urls)} --url; give one per --url, in the same order"],
            where="endpoints",
        )
    servers = [endpoint(url, grpc, admin_key) for url, grpc in zip(http_urls, grpc_urls or [None] * len(http_urls))]
    return dataclasses.replace(servers[0], replicas=tuple(servers))


def prefect_env(api_url: str) -> dict[str, str]:
    """Settings every Prefect process of the stack shares (see ../shared/notes/prefect.md for why)."""
    return {
        "PREFECT_API_URL": api_url,
        "PREFECT_HOME": str(paths.state_dir() / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "PREFECT_SERVER_LOGS_STREAM_OUT_ENABLED": "true",
        "PREFECT_SERVER_LOGS_STREAM_PUBLISHING_ENABLED": "true",
        "PREFECT_RUNNER_POLL_FREQUENCY": "1",
        "PREFECT_WORKER_QUERY_SECONDS": "1",  # a submitted run starts within about a second
        "PREFECT_WORKER_PREFETCH_SECONDS": "1",
        "PREFECT_LOGGING_EXTRA_LOGGERS": "recipes,training,export,serving,bench,accounting,flows",
        "TES_HOME": str(paths.home()),
    }


def _pick_port(preferred: int | None, fallback_preferred: int, host: str) -> int:
    if preferred:
        return preferred
    return fallback_preferred if triton.port_is_free(fallback_preferred, host) else triton.free_port(host)


def _spawn(command: list[str], log_name: str, env: dict[str, str]) -> subprocess.Popen:
    log_path = paths.state_dir() / log_name
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **env},
            cwd=paths.home(),
            start_new_session=True,
        )


def _wait_http(
    url: str, process: subprocess.Popen, what: str, log_name: str, timeout_s: float = STARTUP_TIMEOUT_S
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServerError(
                f"{what} exited with code {process.returncode} while starting; log:\n"
                f"{triton.log_tail(paths.state_dir() / log_name)}"
            )
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        time.sleep(0.3)
    raise ServerError(f"{what} did not answer {url} within {timeout_s:.0f} s; log: {paths.state_dir() / log_name}")


def up(
    *,
    host: str = "127.0.0.1",
    prefect_port: int | None = None,
    http_port: int | None = None,
    grpc_port: int | None = None,
    metrics_port: int | None = None,
    replicas: int | None = None,
    repository: str | None = None,
    s3_endpoint: str | None = None,
    say: Callable[[str], None] = print,
) -> dict:
    """Start whatever of the stack is not running: a part that is up is left alone. `replicas` Triton processes
    (default: as many as before, else 1) serve `repository` (a folder, or s3://bucket/prefix with `s3_endpoint` or
    AWS_ENDPOINT_URL; default: as before, else model_repository). Returns the stack state."""
    state = read() or {}
    target, endpoint_url = _repository(state, repository, s3_endpoint)
    count = replicas or len(_recorded_replicas(state)) or 1
    started: list[int] = []
    try:
        fresh = _ensure_prefect(state, host, prefect_port, say, started)
        _ensure_runner(state, fresh, endpoint_url, say, started)
        ports = (http_port, grpc_port, metrics_port)
        servers = _ensure_replicas(state, target, count, host, ports, say, started)
    except BaseException:
        for pid in reversed(started):
            triton.stop(pid)
        raise
    if not started and len(servers) == len(_recorded_replicas(state)):
        say("the stack is already up")
    for extra in _recorded_replicas(state)[count:]:
        if triton.stop(extra["pid"]):
            say(f"stopped Triton replica on {extra['host']}:{extra['http_port']} (--replicas {count})")
    state |= {"repository": target.url, "s3_endpoint": endpoint_url, "triton": servers[0], "replicas": servers}
    atomic_write_json(stack_file(), state)
    stack_file().chmod(0o600)  # it holds Triton's admin key
    return state


def _recorded_replicas(state: dict) -> list[dict]:
    return replicas(state)


def _repository(state: dict, given: str | None, s3_endpoint: str | None) -> tuple[Target, str | None]:
    """The repository the replicas serve and the S3 endpoint boto3 uses for it, checked before anything starts:
    a stack whose Triton is up keeps its repository."""
    if s3_endpoint and not (given or state.get("repository") or "").startswith("s3://"):
        raise ConfigError(
            [f"--s3-endpoint {s3_endpoint}: only for an s3:// repository; add --repository s3://bucket/prefix"],
            where="tes up",
        )
    if given and given.startswith("s3://"):
        location = S3Location.parse(given, endpoint_url=s3_endpoint)
        target: Target = S3Target(location)
    elif given:
        target = LocalTarget(given)
    elif state.get("repository"):
        target = open_target(state["repository"])
    else:
        target = LocalTarget(DEFAULT_REPOSITORY)
    running = [entry for entry in _recorded_replicas(state) if triton.pid_alive(entry["pid"])]
    if running and not target.same_as(running[0]["repository"]):
        raise ServerError(
            f"the stack's Triton serves {running[0]['repository']}; stop the stack (`tes down`) before serving "
            f"{target.url}"
        )
    endpoint_url = target.location.endpoint_url if isinstance(target, S3Target) else None
    return target, endpoint_url


def _ensure_prefect(state: dict, host: str, port: int | None, say, started: list[int]) -> bool:
    """The Prefect API server, started unless it runs; True when it was (re)started."""
    known = state.get("prefect")
    if known and triton.pid_alive(known["pid"]):
        return False
    if known:
        say("the Prefect server is gone: starting it again")
        port = port or (known["port"] if triton.port_is_free(known["port"], host) else None)
    port = _pick_port(port, PREFECT_PREFERRED_PORT, host)
    api_url = f"http://{host}:{port}/api"
    prefect_bin = str(Path(sys.executable).parent / "prefect")
    say(f"starting the Prefect API server on {host}:{port} ...")
    server = _spawn(
        [prefect_bin, "server", "start", "--host", host, "--port", str(port)],
        "prefect-server.log",
        prefect_env(api_url),
    )
    started.append(server.pid)
    _wait_http(f"{api_url}/health", server, "the Prefect server", "prefect-server.log")
    state["prefect"] = {"pid": server.pid, "port": port, "api_url": api_url, "ui": f"http://{host}:{port}"}
    return True


def _ensure_runner(state: dict, fresh_server: bool, s3_endpoint: str | None, say, started: list[int]) -> None:
    """The runner that serves the deployment, started unless it runs (restarted with a restarted server)."""
    known = state.get("runner")
    if known and triton.pid_alive(known["pid"]):
        if not fresh_server:
            return
        triton.stop(known["pid"])
    elif known:
        say("the Prefect runner is gone: starting it again")
    api_url = state["prefect"]["api_url"]
    env = prefect_env(api_url) | ({"AWS_ENDPOINT_URL": s3_endpoint} if s3_endpoint else {})
    say(
        f"starting a Prefect worker of the work pool {WORK_POOL} "
        "(deployments train-export-serve/default, benchmark/default) ..."
    )
    runner = _spawn([sys.executable, "-m", "flows.runner"], "prefect-runner.log", env)
    started.append(runner.pid)
    _wait_http(
        f"{api_url}/deployments/name/{FLOW_NAME}/{DEPLOYMENT_NAME}", runner, "the Prefect runner", "prefect-runner.log"
    )
    state["runner"] = {"pid": runner.pid}


def _ensure_replicas(
    state: dict, target: Target, count: int, host: str, ports: tuple, say, started: list[int]
) -> list[dict]:
    """`count` Triton replicas over `target`: those running are kept, the others started (a gone one on its old
    ports when they are free) and given every model of the repository."""
    known = _recorded_replicas(state)
    admin_key = next((entry["admin_key"] for entry in known if entry.get("admin_key")), None)
    admin_key = admin_key or secrets.token_urlsafe(24)
    env = {}
    if isinstance(target, S3Target):
        s3_repository.ensure_repository(target.location)  # Triton refuses to start on an S3 path with no object
        env = s3_repository.server_environment(target.location)
    servers = []
    for number in range(1, count + 1):
        old = known[number - 1] if number <= len(known) else None
        if old and triton.pid_alive(old["pid"]):
            servers.append(old)
            continue
        wanted = _replica_ports(old, number, host, ports)
        what = f"Triton replica {number} of {count}" if count > 1 else "Triton"
        say(
            ("the " + what + " is gone: starting it again" if old else f"starting {what}")
            + f" on {host} (HTTP {wanted[0]}, gRPC {wanted[1]}, metrics {wanted[2]}) ..."
        )
        server = triton.start(
            target.url,
            paths.state_dir() / "triton",
            host=host,
            http_port=wanted[0],
            grpc_port=wanted[1],
            metrics_port=wanted[2],
            admin_key=admin_key,
            env=env,
        )
        started.append(server.pid)
        loaded = _load_existing(server, target)
        if loaded:
            say(f"loaded models already in {target.url}: {', '.join(loaded)}")
        servers.append(server.to_dict())
    return servers


def _replica_ports(old: dict | None, number: int, host: str, given: tuple) -> list[int]:
    """A restarted replica keeps its ports when they are free; the first takes the given (else usual) ports, the
    others free ones."""
    if old and all(triton.port_is_free(old[f"{kind}_port"], host) for kind in ("http", "grpc", "metrics")):
        return [old["http_port"], old["grpc_port"], old["metrics_port"]]
    if number == 1:
        return [_pick_port(port, preferred, host) for port, preferred in zip(given, TRITON_PREFERRED_PORTS)]
    return [triton.free_port(host) for _ in range(3)]


def _load_existing(server: triton.TritonProcess, target: Target) -> list[str]:
    """Serve again what earlier runs deployed (explicit model control starts with nothing loaded)."""
    loaded = []
    for model in target.model_names():
        try:
            target.load(server.http_url, model, server.admin_key)
            loaded.append(model)
        except TesError as error:
            print(f"warning: {error}", file=sys.stderr)
    return loaded


def down(say: Callable[[str], None] = print) -> list[str]:
    """Stop the runner, every Triton replica and the Prefect server; returns what was stopped."""
    state = read()
    if not state:
        say("nothing to stop: no stack is up")
        return []
    stopped = []
    parts = [("runner", state.get("runner"))]
    parts += [(f"triton-{n}" if len(replicas(state)) > 1 else "triton", r) for n, r in enumerate(replicas(state), 1)]
    for part, entry in [*parts, ("prefect", state.get("prefect"))]:
        if entry and triton.stop(entry["pid"]):
            stopped.append(part)
    stack_file().unlink(missing_ok=True)
    say(f"stopped: {', '.join(stopped) or 'nothing was running'}")
    return stopped
