"""The `tensorrt` stage: ONNX -> TensorRT engine, built in a child process, then verified and gated like a variant.

    tes run --param tensorrt.precision=fp16      # the stage inside the pipeline (needs TensorRT 10 and a CUDA GPU)
    bash runs/<run>/tensorrt/fp16/reproduce.sh   # the same build with trtexec, written beside every engine

- profiles: the recipe's (min, opt, max) per dynamic axis, and batch 1 / `opt_batch_size` / `max_batch_size`;
- precision: `fp32` (TF32 off), `fp16`, `bf16` from the FP32 ONNX model, `int8-static` from the explicitly
  quantized (QDQ) variant; `int8-dynamic` cannot be built (TensorRT's ONNX parser lacks its operators);
- the build (`export/tensorrt_build.py`) runs in a child process: a crash in native code fails this stage only;
- beside the engine: `engine.json` (the manifest that deployment checks), `reproduce.sh`, `build.log`, and after
  verification `verification.json` (outputs against FP32 ONNX Runtime, the recipe's metric, the variant gates).

Without TensorRT or a GPU the stage is SKIPPED with the reason. docs/tensorrt.md says what was executed here.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Callable, Literal, Sequence

import numpy as np
import onnx
from pydantic import BaseModel, ConfigDict, Field

from core import paths
from core.errors import EngineMismatch
from core.files import atomic_write_json, atomic_write_text
from core.results import Artifact, RunDir, StageOutput, StageResult, Status, timed
from core.runtimes import open_session
from export.tensorrt_build import CLEARED_FLAGS, ENGINE_FILE, MANIFEST_FILE, PRECISION_FLAGS
from export.trt_checks import EngineTolerance, judge, outside_profile
from export.variants import PrecisionConfig, VariantReport
from recipes import Recipe

Precision = Literal["fp32", "fp16", "bf16", "int8-static"]
TRTEXEC_FLAGS = {"FP16": "--fp16", "BF16": "--bf16", "INT8": "--int8"}
NOT_BUILDABLE = {
    "int8-dynamic": "TensorRT's ONNX parser does not support DynamicQuantizeLinear / MatMulInteger, the operators of "
    "ONNX Runtime's dynamic quantization; build `int8-static` (the QDQ model) instead",
}
TAIL_CHARS = 3000  # of a failed child's log, in the stage's reason


class EngineOutput(StageOutput):
    folder: str = ""  # the engine's folder: model.plan, engine.json, reproduce.sh, build.log, verification.json
    engine: str = ""
    manifest: str = ""
    reproduce: str = ""  # the trtexec equivalent, written even where the build is skipped
    source_onnx: str = ""
    verification: VariantReport | None = None  # the engine scored and gated like a precision variant


class EngineConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = True
    precision: Precision = Field(
        "fp16", description="fp32 | fp16 | bf16 from the FP32 model; int8-static from the QDQ variant"
    )
    opt_batch_size: int | None = Field(None, ge=1, description="batch TensorRT tunes for; None: max_batch_size")
    workspace_mb: int = Field(4096, ge=64, description="builder workspace memory pool limit, MiB")
    optimization_level: int = Field(3, ge=0, le=5, description="TensorRT builder optimization level")
    timing_cache: str = Field(".tes/trt-timing.cache", description="loaded before and saved after every build")
    hardware_compatibility: Literal["none", "ampere_plus"] = Field(
        "none", description="ampere_plus: runs on any GPU >= 8.0"
    )
    version_compatible: bool = Field(False, description="runs on later TensorRT versions of the same major version")
    strongly_typed: bool = Field(False, description="types come from the ONNX graph; no precision flags")
    build_timeout_s: int = Field(3600, ge=10)
    verify_samples: int = Field(256, ge=1, description="held-out samples compared with FP32 ONNX Runtime")
    verify_timeout_s: int = Field(900, ge=10)
    tolerances: dict[str, EngineTolerance] = Field(
        default_factory=dict, description="per output name; else the precision's default"
    )


# --- pure logic: profiles, sources, commands ------------------------------------------------------------------------
def profile_shapes(
    recipe: Recipe, max_batch_size: int, opt_batch_size: int | None = None
) -> dict[str, dict[str, list[int]]]:
    """min/opt/max of every input, batch axis first: batch 1 / opt / max; dynamic axes from the recipe's ranges."""
    opt_batch = min(opt_batch_size or max_batch_size, max_batch_size)
    shapes = {}
    for spec in recipe.inputs:
        low, opt, high = [1], [opt_batch], [max_batch_size]
        for axis, size in enumerate(spec.shape):
            a, b, c = spec.ranges[axis] if size == -1 else (size, size, size)
            low.append(a), opt.append(b), high.append(c)
        shapes[spec.name] = {"min": low, "opt": opt, "max": high}
    return shapes


