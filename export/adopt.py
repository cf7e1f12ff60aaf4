"""The export stage for an ONNX file the user brings (`onnx:<path>`): nothing is exported; the file (and any
external data files its graph names) is copied into the run, checked with ONNX's checker, and verified as far as
it can be without a torch model: it runs at every verification shape, its outputs have the batch axis first and
are finite. The precision stage then takes it as the FP32 model.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from core.errors import ExportError
from core.files import atomic_write, onnx_data_files
from core.results import ONNX_FILE, Artifact, StageResult, Status, timed
from core.runtimes import open_session
from export.onnx_export import ExportConfig, ExportOutput, Verification, _verification_inputs, check_interface
from recipes import Recipe
from recipes.evaluation import evaluate, session_predictor


def adopt_stage(
    recipe: Recipe, out_dir: str | Path, config: ExportConfig, eval_samples: int
) -> StageResult[ExportOutput]:
    """Copy `recipe.onnx_path` (and its external data) into `out_dir` as `model.onnx`, check and verify it."""
    source, out_dir = Path(recipe.onnx_path), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / ONNX_FILE
    with timed() as clock:
        extra = [str(path.relative_to(source.parent.resolve())) for path in onnx_data_files(source.resolve())]
        for name in extra:  # the data first: the graph must never name a file that is not there yet
            atomic_write(out_dir / name, lambda tmp, name=name: shutil.copyfile(source.parent / name, tmp))
        atomic_write(target, lambda tmp: shutil.copyfile(source, tmp))
        try:
            onnx.checker.check_model(str(target))  # a path: the checker reads external data itself
        except onnx.checker.ValidationError as error:
            raise ExportError(f"onnx.checker rejected {source}: {error}; re-export the model") from error
        graph = onnx.load(str(target), load_external_data=False)  # read once: the interface and the opset
        check_interface(recipe, graph)
        verification = verify_runs(recipe, target, config)
        validation = evaluate(recipe, session_predictor(open_session(target), recipe), eval_samples)
    output = ExportOutput(
        onnx=str(target),
        opset=max((o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")), default=0),
        verification=verification,
        torch=torch.__version__,
        onnx_version=onnx.__version__,
        onnxruntime=ort.__version__,
        validation_onnxruntime=validation,
        adopted_from=str(source),
    )
    artifacts = (Artifact.of(target), *(Artifact.of(out_dir / name) for name in extra))
    return StageResult(
        stage="export",
        status=Status.OK,
        seconds=clock["seconds"],
        artifacts=artifacts,
        output=output,
        reason=f"adopted {source} (nothing to export); verified that it runs and its outputs are finite",
    )


def verify_runs(recipe: Recipe, onnx_path: Path, config: ExportConfig) -> Verification:
    """With no torch model to compare with: every verification shape runs, answers with the batch axis first,
    and gives finite outputs. `ExportError` lists every failure at once."""
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = [spec.name for spec in recipe.outputs]
    problems, cases = [], _verification_inputs(recipe, config)
    for inputs in cases:
        shapes = {name: list(array.shape) for name, array in inputs.items()}
        try:
            outputs = session.run(names, inputs)
        except Exception as error:  # ONNX Runtime raises plain exceptions for shape and type errors
            problems.append(f"inputs {shapes}: ONNX Runtime failed: {error}")
            continue
        batch = len(next(iter(inputs.values())))
        for name, array in zip(names, outputs):
            if array.shape[:1] != (batch,):
                problems.append(
                    f"inputs {shapes}: output '{name}' has shape {list(array.shape)}, not batch {batch} first"
                )
            elif np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
                problems.append(
                    f"inputs {shapes}: output '{name}' has {int((~np.isfinite(array)).sum())} non-finite values"
                )
    if problems:
        raise ExportError(
            f"{onnx_path} does not run cleanly on held-out inputs:\n  - "
            + "\n  - ".join(problems)
            + "\nCheck the input description (recipe_options.inputs) against what the model takes."
        )
    return Verification(cases=len(cases), max_abs_diff={})
