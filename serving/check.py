"""The served check: a served model's answers against the same model run in-process, and a concurrency-1 latency
probe beside in-process.

The in-process reference is any object with ONNX Runtime's `run(output_names, feeds)` (an ONNX Runtime session,
or the OpenVINO adapter of `core.runtimes`), so each variant is compared with its own runtime.
"""

from __future__ import annotations

import statistics
import time

import numpy as np

from core.results import StageOutput, StageResult, Status, timed
from serving.client import connect, infer
from serving.deploy import DeployOutput


class ServedComparison(StageOutput):
    batches: int
    max_abs_diff_vs_in_process: float
    top1_agreement_with_torch: float


class LatencyProbe(StageOutput):
    protocol: str
    requests: int
    input_shapes: dict[str, list[int]]
    served_p50_ms: float
    in_process_p50_ms: float
    serving_overhead_p50_ms: float


class ServedCheckOutput(StageOutput):
    protocols: dict[str, ServedComparison]  # the alias, per protocol
    variants: dict[str, dict[str, float]]  # every variant model: protocol -> max |served - in-process|
    latency: LatencyProbe
    replicas: dict[str, dict[str, float]] = {}  # every other replica's HTTP URL: protocol -> the alias' max |diff|


def check_served(
    deployed: DeployOutput, sessions: dict, batches: list[dict[str, np.ndarray]], torch_top1: list[np.ndarray]
) -> StageResult[ServedCheckOutput]:
    """The alias over every protocol against the selected variant in-process (`sessions[name]`, one per deployed
    variant) and its top-1 against torch's (`torch_top1`, per batch); every variant model against its own file;
    a latency probe of the alias; and, with several replicas, the alias on each of the others."""
    if not deployed.loaded:
        return StageResult.skipped("served_check", deployed.load_skipped or "model not loaded")
    urls = {"http": deployed.triton_http, **({"grpc": deployed.triton_grpc} if deployed.triton_grpc else {})}
    with timed() as clock:
        protocols = {}
        for protocol, report in compare_served(urls, deployed.model, batches, sessions[deployed.selected]).items():
            served_top1 = np.concatenate(report["outputs"]).argmax(-1)
            protocols[protocol] = ServedComparison(
                batches=report["batches"],
                max_abs_diff_vs_in_process=report["max_abs_diff_vs_in_process"],
                top1_agreement_with_torch=float((served_top1 == np.concatenate(torch_top1)).mean()),
            )
        variants = {}
        for variant, entry in deployed.variants.items():
            served = compare_served(urls, entry.model, batches[:1], sessions[variant])
            variants[variant] = {p: served[p]["max_abs_diff_vs_in_process"] for p in served}
        single = {name: array[:1] for name, array in batches[0].items()}
        probe_protocol = "grpc" if "grpc" in urls else "http"
        latency = latency_probe(
            urls[probe_protocol], probe_protocol, deployed.model, single, sessions[deployed.selected]
        )
        replicas = {}
        for replica in deployed.replicas[1:]:
            others = {"http": replica.http, **({"grpc": replica.grpc} if replica.grpc else {})}
            served = compare_served(others, deployed.model, batches, sessions[deployed.selected])
            replicas[replica.http] = {p: served[p]["max_abs_diff_vs_in_process"] for p in served}
    output = ServedCheckOutput(protocols=protocols, variants=variants, latency=latency, replicas=replicas)
    return StageResult(stage="served_check", status=Status.OK, seconds=clock["seconds"], output=output)


def compare_served(urls: dict[str, str], model: str, batches: list[dict[str, np.ndarray]], session) -> dict:
    """Send each batch over every protocol in `urls`; report max |served - in-process| and the first outputs."""
    report: dict = {}
    for protocol, url in urls.items():
        client = connect(url, protocol)  # type: ignore[arg-type]
        worst, served_first = 0.0, []
        try:
            for inputs in batches:
                served = infer(url, model, inputs, protocol, client=client)  # type: ignore[arg-type]
                expected = session.run(None, inputs)
                names = list(served)
                for name, array in zip(names, expected):
                    worst = max(worst, float(np.abs(served[name].astype(np.float64) - array).max(initial=0.0)))
                served_first.append(served[names[0]])
        finally:
            client.close()
        report[protocol] = {"batches": len(batches), "max_abs_diff_vs_in_process": worst, "outputs": served_first}
    return report


def interleaved_p50(serve, local, requests: int) -> tuple[float, float]:
    """(p50 of `serve()`, p50 of `local()`) in ms, called one after the other, so machine noise hits both alike."""
    for _ in range(10):  # warm-up both paths
        serve()
        local()
    served_ms, local_ms = [], []
    for _ in range(requests):
        start = time.perf_counter()
        serve()
        served_ms.append((time.perf_counter() - start) * 1e3)
        start = time.perf_counter()
        local()
        local_ms.append((time.perf_counter() - start) * 1e3)
    return statistics.median(served_ms), statistics.median(local_ms)


def latency_probe(
    url: str, protocol: str, model: str, inputs: dict[str, np.ndarray], session, requests: int = 100
) -> LatencyProbe:
    """p50 of one-at-a-time requests to the server vs the same model in-process on the same input, side by side."""
    client = connect(url, protocol)  # type: ignore[arg-type]
    try:
        served_p50, local_p50 = interleaved_p50(
            lambda: infer(url, model, inputs, protocol, client=client),  # type: ignore[arg-type]
            lambda: session.run(None, inputs),
            requests,
        )
    finally:
        client.close()
    return LatencyProbe(
        protocol=protocol,
        requests=requests,
        input_shapes={k: list(v.shape) for k, v in inputs.items()},
        served_p50_ms=served_p50,
        in_process_p50_ms=local_p50,
        serving_overhead_p50_ms=served_p50 - local_p50,
    )
