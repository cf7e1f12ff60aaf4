"""The Prefect flow `train-export-serve`: every stage of `run_pipeline` runs as a Prefect task.

    tes up
    prefect deployment run 'train-export-serve/default' --watch \
        --param recipe=digits-cnn --param training='{"steps": 100}'

The flow's parameters are the fields of `PipelineParams`, one by one, so each can be set with its own
`--param`; a test keeps the two lists equal.
"""

from pathlib import Path
from typing import Annotated, Any, Callable

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from pydantic import Field

from accounting.ledger import Prices
from bench.stage import BenchmarkOptions, run_benchmark
from core.errors import ServerError
from core.results import StageResult
from export.onnx_export import ExportConfig
from export.trt_engine import EngineConfig
from export.variants import PrecisionConfig
from flows import stack
from flows.params import MODEL_NAME_PATTERN, RECIPE_PATTERN, PipelineParams, ServingParams, parse_params
from flows.pipeline import run_pipeline
from recipes import DigitsCnnOptions, StdlibGptOptions
from training.loop import TrainingConfig

REPORT_ARTIFACT_KEY = "train-export-serve-report"


def _as_task(stage: str, function: Callable, *args: Any) -> Any:
    def run_stage(*stage_args: Any) -> StageResult:
        result = function(*stage_args)
        reason = f": {result.reason}" if result.reason else ""
        get_run_logger().info("%s %s in %.1f s%s", stage, result.status.value, result.seconds, reason)
        return result

    return task(run_stage, name=stage, cache_policy=NO_CACHE, persist_result=False)(*args)


def _publish(markdown: str) -> None:
    create_markdown_artifact(markdown=markdown, key=REPORT_ARTIFACT_KEY, description="train-export-serve run report")


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
    runs_dir: str = "runs",
    repository: str = "model_repository",
) -> dict:
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
            runs_dir=runs_dir,
            repository=repository,
        )
    )
    summary = run_pipeline(params, call=_as_task, publish=_publish)
    get_run_logger().info("run folder: %s", summary.run_dir)
    return summary.model_dump(mode="json")


@flow(name="benchmark", description="Benchmark a served model: baselines, concurrency and Poisson-rate sweeps, plots.")
def benchmark_flow(
    model: Annotated[str, Field(pattern=MODEL_NAME_PATTERN)] = "stdlib-gpt",
    options: BenchmarkOptions = BenchmarkOptions(),
    triton_url: str | None = None,
    triton_grpc_url: str | None = None,
    repository: str = "model_repository",
) -> dict:
    endpoint = stack.endpoint(triton_url, triton_grpc_url)
    if endpoint is None:
        raise ServerError("no Triton to benchmark: start the stack with `tes up`, or pass triton_url")
    result = run_benchmark(model, options, endpoint, repository_path=repository, progress=get_run_logger().info)
    markdown = Path(result.outputs["markdown"]).read_text()
    create_markdown_artifact(markdown=markdown, key="benchmark-report", description=f"benchmark of {model}")
    best = result.best_rate_under_budget
    return {"outputs": result.outputs, "best_rate_under_budget": best.to_dict() if best else None}
