"""torch -> ONNX with a pinned opset and dynamic axes, the ONNX checker, then numerical verification.

Verification runs torch and ONNX Runtime on held-out inputs at several batch sizes (and, for dynamic
sequence axes, several lengths) and reports every mismatch at once.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from pydantic import BaseModel, ConfigDict, Field

from core.errors import ExportError, VerificationError
from core.files import atomic_write_with_companions, onnx_data_files
from core.results import ONNX_FILE, Artifact, StageOutput, StageResult, Status, timed
from core.runtimes import open_session
from recipes import Recipe
from recipes.evaluation import evaluate, reference_model, session_predictor

log = logging.getLogger(__name__)


class Tolerance(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    atol: float = Field(1e-4, ge=0)
    rtol: float = Field(1e-3, ge=0)


EXTERNAL_DATA_THRESHOLD_BYTES = 1536 * 2**20  # torch's exporter's own threshold: one protobuf file caps at 2 GB


class ExportConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    opset: int = Field(18, ge=17, le=23, description="ONNX opset the graph is exported with")
    tolerance: Tolerance = Tolerance()
    output_tolerances: dict[str, Tolerance] = Field(
        default_factory=dict, description="per output name; else `tolerance`"
    )
    verify_batch_sizes: tuple[int, ...] = Field((1, 7), min_length=1)
    verify_samples: int = Field(32, ge=1, description="held-out samples compared per shape")
    external_data_threshold_bytes: int = Field(
        EXTERNAL_DATA_THRESHOLD_BYTES,
        ge=0,
        description="initializers larger than this in all are saved as external data, one `<name>.onnx.data` file "
        "beside the graph (protobuf caps one file at 2 GB; torch's exporter externalizes past 1.5 GiB itself)",
    )


class Verification(StageOutput):
    cases: int  # input sets compared (batch sizes x held-out batches, plus shorter sequence lengths)
    max_abs_diff: dict[str, float]  # per output, the largest |onnx - torch|


class ExportOutput(StageOutput):
    onnx: str
    opset: int
    verification: Verification
    torch: str
    onnx_version: str
    onnxruntime: str
    validation_onnxruntime: dict[str, float] = {}  # the recipe's metric on the ONNX file, when the stage scored it
    adopted_from: str | None = None  # the user's ONNX file, when nothing was exported (`onnx:` sources)


def _axis_groups(recipe: Recipe) -> dict[tuple[int, tuple[int, int, int]], list[str]]:
    """Dynamic axes that are one dimension: the same axis with the same range in several inputs (the sequence of
    input_ids and attention_mask), keyed by (axis without batch, range) -> input names."""
    groups: dict[tuple[int, tuple[int, int, int]], list[str]] = {}
    for spec in recipe.inputs:
        for axis, axis_range in spec.ranges.items():
            groups.setdefault((axis, tuple(axis_range)), []).append(spec.name)
    return groups


def _dynamic_shapes(recipe: Recipe) -> tuple[dict[int, torch.export.Dim], ...]:
    """Per input, in forward order (positional, so forward's parameter names need not be the input names)."""
    batch = torch.export.Dim("batch", min=1, max=recipe.max_batch_size)
    dims = {
        key: torch.export.Dim(f"{names[0]}_axis{key[0] + 1}", min=key[1][0], max=key[1][2])
        for key, names in _axis_groups(recipe).items()
    }
    shapes = []
    for spec in recipe.inputs:
        axes = {0: batch}
        for axis, axis_range in spec.ranges.items():
            axes[axis + 1] = dims[(axis, tuple(axis_range))]
        shapes.append(axes)
    return tuple(shapes)


def export_stage(
    recipe: Recipe, weights: str | Path | None, out_dir: str | Path, config: ExportConfig, eval_samples: int
) -> StageResult[ExportOutput]:
    """The pipeline's export stage: the trained weights (or, for a model the user brought, the model as it came)
    exported and verified, then the recipe's metric on the ONNX file over `eval_samples` held-out samples."""
    model = reference_model(recipe, weights)
    if model is None:
        raise ExportError(f"recipe '{recipe.name}' has no torch model to export and no trained weights were given")
    result = export_onnx(recipe, model, out_dir, config)
    session = open_session(result.output.onnx)
    validation = evaluate(recipe, session_predictor(session, recipe), eval_samples)
    return result.model_copy(update={"output": result.output.model_copy(update={"validation_onnxruntime": validation})})


def export_onnx(
    recipe: Recipe, model: torch.nn.Module, out_dir: str | Path, config: ExportConfig
) -> StageResult[ExportOutput]:
    """Export, check and verify; returns the stage result with `model.onnx` and the verification report."""
    out_path = Path(out_dir) / ONNX_FILE
    model = model.eval().to("cpu")
    examples = recipe.example_inputs(batch_size=2)
    args = tuple(torch.from_numpy(examples[spec.name]) for spec in recipe.inputs)
    with timed() as clock:
        try:
            # the exporter prints progress lines, warns that torchvision ops are absent and about pytree internals
            logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
            with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                # inputs that share a Dim (input_ids, attention_mask) each trigger "axis name ... will not be used"
                warnings.filterwarnings("ignore", message="# The axis name", category=UserWarning)
                program = torch.onnx.export(
                    model,
                    args,
                    dynamo=True,
                    opset_version=config.opset,
                    optimize=True,
                    input_names=[spec.name for spec in recipe.inputs],
                    output_names=[spec.name for spec in recipe.outputs],
                    dynamic_shapes=_dynamic_shapes(recipe),
                )
        except Exception as error:
            raise ExportError(
                f"torch.onnx.export failed for recipe '{recipe.name}' at opset {config.opset}: {error}"
            ) from error
        _save(program, out_path, config.external_data_threshold_bytes)
        del program
        _release_rewriter_matches()
        try:
            onnx.checker.check_model(str(out_path), full_check=True)  # a path: the checker reads external data itself
        except onnx.checker.ValidationError as error:
            for path in (*onnx_data_files(out_path), out_path):
                path.unlink(missing_ok=True)
            raise ExportError(f"onnx.checker rejected the exported graph of '{recipe.name}': {error}") from error
        check_interface(recipe, onnx.load(str(out_path), load_external_data=False))
        report = verify_onnx(recipe, model, out_path, config)
    output = ExportOutput(
        onnx=str(out_path),
        opset=config.opset,
        verification=report,
        torch=torch.__version__,
        onnx_version=onnx.__version__,
        onnxruntime=ort.__version__,
    )
    artifacts = tuple(map(Artifact.of, (out_path, *onnx_data_files(out_path))))
    return StageResult(stage="export", status=Status.OK, seconds=clock["seconds"], artifacts=artifacts, output=output)


def _release_rewriter_matches() -> None:
    """onnxscript's pattern matchers (module-level rewrite rules the exporter's optimizer runs) keep the last node
    they looked at, and through it the exported graph, which wraps the torch model's parameters: without this, the
    weights outlive the export and the model (4 GB at 1 B parameters). Resetting them is what their next match does.
    """
    import gc

    try:
        from onnxscript.rewriter._matcher import SimplePatternMatcher
    except ImportError:  # another onnxscript: nothing known to release
        return
    for matcher in [obj for obj in gc.get_objects() if isinstance(obj, SimplePatternMatcher)]:
        matcher._init_match(0)  # the last node and match
        matcher._graph = None  # set again when it next matches


def _save(program: torch.onnx.ONNXProgram, out_path: Path, threshold_bytes: int) -> None:
    """The graph, with its initializers in `<name>.onnx.data` beside it when they pass `threshold_bytes`; the data
    file (named inside the graph) lands first, the graph last."""
    initializers = program.model.graph.initializers.values()
    external = sum(v.const_value.nbytes for v in initializers if v.const_value is not None) > threshold_bytes
    atomic_write_with_companions(out_path, lambda tmp: program.save(str(tmp), external_data=external))


def check_interface(recipe: Recipe, onnx_model: onnx.ModelProto) -> None:
    """The graph's input and output names must be the recipe's, in order."""
    initializers = {init.name for init in onnx_model.graph.initializer}
    got_inputs = [value.name for value in onnx_model.graph.input if value.name not in initializers]
    got_outputs = [value.name for value in onnx_model.graph.output]
    want_inputs, want_outputs = [s.name for s in recipe.inputs], [s.name for s in recipe.outputs]
    if got_inputs != want_inputs or got_outputs != want_outputs:
        raise ExportError(
            f"exported graph of '{recipe.name}' has inputs {got_inputs} and outputs {got_outputs}, "
            f"expected inputs {want_inputs} and outputs {want_outputs}"
        )


def _verification_inputs(recipe: Recipe, config: ExportConfig) -> list[dict[str, np.ndarray]]:
    """Held-out batches at each verification batch size, and for dynamic axes their min and middle sizes.

    A shorter case keeps the first positions of every input that shares the axis (a prefix of a right-padded batch
    still has a real first token in each row; a suffix can be all padding, where attention is fully masked and
    torch and ONNX Runtime may legitimately differ)."""
    cases = []
    for batch_size in config.verify_batch_sizes:
        for batch in recipe.eval_batches(batch_size, max_samples=max(batch_size, config.verify_samples)):
            cases.append(batch.inputs)
    extra = []
    for (axis, (low, opt, _)), names in _axis_groups(recipe).items():
        size = cases[0][names[0]].shape[axis + 1]
        for length in sorted({min(low, size), min(max(low, opt // 2), size)}):
            extra.append(
                {
                    name: array.take(range(length), axis=axis + 1) if name in names else array
                    for name, array in cases[0].items()
                }
            )
    return cases + extra


def verify_onnx(recipe: Recipe, model: torch.nn.Module, onnx_path: str | Path, config: ExportConfig) -> Verification:
    """Compare ONNX Runtime with torch on held-out inputs; raise `VerificationError` listing every mismatch."""
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = [spec.name for spec in recipe.outputs]
    worst = {name: 0.0 for name in names}
    mismatches, cases = [], _verification_inputs(recipe, config)
    for inputs in cases:
        with torch.no_grad():
            expected = model(*(torch.from_numpy(inputs[s.name]) for s in recipe.inputs))
        expected = [expected] if isinstance(expected, torch.Tensor) else list(expected)
        got = session.run(names, inputs)
        shapes = {name: list(array.shape) for name, array in inputs.items()}
        for name, reference, actual in zip(names, expected, got):
            reference = reference.float().numpy()
            tolerance = config.output_tolerances.get(name, config.tolerance)
            if reference.shape != actual.shape:
                mismatches.append(
                    f"output '{name}' for inputs {shapes}: shape {list(actual.shape)}, expected {list(reference.shape)}"
                )
                continue
            difference = np.abs(actual.astype(np.float64) - reference)
            worst[name] = max(worst[name], float(difference.max(initial=0.0)))
            bad = difference > tolerance.atol + tolerance.rtol * np.abs(reference)
            if bad.any():
                where = np.unravel_index(np.argmax(difference), difference.shape)
                mismatches.append(
                    f"output '{name}' for inputs {shapes}: {int(bad.sum())} of {bad.size} values outside "
                    f"atol={tolerance.atol} rtol={tolerance.rtol}; worst at {list(map(int, where))}: "
                    f"onnx {actual[where]:.6g} vs torch {reference[where]:.6g}"
                )
    if mismatches:
        raise VerificationError(mismatches)
    return Verification(cases=len(cases), max_abs_diff=worst)
