"""The Prefect flow `train-export-serve`: every stage of `run_pipeline` runs as a Prefect task.

    tes up
    prefect deployment run 'train-export-serve/default' --watch \
        --param recipe=digits-cnn --param training='{"steps": 100}'

The flow's parameters are the fields of `PipelineParams`, one by one, so each can be set with its own
`--param`; a test keeps the two lists equal.
"""

import logging
from pathlib import Path
from typing import Annotated, Any, Callable

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner
from pydantic import Field

from accounting.ledger import Prices
from bench.stage import BenchmarkOptions, run_benchmark
from core.errors import ServerError
from core.results import StageResult
from export.gates import table_header, table_rows
from export.onnx_export import ExportConfig
from export.trt_engine import EngineConfig
from export.variants import PrecisionConfig
from flows import stack
from flows.params import (
    MODEL_NAME_PATTERN,
    RECIPE_PATTERN,
    PipelineParams,
    ServingParams,
    StagePolicies,
    parse_params,
)
from flows.pipeline import RunSummary, resumable_run, run_pipeline
from recipes import DigitsCnnOptions, StdlibGptOptions
from training.loop import TrainingConfig

REPORT_ARTIFACT_KEY = "train-export-serve-report"
# the project's loggers, which `tes up` names in PREFECT_LOGGING_EXTRA_LOGGERS so flow runs send them to Prefect
PROJECT_LOGGERS = ("recipes", "training", "export", "serving", "bench", "accounting", "flows")


def _log_to_prefect() -> None:
    """Prefect gives the extra loggers its handlers but not a level: left at the root's WARNING, training progress
    and the stages' INFO lines would never reach the run's log (or `prefect deployment run --watch`)."""
    for name in PROJECT_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO)


def _as_task(stage: str, function: Callable, *args: Any, cache_key: str | None = None, reused: bool = False) -> Any:
    """The stage as a Prefect task of its name. A stage with a cache key (train, export, precision) hands it to
    Prefect as the task's cache key and persists its result, so a stage the pipeline reuses shows as Cached in the
    UI; one the pipeline computes afresh refreshes Prefect's entry. The pipeline decides (it re-checks every
    artifact's sha256 first), and what comes back for a reused stage is the pipeline's own result."""

    def run_stage(*stage_args: Any) -> StageResult:
        result = function(*stage_args)
        reason = f": {result.reason}" if result.reason else ""
        get_run_logger().info("%s %s in %.1f s%s", stage, result.status.value, result.seconds, reason)
        return result

    if cache_key is None:
        options: dict[str, Any] = {"cache_policy": NO_CACHE, "persist_result": False}
    else:
        options = {
            "cache_key_fn": lambda *_: f"tes-{stage}-{cache_key}",
            "persist_result": True,
            "refresh_cache": not reused,
        }
    returned = task(run_stage, name=stage, **options)(*args)
    return function(*args) if reused else returned


def _task_runner(config: PrecisionConfig) -> TaskRunner:
    """Threads of the flow's process, or prefect-dask's runner on the cluster at `dask_address` (else a temporary
    local one of `build_workers` processes)."""
    if config.task_runner == "threads":
        return ThreadPoolTaskRunner(max_workers=config.build_workers)
    from export.dask_builds import local_cluster_options, require_distributed

    require_distributed()  # the install hint when Dask is missing
    from prefect_dask import DaskTaskRunner

    if config.dask_address:
        return DaskTaskRunner(address=config.dask_address)
    return DaskTaskRunner(cluster_kwargs=local_cluster_options(config.build_workers))


def _variant_tasks(config: PrecisionConfig):
    """How the flow builds precision variants: each a Prefect task `precision:<variant>` on the configured task
    runner, `build_workers` at a time with threads."""

    def map_builds(build: Callable, names: list[str]) -> list:
        variant = task(build, name="precision", task_run_name="precision:{name}", cache_policy=NO_CACHE)
        with _task_runner(config) as runner:
            futures = [runner.submit(variant.with_options(persist_result=False), {"name": name}) for name in names]
            return [future.result() for future in futures]

    return map_builds


def _publish(markdown: str) -> None:
    create_markdown_artifact(markdown=markdown, key=REPORT_ARTIFACT_KEY, description="train-export-serve run report")


