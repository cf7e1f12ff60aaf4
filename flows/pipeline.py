"""The `train-export-serve` pipeline: train -> export -> deploy -> served check -> report.

`run_pipeline` holds the order of the stages once. The Prefect flow `train-export-serve` runs it with every
stage as a Prefect task (`prefect deployment run 'train-export-serve/default' --watch`, after `tes up`);
`tes run` runs the very same function in-process, without a server.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable

import numpy as np

from core import paths
from core.errors import ServerError
from core.files import atomic_write_json, atomic_write_text
from core.results import RunDir, StageResult, Status, new_run_id, timed
from export.onnx_export import export_onnx
from flows import stack
from flows.params import PipelineParams
from flows.report import render_report
from serving import check, client, repository
from training.loop import evaluate, load_trained, train
from training.recipes import Recipe

log = logging.getLogger(__name__)

Call = Callable[..., Any]  # call(stage_name, function, *args) -> function(*args)


def direct_call(_stage: str, function: Callable, *args: Any) -> Any:
    return function(*args)


def stage_train(recipe: Recipe, params: PipelineParams, run: RunDir) -> StageResult:
    return train(recipe, params.training, run.stage_dir("train"))


def stage_export(recipe: Recipe, params: PipelineParams, run: RunDir, weights: str) -> StageResult:
    model = load_trained(recipe, weights)
    result = export_onnx(recipe, model, run.stage_dir("export"), params.export)
    session = check.ort_session(result.outputs["onnx"])
    input_names = [spec.name for spec in recipe.inputs]
    result.outputs["validation_onnxruntime"] = evaluate(
        recipe, lambda inputs: session.run(None, {n: inputs[n] for n in input_names})[0], params.training.eval_samples
    )
    return result


def stage_deploy(recipe: Recipe, params: PipelineParams, run: RunDir, onnx_path: str) -> StageResult:
    """Write the next Triton version, verify its checksums, and load it into the running Triton if any."""
    name = params.triton_model_name
    with timed() as clock:
        version = repository.write_version(
            paths.resolve(params.repository), name, onnx_path, params.serving_config(recipe),
            provenance={"run_id": run.path.name, "run_dir": str(run.path), **recipe.describe()},
        )
        repository.verify_version(version.path)
        outputs: dict[str, Any] = {"model": name, "version": version.version, "path": str(version.path), "loaded": False}
        url = params.serving.triton_url or stack.triton_url("http")
        if not params.serving.load:
            outputs["load_skipped"] = "serving.load is false"
        elif url is None:
            outputs["load_skipped"] = "no Triton is running: start one with `tes up`, or set serving.triton_url"
        else:
            outputs["ready_version"] = client.load_model(url, name)
            grpc_url = params.serving.triton_grpc_url if params.serving.triton_url else stack.triton_url("grpc")
            outputs.update(loaded=True, triton_http=url, triton_grpc=grpc_url)
    return StageResult("deploy", Status.OK, clock["seconds"], outputs=outputs)


def stage_served_check(recipe: Recipe, params: PipelineParams, deploy: dict, onnx_path: str, torch_top1: list[np.ndarray]) -> StageResult:
    """Served outputs against ONNX Runtime over HTTP and gRPC, top-1 against torch, and a latency probe."""
    if not deploy.get("loaded"):
        return StageResult("served_check", Status.SKIPPED, reason=deploy.get("load_skipped", "model not loaded"))
    urls = {"http": deploy["triton_http"]}
    if deploy.get("triton_grpc"):
        urls["grpc"] = deploy["triton_grpc"]
    batches = [batch.inputs for batch in recipe.eval_batches(8, max_samples=32)]
    with timed() as clock:
        report = check.compare_served(urls, deploy["model"], batches, onnx_path)
        for protocol in report:
            served_top1 = np.concatenate(report[protocol].pop("outputs")).argmax(-1)
            report[protocol]["top1_agreement_with_torch"] = float((served_top1 == np.concatenate(torch_top1)).mean())
        single = {name: array[:1] for name, array in batches[0].items()}
        probe_protocol = "grpc" if "grpc" in urls else "http"
        report["latency"] = check.latency_probe(urls[probe_protocol], probe_protocol, deploy["model"], single, onnx_path)
    return StageResult("served_check", Status.OK, clock["seconds"], outputs=report)


def _torch_top1(recipe: Recipe, weights: str) -> list[np.ndarray]:
    from training.loop import torch_predictor

    predict = torch_predictor(load_trained(recipe, weights), recipe)
    return [predict(batch.inputs).argmax(-1) for batch in recipe.eval_batches(8, max_samples=32)]


def run_pipeline(params: PipelineParams, call: Call = direct_call, publish: Callable[[str], None] | None = None) -> dict:
    """Run every stage in order; returns the run summary (also written to the run folder)."""
    recipe = params.build_recipe()
    run = RunDir(paths.resolve(params.runs_dir) / new_run_id(params.triton_model_name))
    run.update(params=params.model_dump(mode="json"), recipe=recipe.describe(), status="running")
    log.info("run folder: %s", run.path)
    results: list[StageResult] = []
    try:
        for result in _stages(recipe, params, run, call):
            run.record(result)
            results.append(result)
    except BaseException as error:  # the manifest must say the run failed, whatever stopped it
        run.update(status="failed", error=f"{type(error).__name__}: {error}")
        raise
    summary = {"run_id": run.path.name, "run_dir": str(run.path), "status": "completed",
               "stages": {r.stage: r.to_dict() for r in results}}
    run.update(status="completed")
    markdown = render_report(summary)
    atomic_write_text(run.path / "report.md", markdown)
    atomic_write_json(run.path / "summary.json", summary)
    atomic_write_json(paths.state_dir() / "last-run.json", {"run_dir": str(run.path)})
    if publish:
        publish(markdown)
    return summary


def _stages(recipe: Recipe, params: PipelineParams, run: RunDir, call: Call):
    trained = call("train", stage_train, recipe, params, run)
    yield trained
    weights = trained.outputs["weights"]
    exported = call("export", stage_export, recipe, params, run, weights)
    yield exported
    onnx_path = exported.outputs["onnx"]
    deployed = call("deploy", stage_deploy, recipe, params, run, onnx_path)
    yield deployed
    yield call("served_check", stage_served_check, recipe, params, deployed.outputs, onnx_path, _torch_top1(recipe, weights))


def load_summary(run: str | Path | None = None) -> dict:
    """A finished run's summary: by folder, or the last run of this project home."""
    if run is None:
        pointer = paths.state_dir() / "last-run.json"
        if not pointer.is_file():
            raise ServerError("no run yet: start one with `tes run` or `tes demo`")
        run = json.loads(pointer.read_text())["run_dir"]
    summary_path = Path(run) / "summary.json"
    if not summary_path.is_file():
        raise ServerError(f"{summary_path} does not exist: the run did not finish")
    return json.loads(summary_path.read_text())
