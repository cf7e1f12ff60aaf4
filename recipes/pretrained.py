"""Model sources for a model the user already has: `hf:<dir or hub id>`, `torch:<module>:<factory>`, `onnx:<path>`.

Each source is a `Recipe` that does not train (`trains` is False): the pipeline takes its model as it is, exports it
(or, for `onnx:`, uses the file: `has_torch_model` is False) and gates the precision variants on agreement with the
FP32 reference (see `recipes.agreement`). Build one with `recipes.build_recipe("hf:./my-model", {"task": ...})`.

What the pipeline may ask of any recipe (`getattr` with these defaults works for the built-ins too):
`recipe.trains` (True), `recipe.has_torch_model` (True), `recipe.synthetic_data` (False), `recipe.tokenizer()`
(None), `recipe.notes` ([]: things the report should say, e.g. how a checkpoint was loaded).
"""

from __future__ import annotations

import hashlib
import logging
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from core.errors import RecipeError
from recipes import agreement
from recipes.agreement import SampleOptions, SamplePool
from recipes.base import Batch, Recipe, TensorSpec

log = logging.getLogger(__name__)

Predictor = Callable[[dict[str, np.ndarray]], np.ndarray]  # named inputs (batch first) -> first output
_REFERENCE_CHUNK = 32  # samples the FP32 reference runs at once; targets do not depend on the caller's batch size
_DTYPES = ("float32", "float16", "float64", "int64", "int32", "int8", "uint8", "bool")


