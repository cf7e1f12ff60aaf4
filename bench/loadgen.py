"""The load generator: closed-loop concurrency and open-loop Poisson request-rate load against any Triton, or
against several replicas at once (requests go to them round robin; their statistics are summed).

Method (perf_analyzer's and MLPerf's, see docs/benchmarking.md): a warm-up, then measurement windows repeated
until the last three agree (max/min <= 1 + tolerance for throughput and p50), capped, with an `unstable` flag
otherwise; the last three windows are merged. Latency is measured per request from when it was due (open loop:
its Poisson arrival time, so client-side queueing counts) to its answer. Each window also reads the deltas of
Triton's statistics (queue, compute input/infer/output) and the load generator's own CPU time.
"""

from __future__ import annotations

import contextlib
import math
import os
import queue
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator, Literal, Sequence

import numpy as np
import psutil

from bench.senders import decode_answer, open_sender
from core.errors import InferenceError, ServerError
from core.stats import percentile_ci  # noqa: F401  (re-exported: the load point CIs use it)
from serving.client import connect

Protocol = Literal["http", "grpc"]
PERCENTILES = (50, 90, 95, 99)
STAT_PARTS = ("queue", "compute_input", "compute_infer", "compute_output")
# An answer checker: (index of the input it answered, its outputs by name); raises InferenceError when wrong.
Check = Callable[[int, dict[str, np.ndarray]], None]


@dataclass(frozen=True)
class LoadSettings:
    window_s: float = 2.0
    warmup_s: float = 1.0
    stability: float = 0.10  # last three windows within 10% (perf_analyzer's default)
    max_windows: int = 8
    timeout_s: float = 10.0  # per request; a dead server gives errors, never a hang


@dataclass
class Window:
    seconds: float
    latencies_ms: list[float]
    errors: int
    server: dict[str, float]  # part -> total ns over the window, plus "count"
    client_cpu_s: float
    delayed: int = 0  # open loop: requests sent more than 2 ms after they were due
    server_cpu_s: float | None = None  # the server's processes, when the load generator knows their pid

    @property
    def throughput(self) -> float:
        return len(self.latencies_ms) / self.seconds if self.seconds else 0.0

    @property
    def p50(self) -> float:
        return float(np.percentile(self.latencies_ms, 50)) if self.latencies_ms else math.inf


@dataclass
class LoadPoint:
    model: str
    protocol: str
    mode: Literal["concurrency", "rate"]
    load: float  # concurrency, or offered requests/s
    requests: int = 0
    errors: int = 0
    seconds: float = 0.0
    throughput: float = 0.0
    latency_ms: dict[str, float] = field(default_factory=dict)  # p50, p90, p95, p99, mean
    latency_ci_ms: dict[str, tuple[float, float]] = field(default_factory=dict)  # 95% distribution-free CIs
    server_us: dict[str, float] = field(
        default_factory=dict
    )  # per request: queue, compute_input, compute_infer, compute_output
    client_cpu_cores: float = 0.0
    server_cpu_cores: float | None = None
    delayed_fraction: float = 0.0
    windows: int = 0
    stable: bool = False
    warnings: list[str] = field(default_factory=list)
    endpoints: int = 1  # servers the requests were spread over, round robin

    def to_dict(self) -> dict:
        return asdict(self)


def is_stable(windows: list[Window], tolerance: float) -> bool:
    """perf_analyzer's rule: the last three windows agree within `tolerance` on throughput and on p50 latency."""
    if len(windows) < 3:
        return False
    last = windows[-3:]
    for values in ([w.throughput for w in last], [w.p50 for w in last]):
        if min(values) <= 0 or not all(map(math.isfinite, values)) or max(values) / min(values) > 1 + tolerance:
            return False
    return True


class _StatsReaders:
    """`_StatsReader`s of the same model on several servers, summed."""

    def __init__(self, urls: list[str], protocol: Protocol, model: str, timeout_s: float):
        self._readers: list[_StatsReader] = []
        try:
            for url in urls:
                self._readers.append(_StatsReader(url, protocol, model, timeout_s))
        except BaseException:
            self.close()
            raise

    def delta(self) -> dict[str, float]:
        total: dict[str, float] = {}
        for reader in self._readers:
            for key, value in reader.delta().items():
                total[key] = total.get(key, 0.0) + value
        return total

    def close(self) -> None:
        for reader in self._readers:
            reader.close()


