"""What a recipe is: a model, its real data split deterministically, its metric and its tensor interface.

The training loop, the exporter and the repository writer only see this interface, so a user's own recipe
(`package.module:attribute`) plugs in without touching the package.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterator

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict


class RecipeOptions(BaseModel):
    """Base of a recipe's size knobs: frozen, and unknown fields are refused."""

    model_config = ConfigDict(frozen=True, extra="forbid")


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output, without the batch axis.

    `shape` uses -1 for a dynamic axis; `ranges` maps such an axis to its (min, opt, max) sizes.
    """

    name: str
    dtype: str  # numpy dtype name: "float32", "int64"
    shape: tuple[int, ...]
    ranges: dict[int, tuple[int, int, int]] = field(default_factory=dict)
    value_range: tuple[float, float] | None = None  # inclusive bounds the model accepts, if any

    def __post_init__(self) -> None:
        for axis, size in enumerate(self.shape):
            if size == -1 and axis not in self.ranges:
                raise ValueError(f"tensor {self.name!r}: dynamic axis {axis} needs a (min, opt, max) range")


@dataclass(frozen=True)
class Batch:
    inputs: dict[str, np.ndarray]  # name -> array with the batch axis first
    targets: np.ndarray


class Recipe(ABC):
    """A model with its data, metric and interface. Subclasses set `name` and `Options`."""

    name: ClassVar[str]
    Options: ClassVar[type[RecipeOptions]]
    primary_metric: ClassVar[str]
    max_batch_size: ClassVar[int] = 64
    trains: ClassVar[bool] = True  # False for model sources the user brings (hf:, torch:, onnx:): no training stage

    def __init__(self, options: RecipeOptions | None = None):
        self.options = options if options is not None else self.Options()

    # --- interface -------------------------------------------------------------------------------
    @property
    @abstractmethod
    def inputs(self) -> list[TensorSpec]: ...

    @property
    @abstractmethod
    def outputs(self) -> list[TensorSpec]: ...

    @abstractmethod
    def build_model(self) -> torch.nn.Module:
        """The module whose forward takes the inputs in order and returns the outputs (what gets exported)."""

    # --- data ------------------------------------------------------------------------------------
    @abstractmethod
    def train_batches(
        self, batch_size: int, generator: torch.Generator
    ) -> Iterator[tuple[tuple[torch.Tensor, ...], torch.Tensor]]:
        """Endless (inputs, targets) batches from the training split."""

    @abstractmethod
    def loss(self, model: torch.nn.Module, inputs: tuple[torch.Tensor, ...], targets: torch.Tensor) -> torch.Tensor:
        """Training loss for one batch."""

    @abstractmethod
    def eval_batches(self, batch_size: int, max_samples: int | None = None) -> Iterator[Batch]:
        """Fixed, deterministic batches from the validation split (never from training data)."""

    @abstractmethod
    def score(self, outputs: list[np.ndarray], targets: list[np.ndarray]) -> dict[str, float]:
        """The task metric over per-batch first outputs and targets."""

    def calibration_inputs(self, samples: int, batch_size: int = 8, seed: int = 0) -> list[dict[str, np.ndarray]]:
        """Input batches drawn from the training split only (quantization calibration must not see validation)."""
        batches = self.train_batches(batch_size, torch.Generator().manual_seed(seed))
        collected: list[dict[str, np.ndarray]] = []
        while sum(len(next(iter(b.values()))) for b in collected) < samples:
            inputs, _ = next(batches)
            collected.append({spec.name: tensor.numpy() for spec, tensor in zip(self.inputs, inputs)})
        return collected

    def example_inputs(self, batch_size: int = 2) -> dict[str, np.ndarray]:
        return next(iter(self.eval_batches(batch_size))).inputs

    def data_fingerprint(self) -> str | None:
        """A hash of the data the recipe trains and validates on; None (the default) turns re-run caching off."""
        return None

    def describe(self) -> dict[str, Any]:
        return {"recipe": self.name, "options": self.options.model_dump()}
