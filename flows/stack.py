"""The local stack behind `tes up` / `tes down`: the Prefect API server (SQLite in `.tes/prefect`), a runner
that serves the `train-export-serve/default` deployment, and Triton. Their pids and ports live in
`.tes/stack.json`; every process runs in its own session so `tes down` can stop it with its children.
"""

from __future__ import annotations

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
from core.errors import ServerError
from core.files import atomic_write_json
from serving import client, repository, triton
from serving.triton import Endpoint

FLOW_NAME = "train-export-serve"
DEPLOYMENT_NAME = "default"
PREFECT_PREFERRED_PORT = 4200
TRITON_PREFERRED_PORTS = (8000, 8001, 8002)
STARTUP_TIMEOUT_S = 120.0


def stack_file() -> Path:
    return paths.state_dir() / "stack.json"


def read() -> dict | None:
    path = stack_file()
    return json.loads(path.read_text()) if path.is_file() else None


def triton_url(protocol: str = "http") -> str | None:
    """The running stack's Triton endpoint (`host:port`), or None when no stack is up."""
    state = read()
    if not state or not triton.pid_alive(state["triton"]["pid"]):
        return None
    server = state["triton"]
    return f"{server['host']}:{server[f'{protocol}_port']}"


def triton_admin_key() -> str | None:
    """The key the stack's Triton wants for its model-repository API (None when no stack is up)."""
    state = read()
    return state["triton"].get("admin_key") if state else None


def endpoint(http_url: str | None = None, grpc_url: str | None = None, admin_key: str | None = None) -> Endpoint | None:
    """The Triton to talk to: the given URLs (with the key for its repository API), else the stack's; None when
    neither is there. The stack's server pid is kept only when the stack's server is the one addressed."""
    state = read()
    alive = bool(state) and triton.pid_alive(state["triton"]["pid"])
    ours = triton.TritonProcess(**state["triton"]).endpoint() if alive else None
    if http_url is None:  # the stack's server; a given gRPC endpoint takes the place of its own
        if ours is None:
            return None
        return Endpoint(ours.http, grpc_url or ours.grpc, admin_key or ours.admin_key, ours.server_pid)
    if ours is not None and http_url == ours.http:
        return Endpoint(http_url, grpc_url or ours.grpc, admin_key or ours.admin_key, ours.server_pid)
    return Endpoint(http_url, grpc_url, admin_key)


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
    say: Callable[[str], None] = print,
) -> dict:
    """Start whatever of the stack is not running yet; returns the stack state."""
    state = read()
    if state and all(triton.pid_alive(state[part]["pid"]) for part in ("prefect", "runner", "triton")):
        say("the stack is already up")
        return state
    if state:
        say("part of a previous stack is gone: stopping the rest and starting afresh")
        down(say=lambda _: None)
    started: list[int] = []
    try:
        state = _start_all(host, prefect_port, http_port, grpc_port, metrics_port, say, started)
    except BaseException:
        for pid in reversed(started):
            triton.stop(pid)
        raise
    atomic_write_json(stack_file(), state)
    stack_file().chmod(0o600)  # it holds Triton's admin key
    return state


def _start_all(host, prefect_port, http_port, grpc_port, metrics_port, say, started: list[int]) -> dict:
    port = _pick_port(prefect_port, PREFECT_PREFERRED_PORT, host)
    api_url = f"http://{host}:{port}/api"
    env = prefect_env(api_url)
    prefect_bin = str(Path(sys.executable).parent / "prefect")
    say(f"starting the Prefect API server on {host}:{port} ...")
    server = _spawn([prefect_bin, "server", "start", "--host", host, "--port", str(port)], "prefect-server.log", env)
    started.append(server.pid)
    _wait_http(f"{api_url}/health", server, "the Prefect server", "prefect-server.log")

    say("starting the Prefect runner that serves train-export-serve/default ...")
    runner = _spawn([sys.executable, "-m", "flows.runner"], "prefect-runner.log", env)
    started.append(runner.pid)
    _wait_http(
        f"{api_url}/deployments/name/{FLOW_NAME}/{DEPLOYMENT_NAME}", runner, "the Prefect runner", "prefect-runner.log"
    )

    ports = [
        _pick_port(given, preferred, host)
        for given, preferred in zip((http_port, grpc_port, metrics_port), TRITON_PREFERRED_PORTS)
    ]
    say(f"starting Triton on {host} (HTTP {ports[0]}, gRPC {ports[1]}, metrics {ports[2]}) ...")
    repo = paths.resolve("model_repository")
    server_triton = triton.start(
        repo,
        paths.state_dir() / "triton",
        host=host,
        http_port=ports[0],
        grpc_port=ports[1],
        metrics_port=ports[2],
        admin_key=secrets.token_urlsafe(24),
    )
    started.append(server_triton.pid)
    loaded = _load_existing(server_triton.http_url, repo, server_triton.admin_key)
    if loaded:
        say(f"loaded models already in {repo}: {', '.join(loaded)}")
    return {
        "prefect": {"pid": server.pid, "port": port, "api_url": api_url, "ui": f"http://{host}:{port}"},
        "runner": {"pid": runner.pid},
        "triton": server_triton.to_dict(),
    }


def _load_existing(url: str, repo: Path, admin_key: str | None) -> list[str]:
    """Serve again what earlier runs deployed (explicit model control starts with nothing loaded)."""
    loaded = []
    for folder in sorted(repo.iterdir()) if repo.is_dir() else []:
        if folder.is_dir() and (folder / "config.pbtxt").is_file() and repository.versions(folder):
            try:
                client.load_model(url, folder.name, admin_key=admin_key)
                loaded.append(folder.name)
            except ServerError as error:
                print(f"warning: {error}", file=sys.stderr)
    return loaded


def down(say: Callable[[str], None] = print) -> list[str]:
    """Stop the runner, Triton and the Prefect server; returns what was stopped."""
    state = read()
    if not state:
        say("nothing to stop: no stack is up")
        return []
    stopped = []
    for part in ("runner", "triton", "prefect"):
        if part in state and triton.stop(state[part]["pid"]):
            stopped.append(part)
    stack_file().unlink(missing_ok=True)
    say(f"stopped: {', '.join(stopped) or 'nothing was running'}")
    return stopped