class _StatsReader:
    """Cumulative Triton statistics of one model; `delta()` gives what happened since the last call."""

    def __init__(self, url: str, protocol: Protocol, model: str, timeout_s: float):
        self._client = connect(url, protocol, timeout_s)
        self._url, self._model, self._protocol, self._timeout_s = url, model, protocol, timeout_s
        self._last = self._read()

    def _read(self) -> dict[str, float]:
        try:
            # a deadline on gRPC too: a frozen server must end the benchmark with an error, never hang it
            stats = (
                self._client.get_inference_statistics(self._model, as_json=True, client_timeout=self._timeout_s)
                if self._protocol == "grpc"
                else self._client.get_inference_statistics(self._model)
            )
        except Exception as error:  # refused connections come as several types
            raise ServerError(f"cannot read Triton statistics of '{self._model}' at {self._url}: {error}") from error
        totals = {part: 0.0 for part in STAT_PARTS}
        totals["count"] = 0.0
        for entry in stats.get("model_stats", []):
            inference = entry.get("inference_stats", {})
            totals["count"] += float(inference.get("success", {}).get("count", 0))
            for part in STAT_PARTS:
                totals[part] += float(inference.get(part, {}).get("ns", 0))
        return totals

    def delta(self) -> dict[str, float]:
        now = self._read()
        change = {key: now[key] - self._last[key] for key in now}
        self._last = now
        return change

    def close(self) -> None:
        self._client.close()


