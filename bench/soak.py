"""Soak: steady load for a while, every response checked against its expected output, server memory sampled.

from bench.soak import soak
report = soak(server.grpc_url, "grpc", "stdlib-gpt", cases, seconds=180, concurrency=4, server_pid=server.pid)
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import psutil

from core.errors import InferenceError
from serving.client import connect, infer


@dataclass
class SoakReport:
    seconds: float
    concurrency: int
    requests: int = 0
    errors: int = 0
    wrong: int = 0
    first_errors: list[str] = field(default_factory=list)
    rss_mb_samples: list[float] = field(default_factory=list)  # server + its children, once a second

    @property
    def peak_rss_mb(self) -> float:
        return max(self.rss_mb_samples, default=0.0)

    def to_dict(self) -> dict:
        return {**asdict(self), "peak_rss_mb": self.peak_rss_mb}


def _tree_rss_mb(process: psutil.Process) -> float:
    try:
        return sum(p.memory_info().rss for p in [process, *process.children(recursive=True)]) / 1e6
    except psutil.Error:
        return 0.0


def soak(
    url: str,
    protocol: str,
    model: str,
    cases: list[tuple[dict[str, np.ndarray], np.ndarray]],
    seconds: float,
    concurrency: int = 4,
    atol: float = 1e-5,
    server_pid: int | None = None,
    timeout_s: float = 30.0,
) -> SoakReport:
    """`concurrency` closed-loop workers cycle through `cases` (inputs, expected first output) for `seconds`."""
    report, lock, stop = SoakReport(seconds, concurrency), threading.Lock(), threading.Event()

    def worker(offset: int) -> None:
        client = connect(url, protocol, timeout_s)  # type: ignore[arg-type]
        index = offset
        try:
            while not stop.is_set():
                inputs, expected = cases[index % len(cases)]
                index += 1
                try:
                    got = next(iter(infer(url, model, inputs, protocol, client=client, timeout_s=timeout_s).values()))  # type: ignore[arg-type]
                    ok, problem = (
                        got.shape == expected.shape and np.allclose(got, expected, rtol=0, atol=atol),
                        "wrong answer",
                    )
                except InferenceError as error:
                    ok, problem = None, str(error)
                with lock:
                    report.requests += 1
                    if ok is None:
                        report.errors += 1
                    elif not ok:
                        report.wrong += 1
                    if ok is not True and len(report.first_errors) < 5:
                        report.first_errors.append(problem)
        finally:
            client.close()

    workers = [threading.Thread(target=worker, args=(n,), daemon=True) for n in range(concurrency)]
    server = psutil.Process(server_pid) if server_pid else None
    for thread in workers:
        thread.start()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server is not None:
            report.rss_mb_samples.append(_tree_rss_mb(server))
        time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
    stop.set()
    for thread in workers:
        thread.join(timeout=timeout_s + 5)
    return report
