"""`tes report | variants | ledger | export-repository | scaling`: what a run left, and what can be made from it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from core.errors import TesError
from flows.cli import output, rundata
from flows.cli.arguments import RunFolder, number_list, option


def report(run: RunFolder = None) -> None:
    """Print a run's report (default: the last run)."""
    output.markdown(rundata.report_markdown(run))


def variants(run: RunFolder = None) -> None:
    """Print a run's precision-variant table: size, metric, change vs FP32, latency, throughput, decision."""
    _print_table(rundata.variants_view(run))


def ledger(run: RunFolder = None) -> None:
    """Print a run's compute and energy ledger."""
    view = rundata.ledger_view(run)
    for table in (view.stages, view.serving, view.payback):
        if table is not None:
            _print_table(table)
    for note in view.notes:
        output.say(note)


def _print_table(view: rundata.TableView) -> None:
    output.table(view.columns, view.rows, view.title, view.numeric)


OutFolder = Annotated[str, typer.Argument(metavar="OUT", show_default=False, help="The repository folder to write.")]
RunOption = Annotated[Optional[str], option("The run folder.", "RUN", "the last run")]
ModelPrefix = Annotated[Optional[str], option("Model name prefix.", show_default="the run's")]
Cpu = Annotated[bool, option("KIND_CPU instance groups instead of KIND_GPU.", flag="--cpu")]
TargetTensorrt = Annotated[
    Optional[str],
    option(
        "The serving Triton's TensorRT version, e.g. 10.3.0.26 (needed when the run has engines).", "VERSION", False
    ),
]
TargetCc = Annotated[
    Optional[str], option("Its GPUs' compute capabilities, comma-separated, e.g. 8.0,9.0.", "LIST", False)
]
NoEngines = Annotated[bool, option("Export the ONNX models only.", flag="--no-engines")]
Rebuild = Annotated[
    bool, option("Rebuild engines missing for a target capability on this machine's GPU.", flag="--rebuild")
]
EngineDirs = Annotated[
    Optional[list[str]], option("An engine folder built elsewhere for this run (repeatable).", "FOLDER", False)
]


def export_repository(
    out: OutFolder,
    run: RunOption = None,
    model: ModelPrefix = None,
    cpu: Cpu = False,
    target_tensorrt: TargetTensorrt = None,
    target_cc: TargetCc = None,
    no_engines: NoEngines = False,
    rebuild: Rebuild = False,
    engine_dir: EngineDirs = None,
) -> None:
    """Write a native (onnxruntime_onnx / openvino / tensorrt_plan) repository from a run, with the plain model name
    as an ensemble alias, for a stock NGC Triton or a cluster."""
    from export.trt_engine import local_rebuild
    from serving.native_repository import export_repository as export

    target = _engine_target(target_tensorrt, target_cc)
    run_dir, params = rundata.run_parameters(run)
    recipe = params.build_recipe()
    serving = params.serving_config(recipe)
    rebuilder = (
        local_rebuild(run_dir, recipe, params.tensorrt, params.precision, serving.max_batch_size) if rebuild else None
    )
    exported = export(
        run_dir,
        Path(out),
        model or params.triton_model_name,
        serving,
        gpu=not cpu,
        target=target,
        include_engines=not no_engines,
        rebuild=rebuilder,
        engine_dirs=[Path(folder) for folder in engine_dir or []],
        policy=params.precision.policy,
    )
    rows = [[v.model_name, str(v.version), str(v.path)] for v in exported.versions]
    if exported.alias:  # the plain name, first: what clients call
        alias = exported.alias
        rows.insert(0, [f"{alias.model_name} -> {exported.alias_target}", str(alias.version), str(alias.path)])
    output.table(
        ["model", "version", "folder"],
        rows,
        title=f"native repository {Path(out).resolve()}",
        numeric=frozenset({1}),
    )
    for line in exported.left_out:
        output.say(f"left out: {line}")
    for line in exported.notes:
        output.say(f"note: {line}")
    server_args = "".join(f" {arg}" for arg in exported.server_args)
    output.say(
        "\nServe it with a Triton that has the onnxruntime, openvino and tensorrt backends, e.g. an NGC container:\n"
        f"  tritonserver --model-repository={Path(out).resolve()}{server_args}"
    )


def _engine_target(tensorrt_version: str | None, capabilities: str | None):
    from serving.native_repository import EngineTarget

    if not (tensorrt_version or capabilities):
        return None
    if not (tensorrt_version and capabilities):
        raise TesError(
            "--target-tensorrt and --target-cc go together: the serving Triton's TensorRT version and its GPUs' "
            "compute capabilities, e.g. --target-tensorrt 10.3.0.26 --target-cc 8.0,9.0"
        )
    return EngineTarget(tensorrt_version, tuple(cc.strip() for cc in capabilities.split(",") if cc.strip()))


Widths = Annotated[str, option("Comma-separated model widths (n_embd) to train.", "LIST")]
Steps = Annotated[int, typer.Option(min=1, help="Training steps per width.")]
Layers = Annotated[int, typer.Option(min=1, help="Transformer layers of every width.")]


def scaling(widths: Widths = "32,64,128", steps: Steps = 150, layers: Layers = 2) -> None:
    """Train a few stdlib-gpt widths briefly; plot validation bits per byte against training FLOPs."""
    from accounting.scaling import scaling_sweep

    result = scaling_sweep(list(number_list(widths, int, "--widths")), steps, layers, say=output.say)
    plot, data = rundata.scaling_outputs(result)
    output.say(f"plot: {plot}\ndata: {data}")