class _Recorder:
    """Completed requests, drained by the measuring thread at window boundaries."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._latencies: list[float] = []
        self._errors = 0
        self._delayed = 0
        self.first_error: str | None = None

    def add(self, latency_ms: float | None, error: str | None = None, delayed: bool = False) -> None:
        with self._lock:
            if error is None:
                self._latencies.append(latency_ms)
            else:
                self._errors += 1
                self.first_error = self.first_error or error
            self._delayed += delayed

    def drain(self) -> tuple[list[float], int, int]:
        with self._lock:
            taken = (self._latencies, self._errors, self._delayed)
            self._latencies, self._errors, self._delayed = [], 0, 0
        return taken


def _send(sender, protocol: Protocol, index: int, inputs: list, check: Check | None) -> None:
    """One request; with `check`, its answer decoded and checked (InferenceError when wrong)."""
    answer = sender.send(index)
    if check is not None:
        case = index % len(inputs)
        try:
            check(case, decode_answer(protocol, answer))
        except (AssertionError, ValueError) as error:
            raise InferenceError(f"a wrong answer to input {case}: {error}") from error


def _closed_loop(
    urls, protocol, model, inputs, concurrency, settings, recorder, stop, check=None
) -> list[threading.Thread]:
    def worker(offset: int) -> None:
        senders: dict[str, object] = {}  # one per server, opened when first used
        index = offset
        try:
            while not stop.is_set():
                url = urls[index % len(urls)]  # round robin over the servers
                start = time.perf_counter()
                try:
                    if url not in senders:  # requests serialized once (bench/senders.py): we measure the server
                        senders[url] = open_sender(protocol, url, model, inputs, settings.timeout_s)
                    _send(senders[url], protocol, index, inputs, check)
                    recorder.add((time.perf_counter() - start) * 1e3)
                except (InferenceError, ValueError) as error:
                    recorder.add(None, str(error))
                    time.sleep(0.05)  # a failing server must not turn the loop into a busy spin
                index += 1
        finally:
            for sender in senders.values():
                sender.close()

    threads = [threading.Thread(target=worker, args=(n,), daemon=True) for n in range(concurrency)]
    for thread in threads:
        thread.start()
    return threads


def _open_loop(
    urls, protocol, model, inputs, rate, settings, recorder, stop, check=None, seed=0
) -> list[threading.Thread]:
    """Poisson arrivals at `rate`/s, round robin over the servers; requests run on a pool so a slow answer never
    delays the next arrival."""
    senders: dict[str, queue.Queue] = {url: queue.Queue() for url in urls}  # idle senders, per server
    pool = ThreadPoolExecutor(max_workers=64, thread_name_prefix="tes-openloop")

    def send(due: float, index: int) -> None:
        delayed, idle = time.perf_counter() - due > 2e-3, senders[urls[index % len(urls)]]
        try:
            sender = idle.get_nowait()
        except queue.Empty:
            try:
                sender = open_sender(protocol, urls[index % len(urls)], model, inputs, settings.timeout_s)
            except (InferenceError, ValueError) as error:
                recorder.add(None, str(error), delayed)
                return
        try:
            _send(sender, protocol, index, inputs, check)
            recorder.add((time.perf_counter() - due) * 1e3, delayed=delayed)
        except InferenceError as error:
            recorder.add(None, str(error), delayed)
        finally:
            idle.put(sender)

    def dispatcher() -> None:
        rng, due, index = random.Random(seed), time.perf_counter(), 0
        while not stop.is_set():
            due += rng.expovariate(rate)
            pause = due - time.perf_counter()
            if pause > 0:
                stop.wait(pause)
            pool.submit(send, due, index)
            index += 1
        pool.shutdown(wait=True, cancel_futures=True)
        for idle in senders.values():
            while not idle.empty():
                idle.get().close()

    thread = threading.Thread(target=dispatcher, daemon=True)
    thread.start()
    return [thread]


def _tree_cpu_s(processes: list[psutil.Process] | None) -> float | None:
    if not processes:
        return None
    try:
        return sum(
            sum(p.cpu_times()[:4]) for process in processes for p in [process, *process.children(recursive=True)]
        )
    except psutil.Error:
        return None


def _as_list(value) -> list:
    return [] if value is None else [value] if isinstance(value, (str, int)) else list(value)


def _check_load(concurrency: float | None, rate: float | None, inputs: list, urls: list[str]) -> None:
    if (concurrency is None) == (rate is None):
        raise ValueError("give exactly one of concurrency or rate")
    if not urls:
        raise ValueError("url: expected at least one host:port, got none")
    if not inputs or all(not np.any(array) for case in inputs for array in case.values()):
        raise ValueError(
            "inputs must be real samples (for example the recipe's validation split), not empty or all zeros"
        )


def measure(
    url: str | Sequence[str],
    protocol: Protocol,
    model: str,
    inputs: list[dict[str, np.ndarray]],
    *,
    concurrency: int | None = None,
    rate: float | None = None,
    settings: LoadSettings = LoadSettings(),
    server_pid: int | Sequence[int] | None = None,
) -> LoadPoint:
    """One load point: closed loop at `concurrency`, or open loop at `rate` requests/s, against one server or
    several (`url` a list: requests round robin). With `server_pid` (local servers, one pid each), the servers' own
    CPU use is measured too."""
    urls = _as_list(url)
    _check_load(concurrency, rate, inputs, urls)
    stats = _StatsReaders(urls, protocol, model, settings.timeout_s)
    recorder, stop, me = _Recorder(), threading.Event(), psutil.Process()
    server = [psutil.Process(pid) for pid in _as_list(server_pid)]
    start_load = _closed_loop if concurrency else _open_loop
    threads = start_load(urls, protocol, model, inputs, concurrency or rate, settings, recorder, stop)
    windows: list[Window] = []
    try:
        time.sleep(settings.warmup_s)
        recorder.drain()
        stats.delta()
        while len(windows) < settings.max_windows and not is_stable(windows, settings.stability):
            cpu_before, server_before, started = sum(me.cpu_times()[:2]), _tree_cpu_s(server), time.perf_counter()
            time.sleep(settings.window_s)
            latencies, errors, delayed = recorder.drain()
            seconds = time.perf_counter() - started
            server_after = _tree_cpu_s(server)
            server_cpu = (
                server_after - server_before if server_before is not None and server_after is not None else None
            )
            windows.append(
                Window(
                    seconds, latencies, errors, stats.delta(), sum(me.cpu_times()[:2]) - cpu_before, delayed, server_cpu
                )
            )
            if errors and not latencies:
                raise InferenceError(
                    f"every request to '{model}' over {protocol} failed in a {seconds:.1f} s window: "
                    f"{recorder.first_error}"
                )
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=settings.timeout_s + 5)
        stats.close()
    point = _merge(model, protocol, "concurrency" if concurrency else "rate", concurrency or rate, windows, settings)
    point.endpoints = len(urls)
    return point


@contextlib.contextmanager
def running_load(
    url: str | Sequence[str],
    protocol: Protocol,
    model: str,
    inputs: list[dict[str, np.ndarray]],
    *,
    concurrency: int | None = None,
    rate: float | None = None,
    timeout_s: float = 10.0,
    check: Check | None = None,
) -> Iterator[_Recorder]:
    """Load in the background for as long as the block runs (no windows, no stopping rule): for watching a change,
    such as a rollout, under steady traffic. The recorder's `drain()` returns (latencies ms, errors, late sends) of
    what completed since the last drain; `first_error` says what went wrong first. With `check`, every answer is
    decoded and checked: a wrong one counts as an error."""
    urls = _as_list(url)
    _check_load(concurrency, rate, inputs, urls)
    recorder, stop = _Recorder(), threading.Event()
    start_load = _closed_loop if concurrency else _open_loop
    settings = LoadSettings(timeout_s=timeout_s)
    threads = start_load(urls, protocol, model, inputs, concurrency or rate, settings, recorder, stop, check)
    try:
        yield recorder
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=timeout_s + 5)


def _merge(model, protocol, mode, load, windows: list[Window], settings: LoadSettings) -> LoadPoint:
    stable = is_stable(windows, settings.stability)
    used = windows[-3:]
    latencies = np.sort(np.concatenate([w.latencies_ms for w in used])) if used else np.array([])
    seconds = sum(w.seconds for w in used)
    point = LoadPoint(
        model,
        protocol,
        mode,
        float(load),
        requests=len(latencies),
        errors=sum(w.errors for w in used),
        seconds=seconds,
        throughput=len(latencies) / seconds if seconds else 0.0,
        windows=len(windows),
        stable=stable,
    )
    if len(latencies):
        point.latency_ms = {f"p{q}": float(np.percentile(latencies, q)) for q in PERCENTILES} | {
            "mean": float(latencies.mean())
        }
        point.latency_ci_ms = {f"p{q}": percentile_ci(latencies, q / 100) for q in PERCENTILES}
    count = sum(w.server.get("count", 0) for w in used)
    if count:
        point.server_us = {part: sum(w.server[part] for w in used) / count / 1e3 for part in STAT_PARTS}
    point.client_cpu_cores = sum(w.client_cpu_s for w in used) / seconds if seconds else 0.0
    if used and seconds and all(w.server_cpu_s is not None for w in used):
        point.server_cpu_cores = sum(w.server_cpu_s for w in used) / seconds
    attempted = len(latencies) + point.errors
    point.delayed_fraction = sum(w.delayed for w in used) / attempted if attempted else 0.0
    if not stable:
        point.warnings.append(
            f"unstable: the last three of {len(windows)} windows did not agree within {settings.stability:.0%}"
        )
    if point.client_cpu_cores > 0.85:  # a Python client is bound to about one core by the GIL
        point.warnings.append(
            f"the load generator used {point.client_cpu_cores:.2f} cores: it, not the server, may be the bottleneck"
        )
    if point.delayed_fraction > 0.1:
        point.warnings.append(
            f"{point.delayed_fraction:.0%} of requests were sent late: the offered rate was not reached"
        )
    if os.cpu_count() and os.cpu_count() <= 2:
        point.warnings.append(
            "client and server share a 2-core machine: absolute figures are pessimistic; compare ratios"
        )
    return point


def sweep(
    url: str | Sequence[str],
    protocol: Protocol,
    model: str,
    inputs: list[dict[str, np.ndarray]],
    *,
    concurrencies=(),
    rates=(),
    settings: LoadSettings = LoadSettings(),
    progress=None,
    server_pid: int | Sequence[int] | None = None,
) -> list[LoadPoint]:
    """Every concurrency, then every rate; `progress(point)` is called after each."""
    points = []
    for kind, values in (("concurrency", concurrencies), ("rate", rates)):
        for value in values:
            point = measure(url, protocol, model, inputs, settings=settings, server_pid=server_pid, **{kind: value})
            points.append(point)
            if progress:
                progress(point)
    return points


def best_rate_under(points: list[LoadPoint], p99_budget_ms: float) -> LoadPoint | None:
    """MLPerf "server" style: the highest offered rate whose p99 stays within the budget, without errors."""
    fitting = [
        p for p in points if p.mode == "rate" and not p.errors and p.latency_ms.get("p99", math.inf) <= p99_budget_ms
    ]
    return max(fitting, key=lambda p: p.load, default=None)
