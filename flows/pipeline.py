"""The `train-export-serve` pipeline: train -> export -> precision variants -> deploy -> served check -> report.

`run_pipeline` holds the order of the stages once. The Prefect flow `train-export-serve` runs it with every
stage as a Prefect task (`prefect deployment run 'train-export-serve/default' --watch`, after `tes up`);
`tes run` runs the very same function in-process, without a server.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Callable

import numpy as np

from core import paths
from core.errors import ServerError
from core.files import atomic_write_json, atomic_write_text
from core.results import Artifact, RunDir, StageResult, Status, new_run_id, timed
from export.onnx_export import export_onnx
from export import trt_engine
from core.runtimes import open_session
from export.variants import build_and_score
from accounting.ledger import Ledger
from accounting import stage as accounting
from flows import cache, stack
from bench.stage import run_benchmark
from flows.params import PipelineParams
from flows.report import render_report
from serving import check, client, repository
from training.loop import evaluate, load_trained, pick_device, train
from recipes import Recipe

log = logging.getLogger(__name__)

Call = Callable[..., Any]  # call(stage_name, function, *args) -> function(*args)


def direct_call(_stage: str, function: Callable, *args: Any) -> Any:
    return function(*args)


def stage_train(recipe: Recipe, params: PipelineParams, run: RunDir) -> StageResult:
    return train(recipe, params.training, run.stage_dir("train"))


def stage_export(recipe: Recipe, params: PipelineParams, run: RunDir, weights: str) -> StageResult:
    model = load_trained(recipe, weights)
    result = export_onnx(recipe, model, run.stage_dir("export"), params.export)
    session = open_session(result.outputs["onnx"])
    input_names = [spec.name for spec in recipe.inputs]
    result.outputs["validation_onnxruntime"] = evaluate(
        recipe, lambda inputs: session.run(None, {n: inputs[n] for n in input_names})[0], params.training.eval_samples
    )
    return result


def stage_precision(recipe: Recipe, params: PipelineParams, run: RunDir, onnx_path: str) -> StageResult:
    """Every precision variant built, scored on validation data and gated against FP32."""
    with timed() as clock:
        reports = [r.to_dict() for r in build_and_score(recipe, onnx_path, run.stage_dir("precision"), params.precision)]
    atomic_write_json(run.stage_dir("precision") / "variants.json", reports)
    selected = next(r["name"] for r in reports if r["serves_alias"])
    return StageResult("precision", Status.OK, clock["seconds"],
                       artifacts=[Artifact(r["path"], r["sha256"], r["bytes"]) for r in reports if r["path"] and r["sha256"]],
                       outputs={"variants": reports, "selected": selected, "policy": params.precision.policy,
                                "primary_metric": recipe.primary_metric})


def stage_tensorrt(recipe: Recipe, params: PipelineParams, run: RunDir, onnx_path: str, variants: list[dict]) -> StageResult:
    """A TensorRT engine for `tensorrt.precision`, built from the FP32 export (or the int8-static QDQ variant), then
    verified against FP32 ONNX Runtime and gated like a variant, where TensorRT and a GPU exist; SKIPPED with the
    reason elsewhere. Engines are for the native flavour (`tes export-repository`)."""
    limit = params.serving_config(recipe).max_batch_size
    return trt_engine.run_stage(recipe, onnx_path, variants, run.stage_dir("tensorrt"), params.tensorrt, params.precision, max(1, limit))


def stage_deploy(recipe: Recipe, params: PipelineParams, run: RunDir, variants: list[dict]) -> StageResult:
    """Each accepted variant as `<model>-<variant>`, and `<model>` as an ensemble alias of the selected one;
    every version checksummed, then loaded into the running Triton if there is one."""
    name, repo = params.triton_model_name, paths.resolve(params.repository)
    provenance = {"run_id": run.path.name, "run_dir": str(run.path), **recipe.describe()}
    with timed() as clock:
        deployed = {}
        for report in (r for r in variants if r["status"] == "accepted"):
            serving = dataclasses.replace(params.serving_config(recipe), runtime=report["runtime"],
                                          runtime_precision=report["runtime_precision"] or "")
            version = repository.write_version(repo, f"{name}-{report['name']}", report["path"], serving,
                                               provenance={**provenance, "variant": report["name"]})
            repository.verify_version(version.path)
            deployed[report["name"]] = {"model": version.model_name, "version": version.version, "path": str(version.path),
                                        "reused": version.reused}
        selected = next(r["name"] for r in variants if r["serves_alias"])
        alias = repository.write_alias(repo, name, deployed[selected]["model"], provenance={**provenance, "variant": selected})
        outputs: dict[str, Any] = {"model": name, "version": alias.version, "path": str(alias.path), "selected": selected,
                                   "variants": deployed, "reused": alias.reused, "loaded": False}
        url = params.serving.triton_url or stack.triton_url("http")
        if not params.serving.load:
            outputs["load_skipped"] = "serving.load is false"
        elif url is None:
            outputs["load_skipped"] = "no Triton is running: start one with `tes up`, or set serving.triton_url"
        else:
            key = params.serving.triton_admin_key if params.serving.triton_url else stack.triton_admin_key()
            for entry in deployed.values():
                entry["ready_version"] = client.load_model(url, entry["model"], admin_key=key)
            outputs["ready_version"] = client.load_model(url, name, admin_key=key)
            grpc_url = params.serving.triton_grpc_url if params.serving.triton_url else stack.triton_url("grpc")
            outputs.update(loaded=True, triton_http=url, triton_grpc=grpc_url)
    return StageResult("deploy", Status.OK, clock["seconds"], outputs=outputs)


def stage_served_check(recipe: Recipe, deploy: dict, variants: list[dict], torch_top1: list[np.ndarray]) -> StageResult:
    """The alias over HTTP and gRPC against the selected variant in ONNX Runtime and top-1 against torch; every
    variant model against its own ONNX file; and a latency probe of the alias."""
    if not deploy.get("loaded"):
        return StageResult("served_check", Status.SKIPPED, reason=deploy.get("load_skipped", "model not loaded"))
    urls = {"http": deploy["triton_http"]}
    if deploy.get("triton_grpc"):
        urls["grpc"] = deploy["triton_grpc"]
    sessions = {r["name"]: open_session(r["path"], r["runtime"], r["runtime_precision"]) for r in variants if r["name"] in deploy["variants"]}
    batches = [batch.inputs for batch in recipe.eval_batches(8, max_samples=32)]
    with timed() as clock:
        report = check.compare_served(urls, deploy["model"], batches, sessions[deploy["selected"]])
        for protocol in list(report):
            served_top1 = np.concatenate(report[protocol].pop("outputs")).argmax(-1)
            report[protocol]["top1_agreement_with_torch"] = float((served_top1 == np.concatenate(torch_top1)).mean())
        report["variants"] = {}
        for variant, entry in deploy["variants"].items():
            served = check.compare_served(urls, entry["model"], batches[:1], sessions[variant])
            report["variants"][variant] = {p: served[p]["max_abs_diff_vs_in_process"] for p in served}
        single = {name: array[:1] for name, array in batches[0].items()}
        probe_protocol = "grpc" if "grpc" in urls else "http"
        report["latency"] = check.latency_probe(urls[probe_protocol], probe_protocol, deploy["model"], single, sessions[deploy["selected"]])
    return StageResult("served_check", Status.OK, clock["seconds"], outputs=report)


def stage_benchmark(params: PipelineParams, run: RunDir, deploy: dict) -> StageResult:
    """The serving benchmark of the plain model name (short by default), with in-process baselines."""
    if not params.benchmark.enabled:
        return StageResult("benchmark", Status.SKIPPED, reason="benchmark.enabled is false")
    if not deploy.get("loaded"):
        return StageResult("benchmark", Status.SKIPPED, reason=deploy.get("load_skipped", "model not loaded"))
    key = params.serving.triton_admin_key if params.serving.triton_url else stack.triton_admin_key()
    with timed() as clock:
        summary = run_benchmark(deploy["model"], params.benchmark, http_url=deploy["triton_http"], grpc_url=deploy.get("triton_grpc"),
                                admin_key=key, repository_path=params.repository, out_dir=run.stage_dir("benchmark"),
                                progress=log.info)
    artifacts = [Artifact.of(path) for path in summary["outputs"].values()]
    return StageResult("benchmark", Status.OK, clock["seconds"], artifacts=artifacts,
                       outputs={"outputs": summary["outputs"], "points": summary["points"], "baselines": summary["baselines"]})


def _torch_top1(recipe: Recipe, weights: str) -> list[np.ndarray]:
    from training.loop import torch_predictor

    predict = torch_predictor(load_trained(recipe, weights), recipe)
    return [predict(batch.inputs).argmax(-1) for batch in recipe.eval_batches(8, max_samples=32)]


def run_pipeline(params: PipelineParams, call: Call = direct_call, publish: Callable[[str], None] | None = None) -> dict:
    """Run every stage in order; returns the run summary (also written to the run folder).

    A run whose data, code and configuration match an earlier completed run reuses its training, export and
    precision artifacts, and the deployment reuses identical versions: nothing is computed twice."""
    recipe = params.build_recipe()
    run = RunDir(paths.resolve(params.runs_dir) / new_run_id(params.triton_model_name))
    key = cache.cache_key(params, recipe)
    run.update(params=params.model_dump(mode="json"), recipe=recipe.describe(), status="running", cache_key=key)
    log.info("run folder: %s", run.path)
    results: list[StageResult] = []
    ledger = Ledger(params.prices)
    device = str(pick_device(params.training.device))
    try:
        for result in _stages(recipe, params, run, accounting.measured(ledger, call, device), cache.lookup(key)):
            run.record(result)
            results.append(result)
    except BaseException as error:  # the manifest must say the run failed, whatever stopped it
        run.update(status="failed", error=f"{type(error).__name__}: {error}")
        raise
    extra = accounting.enrich(ledger, recipe, params, {r.stage: r for r in results})
    ledger_files, ledger_markdown = accounting.write(ledger, extra, run.path)
    summary = {"run_id": run.path.name, "run_dir": str(run.path), "status": "completed",
               "stages": {r.stage: r.to_dict() for r in results}, "ledger": ledger_files}
    run.update(status="completed", ledger=ledger_files)
    cache.remember(key, run.path)
    markdown = render_report(summary) + "\n## Compute and energy ledger\n\n" + ledger_markdown
    atomic_write_text(run.path / "report.md", markdown)
    atomic_write_json(run.path / "summary.json", summary)
    atomic_write_json(paths.state_dir() / "last-run.json", {"run_dir": str(run.path)})
    if publish:
        publish(markdown)
    return summary


def reuse_stage(cached: dict, stage: str) -> StageResult:
    result = StageResult.from_dict(cached["stages"][stage])
    result.reason = f"cached: same data, code and configuration as {Path(cached['run_dir']).name}"
    result.seconds = 0.0
    return result


def _stages(recipe: Recipe, params: PipelineParams, run: RunDir, call: Call, cached: dict | None):
    trained = call("train", reuse_stage, cached, "train") if cached else call("train", stage_train, recipe, params, run)
    yield trained
    weights = trained.outputs["weights"]
    exported = (call("export", reuse_stage, cached, "export") if cached
                else call("export", stage_export, recipe, params, run, weights))
    yield exported
    precision = (call("precision", reuse_stage, cached, "precision") if cached
                 else call("precision", stage_precision, recipe, params, run, exported.outputs["onnx"]))
    yield precision
    variants = precision.outputs["variants"]
    yield call("tensorrt", stage_tensorrt, recipe, params, run, exported.outputs["onnx"], variants)
    deployed = call("deploy", stage_deploy, recipe, params, run, variants)
    yield deployed
    yield call("served_check", stage_served_check, recipe, deployed.outputs, variants, _torch_top1(recipe, weights))
    yield call("benchmark", stage_benchmark, params, run, deployed.outputs)


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
