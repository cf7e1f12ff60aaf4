"""The one typed parameter model of the `train-export-serve` flow.

Prefect stores its JSON schema on the deployment, so `prefect deployment run --param ...` with a value of the
wrong type, out of range, or an unknown field is refused before a run is created. Checks that span fields
(the recipe's own options, names) run when the model is built, all reported together.
"""

from __future__ import annotations

import re
from pathlib import PurePath
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from accounting.ledger import Prices
from bench.stage import BenchmarkOptions
from core.errors import ConfigError, RecipeError
from export.onnx_export import ExportConfig
from export.trt_engine import EngineConfig
from export.variants import PrecisionConfig
from recipes import DigitsCnnOptions, Recipe, StdlibGptOptions, build_recipe, validation_problems
from serving.repository import ServingConfig, check_model_name
from training.loop import TrainingConfig

RECIPE_PATTERN = r"^(stdlib-gpt|digits-cnn|(hf|torch|onnx):.+|[A-Za-z_][\w.]*:[A-Za-z_]\w*)$"
MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"


class ServingParams(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    max_batch_size: int | None = Field(
        None, ge=0, le=4096, description="None: the recipe's default; 0 disables batching"
    )
    dynamic_batching: bool = True
    max_queue_delay_microseconds: int = Field(
        0,
        ge=0,
        le=10_000_000,
        description="how long the batcher may hold a request for company; 0 measured best here "
        "(benchmarks/serving_overhead.py)",
    )
    max_queue_size: int = Field(
        0, ge=0, le=1_000_000, description="refuse requests beyond this many waiting; 0: no limit"
    )
    instance_count: int = Field(1, ge=1, le=64, description="instances per device (per GPU with instance_kind gpu)")
    instance_kind: Literal["auto", "cpu", "gpu"] = Field(
        "cpu",
        description="where instances run: cpu; gpu (every GPU of the server, TensorRT then CUDA execution providers "
        "with onnxruntime-gpu; a server without a GPU fails the load); auto (Triton's choice: GPUs when it has some)",
    )
    intra_op_threads: int = Field(0, ge=0, le=256, description="ONNX Runtime threads per instance; 0: its default")
    load: bool = Field(True, description="load the new version into the running Triton (tes up) when there is one")
    keep_versions: int = Field(
        3,
        ge=0,
        le=1000,
        description="after a deploy, delete all but this many newest versions of each model (never the served one); "
        "0 keeps all. Triton downloads every version folder of a model from S3 at each load",
    )
    triton_url: str | None = Field(
        None, description="host:port of Triton's HTTP endpoint; None: the one `tes up` started"
    )
    triton_grpc_url: str | None = Field(None, description="host:port of its gRPC endpoint, checked too when given")
    triton_admin_key: str | None = Field(
        None, description="key for its model-repository API, if restricted; None: the key of the stack `tes up` started"
    )


class StagePolicy(BaseModel):
    """How long a stage may run, and how often it is tried again after a failure that may pass."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    timeout_s: float = Field(gt=0, le=30 * 86400, description="the stage is stopped and fails after this long")
    retries: int = Field(0, ge=0, le=10, description="tries after the first, on failures that may pass")
    retry_delay_s: float = Field(2.0, ge=0, le=3600, description="wait before the first retry; doubles each time")


class StagePolicies(BaseModel):
    """Per stage. A retried train stage resumes from its last checkpoint; deploy and the served check are retried
    on transient failures (a model load racing a restart, a refused connection); a bad configuration is never
    retried."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    train: StagePolicy = StagePolicy(timeout_s=7 * 86400, retries=1)
    export: StagePolicy = StagePolicy(timeout_s=6 * 3600)
    precision: StagePolicy = StagePolicy(timeout_s=12 * 3600)
    tensorrt: StagePolicy = StagePolicy(timeout_s=12 * 3600)
    deploy: StagePolicy = StagePolicy(timeout_s=3600, retries=2)
    served_check: StagePolicy = StagePolicy(timeout_s=1800, retries=2)
    benchmark: StagePolicy = StagePolicy(timeout_s=6 * 3600)


class PipelineParams(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    recipe: str = Field(
        "stdlib-gpt",
        pattern=RECIPE_PATTERN,
        description="built-in recipe, package.module:attribute, or a model you bring: hf:<dir or hub id>, "
        "torch:<module>:<factory>, onnx:<path> (their options go in recipe_options)",
    )
    model_name: str | None = Field(
        None, pattern=MODEL_NAME_PATTERN, description="Triton model name; None: the recipe's name"
    )
    stdlib_gpt: StdlibGptOptions = StdlibGptOptions()
    digits_cnn: DigitsCnnOptions = DigitsCnnOptions()
    recipe_options: dict[str, Any] = Field(
        default_factory=dict, description="options of a user's own recipe or model source (task, weights, samples...)"
    )
    training: TrainingConfig = TrainingConfig()
    export: ExportConfig = ExportConfig()
    precision: PrecisionConfig = PrecisionConfig()
    tensorrt: EngineConfig = EngineConfig()
    serving: ServingParams = ServingParams()
    benchmark: BenchmarkOptions = BenchmarkOptions()
    prices: Prices = Prices()
    stages: StagePolicies = StagePolicies()
    runs_dir: str = Field(
        "runs",
        min_length=1,
        description="where run folders go: a folder (relative to the project home), or s3://bucket/prefix, shared "
        "by workers on several machines (a local copy is worked on, mirrored as each stage finishes)",
    )
    repository: str = Field(
        "model_repository",
        min_length=1,
        description="the Triton model repository: a folder (relative to the project home), or s3://bucket/prefix "
        "(the S3 endpoint: AWS_ENDPOINT_URL, else AWS) or s3://host:port/bucket/prefix",
    )

    @field_validator("repository", "runs_dir")
    @classmethod
    def _s3_url(cls, value: str, info: ValidationInfo) -> str:
        """An s3:// URL is checked against Triton's rules here, every problem at once, before a run starts."""
        if value.startswith("s3://"):
            from serving.s3_store import S3Location  # boto3: only for S3 locations

            try:
                S3Location.parse(value)
            except ConfigError as error:
                first, *others = error.problems  # one line each; the error's own prefix names the field once
                raise ValueError("\n".join([first, *(f"{info.field_name}: {p}" for p in others)])) from error
        return value

    @model_validator(mode="after")
    def _cross_checks(self) -> "PipelineParams":
        problems = []
        try:
            recipe = self.build_recipe()
        except (ConfigError, RecipeError) as error:
            problems.extend(getattr(error, "problems", [str(error)]))
        else:
            limit = self.serving.max_batch_size
            if limit is not None and limit > recipe.max_batch_size:
                problems.append(
                    f"serving.max_batch_size: {limit} is above what recipe '{recipe.name}' exports "
                    f"({recipe.max_batch_size}); use at most {recipe.max_batch_size}"
                )
        try:
            check_model_name(self.triton_model_name)
        except Exception as error:
            problems.append(f"model_name: {error}")
        if self.runs_dir.startswith("s3://") and self.precision.dask_address:
            problems.append(
                "precision.dask_address: with runs_dir on S3 the run works in a local copy that another machine's Dask "
                "workers cannot see; use a local cluster (no dask_address) or a runs_dir on a shared file system"
            )
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def recipe_options_for(self) -> dict[str, Any] | BaseModel:
        return {"stdlib-gpt": self.stdlib_gpt, "digits-cnn": self.digits_cnn}.get(self.recipe, self.recipe_options)

    def build_recipe(self) -> Recipe:
        return build_recipe(self.recipe, self.recipe_options_for())

    @property
    def triton_model_name(self) -> str:
        """`model_name`, else from the recipe: `stdlib-gpt`; `pkg.mod:my_recipe` -> `my-recipe`; a model source's
        folder or file name (`hf:./models/tiny-bert` -> `tiny-bert`, `onnx:/x/resnet.onnx` -> `resnet`)."""
        if self.model_name:
            return self.model_name
        kind, _, source = self.recipe.partition(":")
        if kind in ("hf", "onnx"):
            name = PurePath(source.rstrip("/")).name
            name = name.removesuffix(".onnx") if kind == "onnx" else name
        else:
            name = self.recipe.rpartition(":")[2].replace("_", "-")
        return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.") or "model"

    def serving_config(self, recipe: Recipe) -> ServingConfig:
        value_ranges = {spec.name: spec.value_range for spec in recipe.inputs if spec.value_range is not None}
        max_dims = {
            spec.name: [spec.ranges[axis][2] if size == -1 else size for axis, size in enumerate(spec.shape)]
            for spec in recipe.inputs
        }
        limit = recipe.max_batch_size if self.serving.max_batch_size is None else self.serving.max_batch_size
        return ServingConfig(
            max_batch_size=limit,
            dynamic_batching=self.serving.dynamic_batching,
            max_queue_delay_microseconds=self.serving.max_queue_delay_microseconds,
            max_queue_size=self.serving.max_queue_size,
            instance_count=self.serving.instance_count,
            instance_kind=self.serving.instance_kind,
            intra_op_threads=self.serving.intra_op_threads,
            value_ranges=value_ranges,
            max_dims=max_dims,
        )


def parse_params(data: dict[str, Any] | None = None) -> PipelineParams:
    """Build the parameters, turning every validation problem into one `ConfigError`."""
    try:
        return PipelineParams(**(data or {}))
    except ValidationError as error:
        problems = []
        for line in validation_problems(error):
            # an after-validator's message holds several problems, one per line, prefixed "Value error, "
            problems.extend(part.strip() for part in line.split("\n") if part.strip())
        raise ConfigError(problems, where="pipeline parameters") from error
