"""The `train-export-serve` pipeline: train -> export -> precision variants -> tensorrt -> deploy -> served check ->
benchmark -> ledger and report.

`run_pipeline` reads top to bottom: each stage is a plain function of the stage packages that returns a typed
`StageResult`, and the next stage takes what it needs from the previous one's `output`. The Prefect flow
`train-export-serve` runs it with every stage as a Prefect task (`prefect deployment run
'train-export-serve/default' --watch`, after `tes up`); `tes run` runs the very same function in-process.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from accounting import stage as accounting
from accounting.ledger import Ledger
from bench.stage import BenchmarkOutput, benchmark_stage
from core import paths
from core.errors import TesError
from core.files import atomic_write_json, atomic_write_text
from core.results import RunDir, StageResult, claim_run_dir, find_run, last_run_pointer
from core.runtimes import open_session
from export import trt_engine
from export.adopt import adopt_stage
from export.onnx_export import ExportOutput, export_stage
from export.trt_engine import EngineOutput
from export.variants import BuildMap, PrecisionOutput, precision_stage
from flows import cache, stack
from flows.limits import limited
from flows.params import PipelineParams, ServingParams, StagePolicies, parse_params
from flows.report import render_report
from flows.run_store import RunStore, is_s3, split_run_url
from recipes import Recipe
from recipes.evaluation import reference_model, session_predictor, torch_predictor
from serving.check import ServedCheckOutput, check_served
from serving.deploy import Deployable, DeployOutput, deploy
from serving.triton import Endpoint
from training.loop import TrainOutput, pick_device, train

log = logging.getLogger(__name__)
_DASK_NOTE = (
    "variants built on Dask workers ({}): this entry's CPU time and energy hold their work only where they were "
    "this process's children (a local cluster), not a remote cluster's"
)

# How a stage is called: `call(name, function, *args, cache_key=..., reused=...)` returns `function(*args)`,
# directly (tes run) or as a Prefect task of that name (the flow), which hands the key to Prefect's cache.
StageCall = Callable[..., StageResult]


def direct_call(_stage: str, function: Callable[..., StageResult], *args: Any, **_options: Any) -> StageResult:
    """Call the stage here; `_options` (its cache key, whether it is reused) matter only to Prefect tasks."""
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
    recipe: dict[str, Any] = {}  # recipe.describe(), and what a model source asks the report to say (`notes`)

    def stages(self) -> list[StageResult]:
        return [self.train, self.export, self.precision, self.tensorrt, self.deploy, self.served_check, self.benchmark]


# the stages an earlier run can stand in for, and their outputs (flows/cache.py finds that run, stage by stage)
REUSABLE: dict[str, type] = {"train": TrainOutput, "export": ExportOutput, "precision": PrecisionOutput}


class _Stages:
    """Calls each stage inside its ledger entry and records its result in the run's manifest as it finishes.

    `reused_or_run` first looks for the stage's result: in this run's own manifest when the run is resumed, else in
    the per-stage cache (an earlier run with the same inputs, code and parameters); either is taken only when its
    artifacts still have their recorded sha256."""

    def __init__(
        self,
        run: RunDir,
        ledger: Ledger,
        call: StageCall,
        device: str,
        policies: StagePolicies,
        resumed: bool = False,
        map_builds: BuildMap | None = None,
        runs: RunStore | None = None,
    ):
        self.run, self.policies, self.map_builds, self.runs = run, policies, map_builds, runs
        self.call = accounting.measured(ledger, call, device)
        self.earlier = _resumable(run) if resumed else {}

    def __call__(self, name: str, function: Callable[..., StageResult], *args: Any, cache_key: str | None = None):
        """Run the stage within its time limit, with its retries (`PipelineParams.stages`)."""
        policy = getattr(self.policies, name)
        function = limited(name, function, policy.timeout_s, policy.retries, policy.retry_delay_s)
        result = self.call(name, function, *args, cache_key=cache_key, reused=False)
        self.run.record(result)
        return result

    def reused_or_run(
        self, name: str, key: str | None, function: Callable[..., StageResult], *args: Any
    ) -> StageResult:
        """The result of this run before it was resumed, or of an earlier run with the same key; else a fresh run
        (remembered under `key` as soon as it finishes)."""
        own = self.earlier.get(name)
        if own is not None:
            reason = f"resumed: completed in this run before it stopped ({own.seconds:.1f} s then)"
            result = own.model_copy(update={"reason": reason, "seconds": 0.0})
            return self._record(self.call(name, lambda: result, cache_key=key, reused=True))
        found = cache.lookup(name, key, self.runs)
        if found is not None:
            try:
                earlier = StageResult[REUSABLE[name]].model_validate(found[0])
            except ValidationError:  # written by an older version of this project: compute it afresh
                earlier = None
            if earlier is not None:
                source = RunDir(found[1], create=False)
                self.run.reuse(name, source)
                reason = f"cached: same inputs, code and configuration as {source.run_id}"
                result = earlier.model_copy(update={"reason": reason, "seconds": 0.0})
                return self._record(self.call(name, lambda: result, cache_key=key, reused=True))
        result = self(name, function, *args, cache_key=key)
        if result.ok:
            cache.remember(key, self.run, name, self.runs)
        return result

    def _record(self, result: StageResult) -> StageResult:
        self.run.record(result)
        return result


def _resumable(run: RunDir) -> dict[str, StageResult]:
    """The stages of a resumed run that completed, with every artifact intact; a stage after one that must run
    again is not reused (it was made from what is about to change)."""
    recorded = run.read_manifest().get("stages", {})
    found: dict[str, StageResult] = {}
    for name, kind in REUSABLE.items():
        try:
            result = StageResult[kind].model_validate(recorded[name])
        except (KeyError, ValidationError):
            break
        if result.status.value not in ("ok", "skipped") or not all(a.intact() for a in result.artifacts):
            break
        found[name] = result
    return found


def resolve_endpoint(serving: ServingParams) -> tuple[Endpoint | None, str]:
    """The Triton this run deploys to, resolved once when it starts; (None, why) when it deploys to no server."""
    if not serving.load:
        return None, "serving.load is false"
    found = stack.endpoint(serving.triton_url, serving.triton_grpc_url, serving.triton_admin_key)
    if found is None:
        return None, "no Triton is running: start one with `tes up`, or set serving.triton_url"
    return found, ""


def run_pipeline(
    params: PipelineParams,
    call: StageCall = direct_call,
    publish: Callable[[str], None] | None = None,
    resume: RunDir | None = None,
    map_builds: BuildMap | None = None,
) -> RunSummary:
    """Run every stage in order; returns the run summary (also written to the run folder).

    Train, export and precision are each reused when an earlier run made them from the same inputs, code and
    parameters (`flows/cache.py`), and the deployment reuses identical versions: nothing is computed twice. With
    `resume` (a failed or crashed run's folder, see `resumable_run`), the run continues in that folder: its completed
    stages are reused after their sha256 are checked, and training continues from its last checkpoint."""
    recipe = params.build_recipe()
    endpoint = resolve_endpoint(params.serving)  # once, here: every stage that talks to Triton gets this one
    runs = RunStore(params.runs_dir) if is_s3(params.runs_dir) else None
    if resume is not None:
        run = resume
    elif runs is not None:
        run = runs.claim(params.triton_model_name)
    else:
        run = claim_run_dir(paths.resolve(params.runs_dir), params.triton_model_name)
    run.update(params=params.model_dump(mode="json"), recipe=recipe.describe(), status="running", error=None)
    log.info("%s run folder: %s", "resuming in" if resume else "run folder:", run.path)
    ledger = Ledger(params.prices)
    device = str(pick_device(params.training.device))
    stage = _Stages(run, ledger, call, device, params.stages, resume is not None, map_builds, runs)
    try:
        trained, exported, precision, engine = _build(stage, recipe, params, run)
        deployed, served, benchmark = _serve(stage, recipe, params, run, endpoint, trained, precision)
    except BaseException as error:  # the manifest must say the run failed, whatever stopped it
        try:
            run.update(status="failed", error=f"{type(error).__name__}: {error}")
        except Exception as mirroring:  # an S3 runs_dir out of reach must not hide why the run failed
            log.warning("the failed run's manifest was not mirrored: %s", mirroring)
        raise
    extra = accounting.enrich(ledger, recipe, params.training.batch_size, trained, precision, benchmark)
    if params.precision.task_runner == "dask" and not precision.reason:  # built now, not reused
        accounting.note(ledger, "precision", _DASK_NOTE.format(params.precision.dask_address or "a local cluster"))
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
        recipe={
            **recipe.describe(),
            "primary_metric": recipe.primary_metric,
            "notes": list(getattr(recipe, "notes", [])),
        },
    )
    _finish(run, summary, ledger_markdown, publish)
    return summary


def _build(stage: _Stages, recipe: Recipe, params: PipelineParams, run: RunDir) -> tuple[StageResult, ...]:
    """The artifacts: trained weights, the verified ONNX file, its precision variants, a TensorRT engine. A model
    the user brings (`hf:`, `torch:`, `onnx:`) skips training, and an ONNX file skips export: it is adopted."""
    key = cache.stage_key("train", params, recipe)
    if getattr(recipe, "trains", True):
        trained = stage.reused_or_run("train", key, train, recipe, params.training, run.stage_dir("train"))
    else:
        trained = stage.reused_or_run("train", key, _no_training, recipe)
    weights = trained.output.weights if trained.output else None
    key = cache.stage_key("export", params, recipe, trained.artifacts)
    if getattr(recipe, "has_torch_model", True):
        exported = stage.reused_or_run(
            "export",
            key,
            export_stage,
            recipe,
            weights,
            run.stage_dir("export"),
            params.export,
            params.training.eval_samples,
        )
    else:
        exported = stage.reused_or_run(
            "export", key, adopt_stage, recipe, run.stage_dir("export"), params.export, params.training.eval_samples
        )
    onnx_path = exported.output.onnx
    key = cache.stage_key("precision", params, recipe, (*trained.artifacts, *exported.artifacts))
    precision = stage.reused_or_run(
        "precision",
        key,
        precision_stage,
        recipe,
        onnx_path,
        run.stage_dir("precision"),
        params.precision,
        weights,
        stage.map_builds,
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
        params.repository,  # a folder (deploy resolves it against the project home) or an s3:// URL
        params.triton_model_name,
        _deployables(selection),
        selection.selected,
        params.serving_config(recipe),
        provenance,
        endpoint,
        not_loaded,
        params.serving.keep_versions,
    )
    weights = trained.output.weights if trained.output else None
    served = stage("served_check", _served_check, recipe, selection, deployed.output, weights)
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


def _no_training(recipe: Recipe) -> StageResult[TrainOutput]:
    return StageResult.skipped("train", f"'{recipe.name}' is a model you brought: it is served as it is, not trained")


def _deployables(precision: PrecisionOutput) -> list[Deployable]:
    return [
        Deployable(v.name, v.path, v.runtime, v.runtime_precision or "", v.settings, tuple(v.files))
        for v in precision.accepted
    ]


def _served_check(
    recipe: Recipe, precision: PrecisionOutput, deployed: DeployOutput, weights: str | None
) -> StageResult[ServedCheckOutput]:
    """The served check with its in-process references: each deployed variant in its own runtime, and torch (for
    an ONNX file the user brought, which has no torch model: the FP32 file in ONNX Runtime)."""
    if not deployed.loaded:
        return StageResult.skipped("served_check", deployed.load_skipped or "model not loaded")
    sessions = {
        v.name: open_session(v.path, v.runtime, v.runtime_precision, settings=v.runtime_settings())
        for v in precision.accepted
        if v.name in deployed.variants
    }
    batches = [batch.inputs for batch in recipe.eval_batches(8, max_samples=32)]
    model = reference_model(recipe, weights)
    fp32 = precision.variant("fp32")
    predict = (
        torch_predictor(model, recipe) if model is not None else session_predictor(open_session(fp32.path), recipe)
    )
    torch_top1: list[np.ndarray] = [predict(inputs).argmax(-1) for inputs in batches]
    return check_served(deployed, sessions, batches, torch_top1)


def _finish(run: RunDir, summary: RunSummary, ledger_markdown: str, publish: Callable[[str], None] | None) -> None:
    markdown = render_report(summary) + "\n## Compute and energy ledger\n\n" + ledger_markdown
    atomic_write_text(run.report, markdown)
    atomic_write_json(run.summary, summary.model_dump(mode="json"))
    run.update(status="completed", ledger=summary.ledger)  # last: with an S3 runs_dir, after every file is there
    atomic_write_json(last_run_pointer(), {"run_dir": str(run.path)})
    if publish:
        publish(markdown)


def resumable_run(run: str | Path) -> tuple[PipelineParams, RunDir]:
    """The parameters and folder of a run to resume: one that failed or was killed (a completed run has nothing
    left to do). Its parameters are the ones it started with."""
    if str(run) == "last":
        folder = _newest_unfinished(paths.resolve("runs"))
    elif is_s3(run):  # another machine's run: downloaded into this one's copy of the S3 runs folder
        store, run_id = split_run_url(str(run))
        folder = store.download(run_id)
        if folder.read_manifest().get("status") != "completed":
            store.take_over(run_id)  # the machine that ran it stops writing it
    else:
        folder = RunDir(paths.resolve(run) if not Path(run).is_absolute() else Path(run), create=False)
    manifest = folder.read_manifest()
    if manifest.get("status") == "completed":
        raise TesError(f"run {folder.path} completed; there is nothing to resume (start a new run with `tes run`)")
    if "params" not in manifest:
        raise TesError(f"{folder.path} has no parameters in its manifest.json: it is not a run folder of this project")
    return parse_params(manifest["params"]), folder


def _newest_unfinished(runs_dir: Path) -> RunDir:
    candidates = sorted(
        (path for path in runs_dir.glob("*/manifest.json") if path.is_file()), key=lambda p: p.stat().st_mtime
    )
    for manifest in reversed(candidates):
        if json.loads(manifest.read_text()).get("status") != "completed":
            return RunDir(manifest.parent, create=False)
    raise TesError(f"no failed or unfinished run in {runs_dir} to resume; start one with `tes run`")


def load_summary(run: str | Path | None = None) -> RunSummary:
    """A finished run's summary: by folder, or the last run of this project home."""
    return RunSummary.model_validate_json(find_run(run).summary.read_text(encoding="utf-8"))