class InputDescription(BaseModel):
    """One model input as the user describes it, without the batch axis (the pipeline batches on a first axis)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z_][\w.:-]*$")
    dtype: str = Field("float32", description="numpy dtype name: " + ", ".join(_DTYPES))
    shape: tuple[int, ...] = Field(description="sizes without the batch axis; -1 for a dynamic axis")
    ranges: dict[int, tuple[int, int, int]] = Field(
        default_factory=dict, description="dynamic axis -> (min, typical, max) size"
    )
    value_range: tuple[float, float] | None = Field(None, description="inclusive bounds of the values (token ids)")

    @model_validator(mode="after")
    def _consistent(self) -> "InputDescription":
        problems = []
        if self.dtype not in _DTYPES:
            problems.append(f"dtype {self.dtype!r} is not one of {list(_DTYPES)}")
        for axis, size in enumerate(self.shape):
            if size == -1 and axis not in self.ranges:
                problems.append(f"axis {axis} is dynamic (-1) and needs `ranges: {{{axis}: [min, typical, max]}}`")
            elif size != -1 and size < 1:
                problems.append(f"axis {axis} has size {size}; use a positive size, or -1 for a dynamic axis")
        for axis, (low, typical, high) in self.ranges.items():
            if axis >= len(self.shape) or self.shape[axis] != -1:
                problems.append(f"ranges names axis {axis}, which is not a dynamic (-1) axis of shape {self.shape}")
            elif not 1 <= low <= typical <= high:
                problems.append(
                    f"range of axis {axis} must satisfy 1 <= min <= typical <= max, got {low, typical, high}"
                )
        if self.value_range is not None and self.value_range[0] > self.value_range[1]:
            problems.append(f"value_range {self.value_range} has its low bound above its high bound")
        if problems:
            raise ValueError(f"input '{self.name}': " + "; ".join(problems))
        return self

    def spec(self) -> TensorSpec:
        return TensorSpec(self.name, self.dtype, self.shape, dict(self.ranges), self.value_range)


class PretrainedRecipe(Recipe):
    """A model source: no training data, samples from the user or synthesized, targets from the FP32 reference.

    Subclasses set `kind`, `Options`, `default_agreement`, and implement `inputs`, `outputs`, `_reference` and,
    where they have one, `build_model`. `recipes.recipe_class` binds a subclass to its `source`."""

    trains = False
    has_torch_model: ClassVar[bool] = True
    kind: ClassVar[str]
    source: ClassVar[str]  # the part of the reference after `kind:`
    Options: ClassVar[type[SampleOptions]] = SampleOptions
    default_agreement: ClassVar[str] = "top1"
    source_example: ClassVar[str] = ""  # shown when the source is missing

    def __init__(self, options: SampleOptions | None = None):
        if not hasattr(type(self), "source"):
            kind = getattr(type(self), "kind", "hf|torch|onnx")
            raise RecipeError(f"{type(self).__name__} needs a source: build it with build_recipe('{kind}:...')")
        super().__init__(options)
        self.max_batch_size = self.options.max_batch_size
        self.notes: list[str] = []
        samples = self.options.samples
        if samples is not None:
            if not Path(samples).is_file():
                raise RecipeError(f"{self.name}: samples file {samples} does not exist")
            if Path(samples).suffix not in (".npz", ".txt"):
                raise RecipeError(
                    f"{self.name}: samples file {samples} must be an .npz of named arrays or a .txt of texts"
                )
        self._targets: list[np.ndarray] = []

    @classmethod
    def bind(cls, source: str) -> type["PretrainedRecipe"]:
        """This source kind with its `source` filled in: what `recipe_class('kind:source')` returns."""
        if not source:
            raise RecipeError(f"'{cls.kind}:' needs a source after the colon, e.g. {cls.source_example}")
        attributes = {"source": source, "name": f"{cls.kind}:{source}", "__module__": cls.__module__}
        return type(cls.__name__, (cls,), attributes)

    # --- what the pipeline asks ------------------------------------------------------------------------------------
    @property
    def synthetic_data(self) -> bool:
        """True when the scored and calibration samples were made up from the interface, not given by the user."""
        return self.options.samples is None

    def tokenizer(self) -> Any | None:
        """The model's tokenizer (transformers), when the source has one."""
        return None

    @property
    def primary_metric(self) -> str:  # type: ignore[override]
        agreement_kind = self.options.agreement or self.default_agreement
        return agreement.metric_for(agreement_kind, self._has_labels)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "trains": self.trains, "synthetic_data": self.synthetic_data}

    # --- not trainable -----------------------------------------------------------------------------------------------
    def train_batches(self, batch_size: int, generator: torch.Generator) -> Iterator:
        raise RecipeError(f"'{self.name}' is a model source and does not train (recipe.trains is False); skip training")

    def loss(self, model: torch.nn.Module, inputs: tuple[torch.Tensor, ...], targets: torch.Tensor) -> torch.Tensor:
        raise RecipeError(f"'{self.name}' is a model source and does not train (recipe.trains is False); skip training")

    # --- data ----------------------------------------------------------------------------------------------------
    def _reference(self) -> Predictor:
        """The FP32 reference: named inputs -> first output."""
        raise NotImplementedError

    def _text_samples(self, path: Path) -> dict[str, np.ndarray]:
        raise RecipeError(
            f"{self.name}: a text file of samples needs a model with a tokenizer; give an .npz of named arrays"
        )

    @cached_property
    def _has_labels(self) -> bool:
        path = self.options.samples
        if path is None or Path(path).suffix != ".npz":
            return False
        with np.load(path, allow_pickle=False) as archive:
            return agreement.LABELS in archive.files

    @cached_property
    def _pool(self) -> SamplePool:
        options = self.options
        if options.samples is None:
            count, seed = options.eval_samples, options.seed
            scored = agreement.synthesize(self.inputs, count, seed)
            calibration = agreement.synthesize(self.inputs, max(1, count // 2), seed + 1)
            return SamplePool(scored, calibration, None, f"{count} synthesized samples (seed {seed})")
        path = Path(options.samples)
        if path.suffix == ".txt":
            arrays, labels = self._text_samples(path), None
        else:
            arrays, labels = agreement.read_npz(path, self.inputs)
        return agreement.split_pool(arrays, labels, options.calibration_fraction, f"samples file {path}")

    def _targets_until(self, stop: int) -> np.ndarray:
        """Targets of scored samples 0..stop, from the FP32 reference (run once, in fixed chunks) or the labels."""
        pool = self._pool
        if pool.labels is not None:
            return pool.labels[:stop]
        done = sum(len(chunk) for chunk in self._targets)
        if done < stop:
            predict = self._reference()
            for start in range(done, stop, _REFERENCE_CHUNK):
                inputs = agreement.take(pool.scored, start, min(start + _REFERENCE_CHUNK, pool.size))
                outputs = np.asarray(predict(inputs))
                self._targets.append(agreement.reference_targets(self.primary_metric, outputs, inputs))
        return np.concatenate(self._targets)[:stop]

    def eval_batches(self, batch_size: int, max_samples: int | None = None) -> Iterator[Batch]:
        """The scored samples in order; targets are the FP32 reference's answers (or the user's labels)."""
        pool = self._pool
        count = pool.size if max_samples is None else min(max_samples, pool.size)
        targets = self._targets_until(count)
        for start in range(0, count, batch_size):
            stop = min(start + batch_size, count)
            yield Batch({name: array[start:stop] for name, array in pool.scored.items()}, targets[start:stop])

    def score(self, outputs: list[np.ndarray], targets: list[np.ndarray]) -> dict[str, float]:
        return agreement.score_outputs(self.primary_metric, outputs, targets)

    def calibration_inputs(self, samples: int, batch_size: int = 8, seed: int = 0) -> list[dict[str, np.ndarray]]:
        """Batches from the calibration samples only (disjoint from what is scored), at most `samples` of them."""
        calibration = self._pool.calibration
        count = min(samples, len(next(iter(calibration.values()))))
        return [
            agreement.take(calibration, start, min(start + batch_size, count)) for start in range(0, count, batch_size)
        ]

    def example_inputs(self, batch_size: int = 2) -> dict[str, np.ndarray]:
        """The first `batch_size` scored samples (repeated if there are fewer); no reference run needed."""
        return agreement.take(self._pool.scored, 0, batch_size)


# --- helpers the sources share ----------------------------------------------------------------------------------------
def files_digest(paths: list[Path], *extra: str) -> str:
    """sha256 over the names and contents of `paths` (and `extra` strings): a source's data fingerprint."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode())
        with path.open("rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                digest.update(block)
    for text in extra:
        digest.update(text.encode())
    return digest.hexdigest()


def output_specs(
    names: list[str], runs: list[tuple[list[np.ndarray], dict[str, np.ndarray]]], inputs: list[TensorSpec]
) -> list[TensorSpec]:
    """Output specs from dry runs at different dynamic sizes: an axis whose size changed is dynamic, with the range
    of the input axis it followed (or 1..the largest size seen)."""
    specs = []
    for index, (name, output) in enumerate(zip(names, runs[0][0])):
        shape, ranges = list(output.shape[1:]), {}
        for axis, size in enumerate(output.shape[1:]):
            sizes = [run[0][index].shape[axis + 1] for run in runs]
            if len(set(sizes)) == 1:
                continue
            shape[axis] = -1
            followed = [
                spec.ranges[input_axis]
                for spec in inputs
                for input_axis in spec.ranges
                if [run[1][spec.name].shape[input_axis + 1] for run in runs] == sizes
            ]
            ranges[axis] = followed[0] if followed else (1, size, max(sizes))
        dtype = str(output.dtype) if output.dtype != np.float64 else "float32"
        specs.append(TensorSpec(name, dtype, tuple(shape), ranges))
    return specs


def dry_run_inputs(specs: list[TensorSpec], other_sizes: bool) -> dict[str, np.ndarray]:
    """One synthesized sample at the typical sizes, or with every dynamic axis at another size within its range
    (so an output axis that follows an input axis shows it by changing)."""
    if not other_sizes:
        return agreement.synthesize(specs, 1, seed=0)
    moved = []
    for spec in specs:
        ranges = {
            axis: (low, _other_size(low, typical, high), high) for axis, (low, typical, high) in spec.ranges.items()
        }
        moved.append(TensorSpec(spec.name, spec.dtype, spec.shape, ranges, spec.value_range))
    return agreement.synthesize(moved, 1, seed=0)


def _other_size(low: int, typical: int, high: int) -> int:
    if typical > low:
        return max(low, typical // 2)
    return min(high, typical + 1)
