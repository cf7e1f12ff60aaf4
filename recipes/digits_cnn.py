"""`digits-cnn`: a small CNN on scikit-learn's bundled 8x8 handwritten digits (1,797 real images).

Fixed shapes and seconds-long training: the fast path for tests.
"""

from __future__ import annotations

import hashlib
from functools import cached_property
from typing import Iterator

import numpy as np
import torch
from pydantic import Field

from recipes.base import Batch, Recipe, RecipeOptions, TensorSpec

_SPLIT_SEED = 20240607  # fixed: the split must not move when the training seed does


class DigitsCnnOptions(RecipeOptions):
    channels: int = Field(
        16, ge=1, le=512, description="channels of the first conv layer (the second has twice as many)"
    )
    hidden: int = Field(64, ge=1, le=4096, description="width of the hidden dense layer")
    validation_fraction: float = Field(0.2, gt=0.0, lt=0.9, description="share of images held out for validation")


class DigitsCnn(torch.nn.Module):
    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(1, channels, 3, padding=1),
            torch.nn.ReLU(),  # (B, C, 8, 8)
            torch.nn.Conv2d(channels, 2 * channels, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.MaxPool2d(2),  # (B, 2C, 4, 4)
        )
        self.head = torch.nn.Sequential(
            torch.nn.Flatten(), torch.nn.Linear(2 * channels * 16, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 10)
        )

    def forward(self, image: torch.Tensor) -> torch.Tensor:  # (B, 1, 8, 8) -> (B, 10)
        return self.head(self.features(image))


class DigitsCnnRecipe(Recipe):
    name = "digits-cnn"
    Options = DigitsCnnOptions
    primary_metric = "accuracy"
    max_batch_size = 64

    @property
    def inputs(self) -> list[TensorSpec]:
        return [TensorSpec("image", "float32", (1, 8, 8), value_range=(0.0, 1.0))]

    @property
    def outputs(self) -> list[TensorSpec]:
        return [TensorSpec("logits", "float32", (10,))]

    def build_model(self) -> torch.nn.Module:
        return DigitsCnn(self.options.channels, self.options.hidden)

    @cached_property
    def _splits(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = (digits.images / 16.0).astype(np.float32)[:, None]  # (N, 1, 8, 8) in [0, 1]
        labels = digits.target.astype(np.int64)
        order = np.random.default_rng(_SPLIT_SEED).permutation(len(labels))
        held_out = int(round(len(labels) * self.options.validation_fraction))
        val, train = order[:held_out], order[held_out:]
        return {"train": (images[train], labels[train]), "validation": (images[val], labels[val])}

    def data_fingerprint(self) -> str:
        digest = hashlib.sha256()
        arrays = [array for pair in self._splits.values() for array in pair]
        for array in arrays:
            digest.update(np.ascontiguousarray(array).tobytes())
        return digest.hexdigest()

    def train_batches(
        self, batch_size: int, generator: torch.Generator
    ) -> Iterator[tuple[tuple[torch.Tensor, ...], torch.Tensor]]:
        images, labels = (torch.from_numpy(array) for array in self._splits["train"])
        while True:
            for index in torch.randperm(len(labels), generator=generator).split(batch_size):
                yield (images[index],), labels[index]

    def loss(self, model: torch.nn.Module, inputs: tuple[torch.Tensor, ...], targets: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(model(*inputs).float(), targets)

    def eval_batches(self, batch_size: int, max_samples: int | None = None) -> Iterator[Batch]:
        images, labels = self._splits["validation"]
        count = len(labels) if max_samples is None else min(max_samples, len(labels))
        for start in range(0, count, batch_size):
            stop = min(start + batch_size, count)
            yield Batch({"image": images[start:stop]}, labels[start:stop])

    def score(self, outputs: list[np.ndarray], targets: list[np.ndarray]) -> dict[str, float]:
        logits, labels = np.concatenate(outputs), np.concatenate(targets)
        return {"accuracy": float((logits.argmax(-1) == labels).mean()), "samples": float(len(labels))}
