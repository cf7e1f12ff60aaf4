"""Start, watch and stop the `tritonserver` bundled in the `nvidia-pytriton` wheel.

The server runs as a child process in its own session, bound to 127.0.0.1 on free (or given) ports, with
explicit model control, strict readiness and no automatic config completion; its log goes to a file.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from core.errors import ServerError

READY_TIMEOUT_S = 60.0
ADMIN_HEADER = "tes-admin-key"
# APIs that change or expose the server beyond inference: they answer only with the admin key in ADMIN_HEADER
RESTRICTED_APIS = ("model-repository", "shared-memory", "trace", "logging")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: TIME_WAIT is no obstacle
        try:
            probe.bind((host, port))
        except OSError:
            return False
        return True


def _pytriton_paths() -> tuple[Path, Path]:
    try:
        import pytriton
    except ImportError as error:
        raise ServerError("nvidia-pytriton is not installed; run `make install` (it ships tritonserver)") from error
    package = Path(pytriton.__file__).parent
    return package / "tritonserver", package.parent / "nvidia_pytriton.libs"


def prepare_backends(destination: Path) -> Path:
    """A backend folder with the Python backend and the stub built for this interpreter's version."""
    dist, _ = _pytriton_paths()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = dist / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise ServerError(f"the bundled Triton has no Python-backend stub for Python {version} (looked for {stub})")
    python_backend = destination / "python"
    python_backend.mkdir(parents=True, exist_ok=True)
    for source in [*(dist / "backends" / "python").glob("*.*"), stub]:
        target = python_backend / source.name
        if not target.exists() or target.stat().st_size != source.stat().st_size:
            shutil.copy2(source, target)
    return destination


def server_env() -> dict[str, str]:
    """The Python-backend stub embeds libpython: this environment's bin/ must come first on PATH."""
    _, libs = _pytriton_paths()
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(libs), env.get("LD_LIBRARY_PATH", "")) if p)
    return env


@dataclass
class TritonProcess:
    pid: int
    http_port: int
    grpc_port: int
    metrics_port: int
    repository: str
    log_path: str
    host: str = "127.0.0.1"
    admin_key: str | None = None  # None: the restricted APIs are open (tests); `tes up` always sets one

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    def to_dict(self) -> dict:
        return asdict(self)

    def endpoint(self) -> Endpoint:
        return Endpoint(self.http_url, self.grpc_url, self.admin_key, self.pid, repository=self.repository)


@dataclass(frozen=True)
class Endpoint:
    """The Triton a run talks to, resolved once when the run starts and passed to every stage that needs it. With
    several replicas over one repository, it is the first, and `replicas` lists them all (it first)."""

    http: str  # host:port
    grpc: str | None = None
    admin_key: str | None = None  # for the model-repository API, when the server restricts it
    server_pid: int | None = None  # the server's process when it runs on this machine (its CPU time is accounted)
    replicas: tuple[Endpoint, ...] = ()  # every replica, this one first; () when it is the only server
    repository: str | None = None  # what the server reads (a folder or an s3:// URL), when known

    @property
    def urls(self) -> dict[str, str]:
        """protocol -> host:port, for the protocols this endpoint has."""
        return {"http": self.http, **({"grpc": self.grpc} if self.grpc else {})}

    def every(self) -> tuple[Endpoint, ...]:
        """Every replica (just this endpoint when there are no others)."""
        return self.replicas or (self,)