def onnx_profile_problems(shapes: dict[str, dict[str, list[int]]], onnx_path: str | Path) -> list[str]:
    """What TensorRT would refuse: an ONNX input without a profile (or the reverse), another rank, a fixed axis
    whose profile moves, min > opt > max."""
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    initializers = {init.name for init in graph.initializer}
    graph_inputs = {
        v.name: [d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim]
        for v in graph.input
        if v.name not in initializers
    }
    problems = [
        f"ONNX input '{name}' has no profile; the recipe's inputs are {sorted(shapes)}"
        for name in graph_inputs
        if name not in shapes
    ]
    problems += [
        f"profile '{name}' names no input of {Path(onnx_path).name} (inputs: {sorted(graph_inputs)})"
        for name in shapes
        if name not in graph_inputs
    ]
    for name, dims in graph_inputs.items():
        if name not in shapes:
            continue
        low, opt, high = shapes[name]["min"], shapes[name]["opt"], shapes[name]["max"]
        if len(low) != len(dims):
            problems.append(f"input '{name}': profile rank {len(low)}, ONNX rank {len(dims)} ({dims})")
            continue
        for axis, size in enumerate(dims):
            if not low[axis] <= opt[axis] <= high[axis]:
                problems.append(
                    f"input '{name}' axis {axis}: min/opt/max {low[axis]}/{opt[axis]}/{high[axis]} is not ordered"
                )
            if size != -1 and not low[axis] == opt[axis] == high[axis] == size:
                problems.append(
                    f"input '{name}' axis {axis} is fixed at {size} in the ONNX graph, profile asks "
                    f"{low[axis]}/{opt[axis]}/{high[axis]}"
                )
    return problems


def engine_source(
    precision: str, fp32_onnx: str | Path, variants: Sequence[VariantReport], strongly_typed: bool = False
) -> tuple[str | None, str]:
    """(the ONNX file to build `precision` from, "") or (None, why it cannot be built)."""
    if precision in NOT_BUILDABLE:
        return None, NOT_BUILDABLE[precision]
    wanted = (
        "int8-static" if precision == "int8-static" else ("fp16" if precision == "fp16" and strongly_typed else "fp32")
    )
    if wanted == "fp32":
        return str(fp32_onnx), ""
    variant = next((v for v in variants if v.name == wanted and v.path), None)
    if variant is None:
        return (
            None,
            f"precision {precision} is built from the {wanted} variant, which this run did not build "
            "(precision.variants)",
        )
    return variant.path, ""


def trtexec_command(
    onnx_path: Path, engine_path: Path, shapes: dict, config: EngineConfig, timing_cache: Path
) -> list[str]:
    """The trtexec command line that builds the same engine as the child process."""

    def shape_flag(kind: str) -> str:
        return ",".join(f"{name}:{'x'.join(map(str, dims[kind]))}" for name, dims in shapes.items())

    command = [
        "trtexec",
        f"--onnx={onnx_path}",
        f"--saveEngine={engine_path}",
        f"--minShapes={shape_flag('min')}",
        f"--optShapes={shape_flag('opt')}",
        f"--maxShapes={shape_flag('max')}",
        f"--memPoolSize=workspace:{config.workspace_mb}M",
        f"--builderOptimizationLevel={config.optimization_level}",
        f"--timingCacheFile={timing_cache}",
        "--skipInference",
    ]
    if config.strongly_typed:
        command.append("--stronglyTyped")
    else:
        command += [TRTEXEC_FLAGS[flag] for flag in PRECISION_FLAGS[config.precision]]
        command += ["--noTF32"] if "TF32" in CLEARED_FLAGS[config.precision] else []
    if config.hardware_compatibility == "ampere_plus":
        command.append("--hardwareCompatibilityLevel=ampere+")
    if config.version_compatible:
        command.append("--versionCompatible")
    return command


