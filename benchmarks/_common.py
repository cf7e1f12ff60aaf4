"""Shared set-up for the benchmark scripts: a quickly trained, exported model served by a private Triton."""

from __future__ import annotations

import contextlib
import sys
import tempfile
from pathlib import Path
from typing import Iterator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from export.onnx_export import ExportConfig, export_onnx  # noqa: E402
from recipes import build_recipe  # noqa: E402
from recipes.evaluation import load_trained  # noqa: E402
from serving import client, repository, triton  # noqa: E402
from training.loop import TrainingConfig, train  # noqa: E402

WORK = Path(tempfile.mkdtemp(prefix="tes-bench-"))


def trained_onnx(recipe_name: str, options: dict | None = None, steps: int = 100):
    """(recipe, onnx path) after `steps` of training (0: random weights, enough for speed figures)."""
    recipe = build_recipe(recipe_name, options or {})
    folder = WORK / recipe_name
    model = recipe.build_model()
    if steps:
        weights = train(
            recipe, TrainingConfig(steps=steps, eval_every=10**6, resume=False), folder / "train", progress=False
        ).output.weights
        model = load_trained(recipe, weights)
    return recipe, export_onnx(recipe, model, folder, ExportConfig()).output.onnx


@contextlib.contextmanager
def serving(models: dict[str, tuple[str, repository.ServingConfig]]) -> Iterator[triton.TritonProcess]:
    """A private Triton serving `name -> (onnx path, config)`; stopped on exit."""
    server = triton.start(WORK / "repository", WORK / "triton")
    try:
        for name, (onnx_path, config) in models.items():
            repository.write_version(server.repository, name, onnx_path, config)
            client.load_model(server.http_url, name)
        yield server
    finally:
        triton.stop(server.pid)