def _is_ready(http_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://{http_url}/v2/health/ready", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


def log_tail(log_path: str | Path, lines: int = 30) -> str:
    path = Path(log_path)
    if not path.is_file():
        return "(no log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def start(
    repository: str | Path,
    work_dir: str | Path,
    *,
    host: str = "127.0.0.1",
    http_port: int | None = None,
    grpc_port: int | None = None,
    metrics_port: int | None = None,
    extra_args: list[str] | None = None,
    ready_timeout_s: float = READY_TIMEOUT_S,
    admin_key: str | None = None,
    env: dict[str, str] | None = None,
) -> TritonProcess:
    """Start tritonserver and wait until it is ready; on failure, stop it and raise with its log tail.

    `repository` is a local folder (created if missing) or Triton's S3 URL, `s3://bucket/prefix` or
    `s3://host:port/bucket/prefix` (`S3Location.triton_url()`), passed through as written. For S3, `env` carries
    the credentials (`s3_repository.server_environment`), and Triton copies each model it loads into a folder under
    `work_dir` (`TRITON_AWS_MOUNT_DIRECTORY`) unless `env` names another.

    With `admin_key`, the model-repository, shared-memory, trace and logging APIs of both protocols answer only
    requests that carry it in the `tes-admin-key` header; health, metadata and inference stay open."""
    dist, _ = _pytriton_paths()
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    repository = _repository_argument(repository)
    ports = {
        "http": http_port or free_port(host),
        "grpc": grpc_port or free_port(host),
        "metrics": metrics_port or free_port(host),
    }
    busy = [f"{kind} port {port}" for kind, port in ports.items() if not port_is_free(port, host)]
    if busy:
        raise ServerError(
            f"cannot start Triton: {', '.join(busy)} already in use on {host}; pick other ports or stop what holds them"
        )
    log_path = work_dir / f"tritonserver-{ports['http']}.log"
    command = [
        str(dist / "bin" / "tritonserver"),
        f"--model-repository={repository}",
        *_server_args(host, ports, prepare_backends(work_dir / "backends")),
        *(_restriction_args(admin_key) if admin_key else []),
        *(extra_args or []),
    ]
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**server_env(), **_s3_env(repository, work_dir, ports["http"]), **(env or {})},
            start_new_session=True,
        )
    server = TritonProcess(
        process.pid, ports["http"], ports["grpc"], ports["metrics"], repository, str(log_path), host, admin_key
    )
    _wait_ready(server, process, ready_timeout_s)
    return server


def is_s3_url(repository: str | Path) -> bool:
    return isinstance(repository, str) and repository.startswith("s3://")


def _repository_argument(repository: str | Path) -> str:
    """What `--model-repository=` gets: an S3 URL as written (Path() would fold its '//'), else the absolute folder,
    created if missing."""
    if is_s3_url(repository):
        return str(repository)
    folder = Path(repository).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return str(folder)


def _s3_env(repository: str, work_dir: Path, http_port: int) -> dict[str, str]:
    """Where this server copies the models it loads from S3: its own folder, so replicas never share one."""
    if not is_s3_url(repository):
        return {}
    mount = work_dir / f"s3-mount-{http_port}"
    mount.mkdir(parents=True, exist_ok=True)
    return {"TRITON_AWS_MOUNT_DIRECTORY": str(mount)}


def _server_args(host: str, ports: dict[str, int], backends: Path) -> list[str]:
    """Explicit model control, strict readiness, no config auto-completion; every endpoint on `host` only."""
    return [
        "--model-control-mode=explicit",
        "--strict-readiness=true",
        "--disable-auto-complete-config",
        "--exit-timeout-secs=5",
        f"--backend-directory={backends}",
        f"--backend-config=python,shm-region-prefix-name=tes{ports['http']}_",
        *(
            f"--{kind}-{part}={value}"
            for kind, port in ports.items()
            for part, value in (("address", host), ("port", port))
        ),
        "--allow-gpu-metrics=false",
    ]


def _wait_ready(server: TritonProcess, process: subprocess.Popen, timeout_s: float) -> None:
    """Until the server says it is ready; if it exits or times out first, stop it and raise with its log tail."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServerError(
                f"tritonserver exited with code {process.returncode} while starting; log "
                f"{server.log_path}:\n{log_tail(server.log_path)}"
            )
        if _is_ready(server.http_url):
            return
        time.sleep(0.2)
    stop(server.pid)
    raise ServerError(
        f"tritonserver was not ready after {timeout_s:.0f} s; log {server.log_path}:\n{log_tail(server.log_path)}"
    )


def _restriction_args(admin_key: str) -> list[str]:
    if not admin_key.replace("-", "").replace("_", "").isalnum():
        raise ServerError("the admin key may hold only letters, digits, '-' and '_' (it goes into a command line flag)")
    rule = f"{','.join(RESTRICTED_APIS)}:{ADMIN_HEADER}={admin_key}"
    return [f"--http-restricted-api={rule}", f"--grpc-restricted-protocol={rule}"]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child still answers kill(0): reap it if it is ours
        finished, _ = os.waitpid(pid, os.WNOHANG)
        return finished == 0
    except ChildProcessError:
        return True


def stop(pid: int, timeout_s: float = 15.0) -> bool:
    """SIGTERM the process group, then SIGKILL it after `timeout_s`. True if something was running."""
    if not pid_alive(pid):
        return False
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.1)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    while pid_alive(pid):
        time.sleep(0.05)
    return True