def _publish_tables(summary: RunSummary) -> None:
    """Table artifacts of the precision variants and the benchmark points, and links to the report and the served
    endpoint, beside the report."""
    precision = summary.precision.output
    if precision is not None:
        header = table_header(precision.primary_metric)
        rows = [dict(zip(header, cells)) for cells in table_rows(list(precision.variants), precision.primary_metric)]
        create_table_artifact(table=rows, key="precision-variants", description="every variant, gated against FP32")
    bench = summary.benchmark.output
    if bench is not None and bench.points:
        rows = [
            {
                "protocol": p.protocol,
                "mode": p.mode,
                "load": p.load,
                "throughput_per_s": round(p.throughput, 1),
                "p50_ms": round(p.latency_ms.get("p50", 0), 2),
                "p99_ms": round(p.latency_ms.get("p99", 0), 2),
                "stable": p.stable,
            }
            for p in bench.points
        ]
        create_table_artifact(table=rows, key="benchmark-points", description="served latency and throughput")
    report = Path(summary.run_dir) / "report.md"
    create_link_artifact(link=report.as_uri(), link_text=str(report), key="run-report", description="the run report")
    deployed = summary.deploy.output
    if deployed is not None and deployed.triton_http:
        create_link_artifact(
            link=f"http://{deployed.triton_http}/v2/models/{deployed.model}",
            link_text=f"{deployed.model} on Triton (HTTP; gRPC {deployed.triton_grpc})",
            key="served-endpoint",
            description="the served model's metadata endpoint",
        )


@flow(
    name="train-export-serve", description="Train a recipe, export it to ONNX, deploy it to Triton and check it served."
)
def train_export_serve(
    recipe: Annotated[str, Field(pattern=RECIPE_PATTERN)] = "stdlib-gpt",
    model_name: Annotated[str | None, Field(pattern=MODEL_NAME_PATTERN)] = None,
    stdlib_gpt: StdlibGptOptions = StdlibGptOptions(),
    digits_cnn: DigitsCnnOptions = DigitsCnnOptions(),
    recipe_options: dict[str, Any] = {},
    training: TrainingConfig = TrainingConfig(),
    export: ExportConfig = ExportConfig(),
    precision: PrecisionConfig = PrecisionConfig(),
    tensorrt: EngineConfig = EngineConfig(),
    serving: ServingParams = ServingParams(),
    benchmark: BenchmarkOptions = BenchmarkOptions(),
    prices: Prices = Prices(),
    stages: StagePolicies = StagePolicies(),
    runs_dir: str = "runs",
    repository: str = "model_repository",
    resume_run: str | None = None,
) -> dict:
    """`resume_run`: the folder of a failed or crashed run to continue (its parameters are used; the others given
    here are ignored)."""
    params: PipelineParams = parse_params(
        dict(
            recipe=recipe,
            model_name=model_name,
            stdlib_gpt=stdlib_gpt,
            digits_cnn=digits_cnn,
            recipe_options=recipe_options,
            training=training,
            export=export,
            precision=precision,
            tensorrt=tensorrt,
            serving=serving,
            benchmark=benchmark,
            prices=prices,
            stages=stages,
            runs_dir=runs_dir,
            repository=repository,
        )
    )
    _log_to_prefect()
    resume = None
    if resume_run:
        params, resume = resumable_run(resume_run)
    builds = _variant_tasks(params.precision)
    summary = run_pipeline(params, call=_as_task, publish=_publish, resume=resume, map_builds=builds)
    _publish_tables(summary)
    get_run_logger().info("run folder: %s", summary.run_dir)
    return summary.model_dump(mode="json")


@flow(name="benchmark", description="Benchmark a served model: baselines, concurrency and Poisson-rate sweeps, plots.")
def benchmark_flow(
    model: Annotated[str, Field(pattern=MODEL_NAME_PATTERN)] = "stdlib-gpt",
    options: BenchmarkOptions = BenchmarkOptions(),
    triton_url: str | None = None,
    triton_grpc_url: str | None = None,
    repository: str | None = None,
) -> dict:
    """`repository`: what the model was made from; default: the one the stack's Triton reads."""
    endpoint = stack.endpoint(triton_url, triton_grpc_url)
    if endpoint is None:
        raise ServerError("no Triton to benchmark: start the stack with `tes up`, or pass triton_url")
    result = run_benchmark(model, options, endpoint, repository_path=repository, progress=get_run_logger().info)
    markdown = Path(result.outputs["markdown"]).read_text()
    create_markdown_artifact(markdown=markdown, key="benchmark-report", description=f"benchmark of {model}")
    best = result.best_rate_under_budget
    return {"outputs": result.outputs, "best_rate_under_budget": best.to_dict() if best else None}
