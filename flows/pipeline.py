"""The `train-export-serve` pipeline: train -> export -> precision variants -> tensorrt -> deploy -> served check ->
benchmark -> ledger and report.

`run_pipeline` reads top to bottom: each stage is a plain function of the stage packages that returns a typed
`StageResult`, and the next stage takes what it needs from the previous one's `output`. The Prefect flow
`train-export-serve` runs it with every stage as a Prefect task (`prefect deployment run
'train-export-serve/default' --watch`, after `tes up`); `tes run` runs the very same function in-process.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from accounting import stage as accounting
from accounting.ledger import Ledger
from bench.stage import BenchmarkOutput, benchmark_stage
from core import paths
from core.files import atomic_write_json, atomic_write_text
from core.results import RunDir, StageResult, find_run, last_run_pointer, new_run_id
from core.runtimes import open_session
from export import trt_engine
from export.onnx_export import ExportOutput, export_stage
from export.trt_engine import EngineOutput
from export.variants import PrecisionOutput, precision_stage
from flows import cache, stack
from flows.params import PipelineParams, ServingParams
from flows.report import render_report
from recipes import Recipe
from recipes.evaluation import load_trained, torch_predictor
from serving.check import ServedCheckOutput, check_served
from serving.deploy import Deployable, DeployOutput, deploy
from serving.triton import Endpoint
from training.loop import TrainOutput, pick_device, train

log = logging.getLogger(__name__)

# How a stage is called: `call(name, function, *args)` returns `function(*args)`, directly (tes run) or as a
# Prefect task of that name (the flow).
StageCall = Callable[..., StageResult]


def direct_call(_stage: str, function: Callable[..., StageResult], *args: Any) -> StageResult:
    return function(*args)


class RunSummary(BaseModel):
    """A completed run: every stage's typed result, in pipeline order; `summary.json` of the run folder."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    run_id: str
    run_dir: str
    status: str
    train: StageResult[TrainOutput]
    export: StageResult[ExportOutput]
    precision: StageResult[PrecisionOutput]
    tensorrt: StageResult[EngineOutput]
    deploy: StageResult[DeployOutput]
    served_check: StageResult[ServedCheckOutput]
    benchmark: StageResult[BenchmarkOutput]
    ledger: dict[str, str]  # json, plot

    def stages(self) -> list[StageResult]:
        return [self.train, self.export, self.precision, self.tensorrt, self.deploy, self.served_check, self.benchmark]


# the stages an identical earlier run can stand in for, and their outputs (flows/cache.py finds that run)
REUSABLE: dict[str, type] = {"train": TrainOutput, "export": ExportOutput, "precision": PrecisionOutput}


class _Stages:
    """Calls each stage inside its ledger entry and records its result in the run's manifest as it finishes."""

    def __init__(self, run: RunDir, ledger: Ledger, call: StageCall, device: str, cached: dict | None):
        self.run = run
        self.call = accounting.measured(ledger, call, device)
        self.earlier, self.source = _reusable(cached), RunDir(cached["run_dir"], create=False) if cached else None

    def __call__(self, name: str, function: Callable[..., StageResult], *args: Any) -> StageResult:
        result = self.call(name, function, *args)
        self.run.record(result)
        return result

    def reused_or_run(self, name: str, function: Callable[..., StageResult], *args: Any) -> StageResult:
        """The result of an earlier identical run (same data, code and configuration), else a fresh run."""
        earlier = self.earlier.get(name)
        if earlier is None:
            return self(name, function, *args)
        self.run.reuse(name, self.source)
        reason = f"cached: same data, code and configuration as {self.source.run_id}"
        return self(name, lambda: earlier.model_copy(update={"reason": reason, "seconds": 0.0}))


def _reusable(cached: dict | None) -> dict[str, StageResult]:
    """Every reusable stage of the cached run, or none at all: fresh weights never meet a cached ONNX file."""
    if cached is None:
        return {}
    try:
        return {name: StageResult[kind].model_validate(cached["stages"][name]) for name, kind in REUSABLE.items()}
    except (KeyError, ValidationError):  # written by an older version of this project: compute it all afresh
        return {}


def resolve_endpoint(serving: ServingParams) -> tuple[Endpoint | None, str]:
    """The Triton this run deploys to, resolved once when it starts; (None, why) when it deploys to no server."""
    if not serving.load:
        return None, "serving.load is false"
    found = stack.endpoint(serving.triton_url, serving.triton_grpc_url, serving.triton_admin_key)
    if found is None:
        return None, "no Triton is running: start one with `tes up`, or set serving.triton_url"
    return found, ""