def write_reproduce(folder: Path, command: list[str]) -> Path:
    script = atomic_write_text(
        folder / "reproduce.sh",
        "#!/usr/bin/env bash\n# the trtexec equivalent of this engine's build "
        "(TensorRT 10; run it on the GPU the engine is for)\nset -euo pipefail\n" + shlex.join(command) + "\n",
    )
    script.chmod(0o755)
    return script


def unavailable_reason() -> str | None:
    """Why an engine cannot be built or run here, or None."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "tensorrt not installed (its libraries are not on the package index these machines reach)"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU"
    return None


# --- the child process ----------------------------------------------------------------------------------------------
def run_child(args: list[str], timeout_s: int, log_path: Path, env: dict | None = None) -> tuple[int | None, str]:
    """`python -m export.tensorrt_build ARGS` with its output in `log_path`; (exit code or None on timeout, log tail).
    A negative exit code is the signal that killed it (a crash in native code)."""
    with open(log_path, "w", encoding="utf-8") as log:
        try:
            child = subprocess.run(
                [sys.executable, "-m", "export.tensorrt_build", *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=timeout_s,
                env=env,
            )
            code: int | None = child.returncode
        except subprocess.TimeoutExpired:  # subprocess.run has killed it
            code = None
    return code, log_path.read_text(encoding="utf-8", errors="replace")[-TAIL_CHARS:]


def child_failure(what: str, code: int | None, tail: str, timeout_s: int) -> str:
    if code is None:
        return (
            f"{what} ran past {timeout_s} s and was stopped; raise the timeout or lower optimization_level. "
            f"Log tail:\n{tail}"
        )
    cause = f"was killed by signal {-code} (a crash in native code)" if code < 0 else f"exited with {code}"
    return f"{what} {cause}; the flow goes on without it. Log tail:\n{tail}"


# --- build ----------------------------------------------------------------------------------------------------------
def build(
    recipe: Recipe, onnx_path: str | Path, out_dir: str | Path, config: EngineConfig, max_batch_size: int
) -> StageResult[EngineOutput]:
    """Build one engine into `out_dir/<precision>/` in a child process; SKIPPED without TensorRT or a GPU."""
    onnx_path, folder = Path(onnx_path).resolve(), Path(out_dir).resolve() / config.precision
    folder.mkdir(parents=True, exist_ok=True)
    shapes = profile_shapes(recipe, max_batch_size, config.opt_batch_size)
    cache = paths.resolve(config.timing_cache)
    write_reproduce(folder, trtexec_command(onnx_path, folder / ENGINE_FILE, shapes, config, cache))
    problems = onnx_profile_problems(shapes, onnx_path)
    if problems:
        return StageResult(
            stage="tensorrt",
            status=Status.FAILED,
            reason="the optimization profile does not fit the ONNX graph:\n  - " + "\n  - ".join(problems),
        )
    if not config.enabled:
        return StageResult.skipped("tensorrt", "tensorrt.enabled is false")
    reason = unavailable_reason()
    if reason:
        return StageResult(
            stage="tensorrt",
            status=Status.SKIPPED,
            reason=reason,
            output=EngineOutput(reproduce=str(folder / "reproduce.sh")),
        )
    cache.parent.mkdir(parents=True, exist_ok=True)
    spec = {
        "onnx": str(onnx_path),
        "folder": str(folder),
        "shapes": shapes,
        "max_batch_size": max_batch_size,
        "config": {**config.model_dump(mode="json"), "timing_cache": str(cache)},
    }
    return build_in_child(atomic_write_json(folder / "build-spec.json", spec), config.build_timeout_s)


def build_in_child(spec_path: Path, timeout_s: int, env: dict | None = None) -> StageResult[EngineOutput]:
    """Run the build SPEC describes in a child process; FAILED (never an exception) when the child fails or crashes."""
    folder = Path(json.loads(spec_path.read_text())["folder"])
    with timed() as clock:
        code, tail = run_child(["build", str(spec_path)], timeout_s, folder / "build.log", env)
    if code != 0:
        return StageResult(
            stage="tensorrt",
            status=Status.FAILED,
            seconds=clock["seconds"],
            reason=child_failure("the engine build", code, tail, timeout_s),
        )
    output = EngineOutput(
        folder=str(folder),
        engine=str(folder / ENGINE_FILE),
        manifest=str(folder / MANIFEST_FILE),
        reproduce=str(folder / "reproduce.sh"),
    )
    return StageResult(
        stage="tensorrt",
        status=Status.OK,
        seconds=clock["seconds"],
        artifacts=(Artifact.of(folder / ENGINE_FILE), Artifact.of(folder / MANIFEST_FILE)),
        output=output,
    )


# --- verification (the pure checks are in export/trt_checks.py) ------------------------------------------------
def verify(
    recipe: Recipe,
    folder: str | Path,
    fp32_onnx: str | Path,
    config: EngineConfig,
    gates: PrecisionConfig,
    fp32_throughput: float = 0.0,
) -> StageResult[EngineOutput]:
    """Run the engine (in a child process) on held-out inputs, compare with FP32 ONNX Runtime, score and gate it;
    writes `verification.json` beside the engine. SKIPPED without TensorRT or a GPU."""
    folder = Path(folder)
    reason = unavailable_reason()
    if reason:
        return StageResult.skipped("tensorrt", reason)
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    batches, speed, problems = _verification_inputs(recipe, manifest["profiles"], config, gates)
    if problems:
        reason = "verification inputs do not fit the engine:\n  - " + "\n  - ".join(problems)
        return StageResult(stage="tensorrt", status=Status.FAILED, reason=reason)
    with timed() as clock:
        code, tail, saved = _run_engine(folder, batches, speed, config.verify_timeout_s)
    if code != 0:
        reason = child_failure("running the engine", code, tail, config.verify_timeout_s)
        return StageResult(stage="tensorrt", status=Status.FAILED, seconds=clock["seconds"], reason=reason)
    session = open_session(fp32_onnx)
    names = [output.name for output in session.get_outputs()]
    reference = [dict(zip(names, session.run(None, batch.inputs))) for batch in batches]
    got = [{name: saved[f"{i}/{name}"] for name in names if f"{i}/{name}" in saved.files} for i in range(len(batches))]
    throughput = len(next(iter(speed.values()))) / float(saved["seconds/speed"])
    targets = [b.targets for b in batches]
    report = judge(
        recipe, manifest["precision"], reference, got, targets, config.tolerances, gates, throughput, fp32_throughput
    )
    report.path, report.bytes, report.sha256 = (
        str(folder / ENGINE_FILE),
        manifest["engine_bytes"],
        manifest["engine_sha256"],
    )
    compared = f"ONNX Runtime FP32 (CPU) on {sum(len(t) for t in targets)} held-out samples"
    path = atomic_write_json(
        folder / "verification.json", {**report.to_dict(), "compared_with": compared, "engine_manifest": manifest}
    )
    output = EngineOutput(folder=str(folder), verification=report)
    return StageResult(
        stage="tensorrt", status=Status.OK, seconds=clock["seconds"], artifacts=(Artifact.of(path),), output=output
    )


def _verification_inputs(recipe: Recipe, profiles: dict, config: EngineConfig, gates: PrecisionConfig):
    """(held-out batches, the speed-measurement batch, the inputs that fall outside the engine's profiles)."""
    batch_limit = min(dims["max"][0] for dims in profiles.values())
    batches = list(recipe.eval_batches(min(32, batch_limit), config.verify_samples))
    speed = recipe.example_inputs(min(gates.speed_batch_size, batch_limit))
    problems = [line for batch in batches for line in outside_profile(batch.inputs, profiles)]
    return batches, speed, problems + outside_profile(speed, profiles)


def _run_engine(folder: Path, batches: list, speed: dict[str, np.ndarray], timeout_s: int):
    """The engine run on every batch in a child process: (exit code, log tail, the saved outputs or None)."""
    work = folder / "verify"
    work.mkdir(exist_ok=True)
    feeds = {f"{i}/{name}": array for i, batch in enumerate(batches) for name, array in batch.inputs.items()}
    np.savez(work / "inputs.npz", **feeds, **{f"speed/{name}": array for name, array in speed.items()})
    command = ["run", str(folder / ENGINE_FILE), str(work / "inputs.npz"), str(work / "outputs.npz")]
    code, tail = run_child(command, timeout_s, work / "run.log")
    return code, tail, np.load(work / "outputs.npz") if code == 0 else None


def run_stage(
    recipe: Recipe,
    fp32_onnx: str | Path,
    variants: Sequence[VariantReport],
    out_dir: str | Path,
    config: EngineConfig,
    gates: PrecisionConfig,
    max_batch_size: int,
) -> StageResult[EngineOutput]:
    """The whole stage: pick the source ONNX for the precision, build, verify; SKIPPED where that cannot happen."""
    if not config.enabled:
        return StageResult.skipped("tensorrt", "tensorrt.enabled is false")
    source, why = engine_source(config.precision, fp32_onnx, variants, config.strongly_typed)
    if source is None:
        return StageResult.skipped("tensorrt", why)
    built = build(recipe, source, out_dir, config, max_batch_size)
    if built.status is not Status.OK:
        return built
    fp32_throughput = next((v.throughput_per_s for v in variants if v.name == "fp32"), 0.0)
    checked = verify(recipe, built.output.folder, fp32_onnx, config, gates, fp32_throughput)
    status = Status.FAILED if checked.status is Status.FAILED else Status.OK
    verification = checked.output.verification if checked.output else None
    output = built.output.model_copy(update={"source_onnx": str(source), "verification": verification})
    return StageResult(
        stage="tensorrt",
        status=status,
        seconds=built.seconds + checked.seconds,
        reason=checked.reason,
        artifacts=built.artifacts + checked.artifacts,
        output=output,
    )


# --- rebuilding an engine of a finished run (tes export-repository --rebuild) ----------------------------------------
def local_rebuild(
    run_dir: str | Path, recipe: Recipe, config: EngineConfig, gates: PrecisionConfig, max_batch_size: int
) -> Callable[[str, str], Path]:
    """A `rebuild(precision, compute_capability) -> engine folder` for the native repository export: builds and
    verifies an engine of the run in `run_dir` on this machine's GPU, which must have that compute capability.
    Raises `EngineMismatch` where that cannot happen, with what to do instead."""
    run = RunDir(run_dir, create=False)

    def rebuild(precision: str, capability: str) -> Path:
        cannot = f"cannot rebuild the {precision} engine for compute capability {capability} here"
        reason = unavailable_reason()
        if reason:
            raise EngineMismatch(f"{cannot}: {reason}")
        import torch

        here = "{}.{}".format(*torch.cuda.get_device_capability(0))
        if here != capability:
            raise EngineMismatch(
                f"{cannot}: this GPU is {here}; run export-repository --rebuild on a GPU of {capability}, "
                "or pass its engines with --engine-dir"
            )
        variants = [VariantReport(**entry) for entry in run.precision_variants()]
        result = run_stage(
            recipe,
            run.onnx,
            variants,
            run.engines / f"sm{capability.replace('.', '')}",
            config.model_copy(update={"precision": precision, "enabled": True}),
            gates,
            max(1, max_batch_size),
        )
        if result.status is not Status.OK:
            raise EngineMismatch(
                f"rebuilding the {precision} engine for {capability} {result.status.value}: {result.reason}"
            )
        return Path(result.output.folder)

    return rebuild
