"""A recipe's model run and scored: trained weights loaded, a torch predictor, the metric over validation data.

Every stage that scores a model (training's validation, export's ONNX Runtime check, the served check, the
benchmark's torch baseline) uses these, whatever runs the model: torch, ONNX Runtime, OpenVINO or Triton.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch

from recipes.base import Recipe

Predictor = Callable[[dict[str, np.ndarray]], np.ndarray]  # named inputs (batch first) -> first output


def load_trained(recipe: Recipe, weights_path: str | Path) -> torch.nn.Module:
    model = recipe.build_model()
    model.load_state_dict(torch.load(weights_path, map_location="cpu", weights_only=True))
    return model.eval()


def reference_model(recipe: Recipe, weights_path: str | Path | None) -> torch.nn.Module | None:
    """The FP32 torch model of a run: the trained weights, or for a model the user brought (`recipe.trains` False)
    the model as it came; None when there is no torch model (an `onnx:` source, or no weights to load)."""
    if weights_path:
        return load_trained(recipe, weights_path)
    if not getattr(recipe, "trains", True) and getattr(recipe, "has_torch_model", True):
        return recipe.build_model().eval()
    return None


def torch_predictor(model: torch.nn.Module, recipe: Recipe, device: torch.device | str = "cpu") -> Predictor:
    """A function from the recipe's named numpy inputs to the model's first output as numpy."""
    names = [spec.name for spec in recipe.inputs]

    @torch.no_grad()
    def predict(inputs: dict[str, np.ndarray]) -> np.ndarray:
        tensors = [torch.from_numpy(np.ascontiguousarray(inputs[name])).to(device) for name in names]
        return model(*tensors).float().cpu().numpy()

    return predict


def session_predictor(session, recipe: Recipe) -> Predictor:
    """The same for anything with ONNX Runtime's `run(output_names, feeds)` (see `core.runtimes`)."""
    names = [spec.name for spec in recipe.inputs]
    return lambda inputs: session.run(None, {name: inputs[name] for name in names})[0]


def evaluate(
    recipe: Recipe, predict: Predictor, max_samples: int | None = None, batch_size: int = 32
) -> dict[str, float]:
    """The recipe's metric over its validation split for any predictor (torch, ONNX Runtime, Triton)."""
    outputs, targets = [], []
    for batch in recipe.eval_batches(batch_size, max_samples):
        outputs.append(predict(batch.inputs))
        targets.append(batch.targets)
    return recipe.score(outputs, targets)
