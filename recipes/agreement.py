"""Data and metrics for a model that comes without a labelled validation set.

The precision gates need inputs to score and a metric to compare with FP32. A model the user brings has no split
of its own, so the samples are the user's (an `.npz` of named arrays, or text for tokenizer models) or synthesized
from the tensor interface; the targets are what the FP32 reference model answers, and the metric is agreement
with it: top-1 agreement for logits, cosine similarity for embeddings. An `.npz` with a `labels` array scores the
real task metric (accuracy) instead.

Scored and calibration samples never overlap: an `.npz` or text file is split by position (the last
`calibration_fraction` calibrates), synthesized samples come from different seeds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from core.errors import RecipeError
from recipes.base import RecipeOptions, TensorSpec

TOP1 = "top1_agreement"
COSINE = "cosine_similarity"
ACCURACY = "accuracy"
LABELS = "labels"  # the array name in an .npz that switches scoring to the task metric
IGNORE = -1  # a target at a padded position: not scored


class SampleOptions(RecipeOptions):
    """What every model source shares: where its scoring data comes from and how it is compared with FP32."""

    samples: str | None = Field(
        None,
        description="an .npz of arrays named like the inputs (sample axis first; an optional `labels` array "
        "switches to accuracy), or a .txt with one text per line for models with a tokenizer; None: synthesized",
    )
    eval_samples: int = Field(256, ge=1, le=100_000, description="synthesized samples scored (and calibrated on)")
    calibration_fraction: float = Field(
        0.25, gt=0.0, lt=1.0, description="share of an .npz or text file held back for calibration, never scored"
    )
    seed: int = Field(0, ge=0, description="seed of synthesized samples (calibration uses seed + 1)")
    agreement: Literal["top1", "cosine"] | None = Field(
        None, description="how outputs are compared with FP32's; None: the source's default (cosine for embeddings)"
    )
    max_batch_size: int = Field(32, ge=1, le=4096, description="largest batch the exported model takes")


@dataclass(frozen=True)
class SamplePool:
    scored: dict[str, np.ndarray]  # input name -> (N, ...) arrays the metric runs on
    calibration: dict[str, np.ndarray]  # disjoint from `scored`
    labels: np.ndarray | None  # task labels of `scored`, when the user gave them
    origin: str  # where the samples came from, for the report

    @property
    def size(self) -> int:
        return len(next(iter(self.scored.values())))


def metric_for(agreement: str, has_labels: bool) -> str:
    if has_labels:
        return ACCURACY
    return COSINE if agreement == "cosine" else TOP1


# --- samples -------------------------------------------------------------------------------------------------------
def synthesize(specs: list[TensorSpec], count: int, seed: int) -> dict[str, np.ndarray]:
    """`count` samples for the interface: dynamic axes at their typical (opt) size, values in range.

    Names carry meaning for text models: `attention_mask` marks a real prefix of random length (at least a quarter
    of the sequence) and the rest as right padding, where the other inputs hold their lowest value (the pad id);
    `token_type_ids` are all 0 (one segment)."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for spec in specs:
        shape = (count, *(spec.ranges[axis][1] if size == -1 else size for axis, size in enumerate(spec.shape)))
        arrays[spec.name] = _random_values(spec, shape, rng)
    mask = arrays.get("attention_mask")
    if mask is not None and mask.ndim == 2:
        length = mask.shape[1]
        real = rng.integers(max(1, length // 4), length + 1, size=count)
        padded = np.arange(length)[None, :] >= real[:, None]  # (N, T)
        arrays["attention_mask"] = (~padded).astype(mask.dtype)
        for spec in specs:
            array = arrays[spec.name]
            if spec.name != "attention_mask" and array.shape[:2] == padded.shape and array.dtype.kind in "iu":
                array[padded] = 0 if spec.value_range is None else int(spec.value_range[0])
    if "token_type_ids" in arrays:
        arrays["token_type_ids"][...] = 0
    return arrays


def _random_values(spec: TensorSpec, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    dtype = np.dtype(spec.dtype)
    if dtype.kind == "b":
        return rng.integers(0, 2, size=shape).astype(bool)
    if dtype.kind in "iu":
        if spec.value_range is None and spec.name != "attention_mask":
            raise RecipeError(
                f"cannot synthesize samples for {spec.dtype} input '{spec.name}' without knowing its values: give "
                "its `value_range` (e.g. token ids: [0, vocab_size - 1]) in `inputs`, or real samples (`samples`: "
                "an .npz of named arrays)"
            )
        low, high = spec.value_range or (0, 1)
        return rng.integers(int(low), int(high) + 1, size=shape).astype(dtype)
    low, high = spec.value_range or (-1.0, 1.0)
    if len(shape) == 4:  # (N, C, H, W): smooth images, not per-pixel noise
        coarse = rng.uniform(0.0, 1.0, size=(*shape[:2], 4, 4))
        rows = np.linspace(0, 3, shape[2]).round().astype(int)
        cols = np.linspace(0, 3, shape[3]).round().astype(int)
        unit = 0.8 * coarse[:, :, rows][:, :, :, cols] + 0.2 * rng.uniform(0.0, 1.0, size=shape)
    else:
        unit = rng.uniform(0.0, 1.0, size=shape)
    return (low + (high - low) * unit).astype(dtype)


def read_npz(path: str | Path, specs: list[TensorSpec]) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """Arrays named like the inputs (and optional `labels`), checked against the interface; every problem at once."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            stored = {name: archive[name] for name in archive.files}
    except (OSError, ValueError) as error:
        raise RecipeError(f"samples file {path} cannot be read as an .npz of arrays: {error}") from error
    problems = []
    missing = [spec.name for spec in specs if spec.name not in stored]
    if missing:
        problems.append(f"missing array(s) {missing}; the file has {sorted(stored)}")
    counts = {name: len(array) for name, array in stored.items() if array.ndim > 0}
    if len(set(counts.values())) > 1:
        problems.append(f"arrays differ in sample count (first axis): {counts}")
    arrays = {}
    for spec in specs:
        if spec.name in stored:
            array, problem = _checked(spec, stored[spec.name])
            arrays[spec.name] = array
            problems += [problem] if problem else []
    labels = stored.get(LABELS)
    if labels is not None and labels.dtype.kind not in "iu":
        problems.append(f"'{LABELS}' must hold integer class ids, got dtype {labels.dtype}")
    if problems:
        lines = "\n".join(f"  - {problem}" for problem in problems)
        raise RecipeError(f"samples file {path} does not fit the model's inputs:\n{lines}")
    return arrays, None if labels is None else labels.astype(np.int64)


def _checked(spec: TensorSpec, array: np.ndarray) -> tuple[np.ndarray, str | None]:
    """The array cast to the input's dtype, or the reason it does not fit."""
    expected = [
        "N",
        *(f"{spec.ranges[axis][0]}..{spec.ranges[axis][2]}" if s == -1 else s for axis, s in enumerate(spec.shape)),
    ]
    if array.ndim != len(spec.shape) + 1:
        return array, f"'{spec.name}': shape {list(array.shape)}, expected {expected}"
    for axis, size in enumerate(spec.shape):
        got = array.shape[axis + 1]
        fits = spec.ranges[axis][0] <= got <= spec.ranges[axis][2] if size == -1 else got == size
        if not fits:
            return array, f"'{spec.name}': shape {list(array.shape)}, expected {expected}"
    if not np.can_cast(array.dtype, spec.dtype, casting="same_kind"):
        return array, f"'{spec.name}': dtype {array.dtype} cannot become {spec.dtype}"
    array = array.astype(spec.dtype, copy=False)
    if spec.value_range is not None and array.size:
        low, high = array.min(), array.max()
        if low < spec.value_range[0] or high > spec.value_range[1]:
            return array, f"'{spec.name}': values {low}..{high} outside {spec.value_range[0]}..{spec.value_range[1]}"
    return array, None


def split_pool(
    arrays: dict[str, np.ndarray], labels: np.ndarray | None, calibration_fraction: float, origin: str
) -> SamplePool:
    """The last `calibration_fraction` of the samples calibrates, the rest is scored."""
    count = len(next(iter(arrays.values())))
    if count < 2:
        raise RecipeError(f"{origin} has {count} sample(s); at least 2 are needed (one scored, one to calibrate)")
    held = min(count - 1, max(1, round(count * calibration_fraction)))
    scored = {name: array[: count - held] for name, array in arrays.items()}
    calibration = {name: array[count - held :] for name, array in arrays.items()}
    if labels is not None and len(labels) != count:
        raise RecipeError(f"{origin}: '{LABELS}' has {len(labels)} entries for {count} samples")
    return SamplePool(scored, calibration, None if labels is None else labels[: count - held], origin)


def take(arrays: dict[str, np.ndarray], start: int, stop: int) -> dict[str, np.ndarray]:
    """Samples start..stop, wrapping around when the pool is shorter (for example batches of any size)."""
    count = len(next(iter(arrays.values())))
    index = np.arange(start, stop) % count
    return {name: array[index] for name, array in arrays.items()}


# --- targets and metrics -------------------------------------------------------------------------------------------
def _real_positions(outputs: np.ndarray, inputs: dict[str, np.ndarray]) -> np.ndarray | None:
    """(B, T): True where a per-token output is of a real (not padded) token; None for outputs not per token."""
    mask = inputs.get("attention_mask")
    if mask is None or outputs.ndim < 3 or outputs.shape[:2] != mask.shape:
        return None
    return mask != 0


def reference_targets(metric: str, outputs: np.ndarray, inputs: dict[str, np.ndarray]) -> np.ndarray:
    """What the FP32 reference answered, as targets: its top-1 class ids, or (cosine) its outputs themselves.
    Padded positions are marked so they are not scored."""
    real = _real_positions(outputs, inputs)
    if metric == COSINE:
        targets = outputs.astype(np.float32, copy=True)
        if real is not None:
            targets[~real] = 0.0  # a zero vector is not scored
        return targets
    targets = outputs.argmax(-1).astype(np.int64)
    if real is not None:
        targets[~real] = IGNORE
    return targets


def score_outputs(metric: str, outputs: list[np.ndarray], targets: list[np.ndarray]) -> dict[str, float]:
    """Agreement with FP32 (top-1 or cosine) or accuracy against labels, over per-batch first outputs."""
    samples = float(sum(len(target) for target in targets))
    if metric == COSINE:
        similarities = np.concatenate([_cosines(output, target) for output, target in zip(outputs, targets)])
        return {COSINE: float(similarities.mean()), "cosine_min": float(similarities.min()), "samples": samples}
    predicted = np.concatenate([output.argmax(-1).ravel() for output in outputs])
    wanted = np.concatenate([target.ravel() for target in targets])
    if predicted.shape != wanted.shape:
        raise RecipeError(
            f"{metric}: outputs give {predicted.size} predictions but there are {wanted.size} targets; "
            "labels must have one class id per sample (or per token for per-token outputs)"
        )
    scored = wanted >= 0  # negative targets (padding, or -100 in user labels) are not scored
    return {metric: float((predicted[scored] == wanted[scored]).mean()), "samples": samples}


def _cosines(output: np.ndarray, target: np.ndarray) -> np.ndarray:
    width = target.shape[-1]
    output, target = output.reshape(-1, width).astype(np.float64), target.reshape(-1, width).astype(np.float64)
    target_norm = np.linalg.norm(target, axis=1)
    scored = target_norm > 0
    dot = (output * target).sum(axis=1)[scored]
    return dot / np.maximum(np.linalg.norm(output, axis=1)[scored] * target_norm[scored], 1e-30)