def run_pipeline(
    params: PipelineParams, call: StageCall = direct_call, publish: Callable[[str], None] | None = None
) -> RunSummary:
    """Run every stage in order; returns the run summary (also written to the run folder).

    A run whose data, code and configuration match an earlier completed run reuses its training, export and
    precision artifacts, and the deployment reuses identical versions: nothing is computed twice."""
    recipe = params.build_recipe()
    endpoint = resolve_endpoint(params.serving)  # once, here: every stage that talks to Triton gets this one
    run = RunDir(paths.resolve(params.runs_dir) / new_run_id(params.triton_model_name))
    key = cache.cache_key(params, recipe)
    run.update(params=params.model_dump(mode="json"), recipe=recipe.describe(), status="running", cache_key=key)
    log.info("run folder: %s", run.path)
    ledger = Ledger(params.prices)
    stage = _Stages(run, ledger, call, str(pick_device(params.training.device)), cache.lookup(key, REUSABLE))
    try:
        trained, exported, precision, engine = _build(stage, recipe, params, run)
        deployed, served, benchmark = _serve(stage, recipe, params, run, endpoint, trained, precision)
    except BaseException as error:  # the manifest must say the run failed, whatever stopped it
        run.update(status="failed", error=f"{type(error).__name__}: {error}")
        raise
    extra = accounting.enrich(ledger, recipe, params.training.batch_size, trained, precision, benchmark)
    ledger_files, ledger_markdown = accounting.write(ledger, extra, run.ledger_json, run.ledger_plot)
    summary = RunSummary(
        run_id=run.run_id,
        run_dir=str(run.path),
        status="completed",
        train=trained,
        export=exported,
        precision=precision,
        tensorrt=engine,
        deploy=deployed,
        served_check=served,
        benchmark=benchmark,
        ledger=ledger_files,
    )
    _finish(run, summary, key, ledger_markdown, publish)
    return summary


def _build(stage: _Stages, recipe: Recipe, params: PipelineParams, run: RunDir) -> tuple[StageResult, ...]:
    """The artifacts: trained weights, the verified ONNX file, its precision variants, a TensorRT engine."""
    trained = stage.reused_or_run("train", train, recipe, params.training, run.stage_dir("train"))
    exported = stage.reused_or_run(
        "export",
        export_stage,
        recipe,
        trained.output.weights,
        run.stage_dir("export"),
        params.export,
        params.training.eval_samples,
    )
    onnx_path = exported.output.onnx
    precision = stage.reused_or_run(
        "precision",
        precision_stage,
        recipe,
        onnx_path,
        run.stage_dir("precision"),
        params.precision,
        trained.output.weights,
    )
    batch_limit = max(1, params.serving_config(recipe).max_batch_size)
    engine = stage(
        "tensorrt",
        trt_engine.run_stage,
        recipe,
        onnx_path,
        precision.output.variants,
        run.stage_dir("tensorrt"),
        params.tensorrt,
        params.precision,
        batch_limit,
    )
    return trained, exported, precision, engine


def _serve(
    stage: _Stages,
    recipe: Recipe,
    params: PipelineParams,
    run: RunDir,
    resolved: tuple[Endpoint | None, str],
    trained: StageResult,
    precision: StageResult,
) -> tuple[StageResult, ...]:
    """Serving them: deployed into the repository and loaded into the run's Triton (`resolved`: the endpoint, or
    none and why), checked as served, and benchmarked."""
    endpoint, not_loaded = resolved
    provenance = {"run_id": run.run_id, "run_dir": str(run.path), **recipe.describe()}
    selection = precision.output
    deployed = stage(
        "deploy",
        deploy,
        paths.resolve(params.repository),
        params.triton_model_name,
        _deployables(selection),
        selection.selected,
        params.serving_config(recipe),
        provenance,
        endpoint,
        not_loaded,
    )
    served = stage("served_check", _served_check, recipe, selection, deployed.output, trained.output.weights)
    reached = endpoint if deployed.output.loaded else None
    benchmark = stage(
        "benchmark",
        benchmark_stage,
        params.benchmark,
        deployed.output.model,
        reached,
        deployed.output.load_skipped,
        params.repository,
        run.stage_dir("benchmark"),
        log.info,
    )
    return deployed, served, benchmark


def _deployables(precision: PrecisionOutput) -> list[Deployable]:
    return [
        Deployable(v.name, v.path, v.runtime, v.runtime_precision or "", v.settings, tuple(v.files))
        for v in precision.accepted
    ]


def _served_check(
    recipe: Recipe, precision: PrecisionOutput, deployed: DeployOutput, weights: str
) -> StageResult[ServedCheckOutput]:
    """The served check with its in-process references: each deployed variant in its own runtime, and torch."""
    if not deployed.loaded:
        return StageResult.skipped("served_check", deployed.load_skipped or "model not loaded")
    sessions = {
        v.name: open_session(v.path, v.runtime, v.runtime_precision, settings=v.runtime_settings())
        for v in precision.accepted
        if v.name in deployed.variants
    }
    batches = [batch.inputs for batch in recipe.eval_batches(8, max_samples=32)]
    predict = torch_predictor(load_trained(recipe, weights), recipe)
    torch_top1: list[np.ndarray] = [predict(inputs).argmax(-1) for inputs in batches]
    return check_served(deployed, sessions, batches, torch_top1)


def _finish(
    run: RunDir, summary: RunSummary, key: str | None, ledger_markdown: str, publish: Callable[[str], None] | None
) -> None:
    run.update(status="completed", ledger=summary.ledger)
    cache.remember(key, run.path)
    markdown = render_report(summary) + "\n## Compute and energy ledger\n\n" + ledger_markdown
    atomic_write_text(run.report, markdown)
    atomic_write_json(run.summary, summary.model_dump(mode="json"))
    atomic_write_json(last_run_pointer(), {"run_dir": str(run.path)})
    if publish:
        publish(markdown)


def load_summary(run: str | Path | None = None) -> RunSummary:
    """A finished run's summary: by folder, or the last run of this project home."""
    return RunSummary.model_validate_json(find_run(run).summary.read_text(encoding="utf-8"))
