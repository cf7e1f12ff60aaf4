"""Shared fixtures: tiny recipe configs, a private project home, and a real Triton on free loopback ports."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

TINY_GPT = {
    "n_layer": 1,
    "n_embd": 32,
    "n_head": 2,
    "block_size": 32,
    "train_megabytes": 0.5,
    "validation_megabytes": 0.2,
}
TINY_DIGITS = {"channels": 8, "hidden": 32}
# pipeline parameters of a short digits run that trains, exports and builds two variants, without Triton
TINY_DIGITS_RUN = {
    "recipe": "digits-cnn",
    "digits_cnn": TINY_DIGITS,
    "training": {"steps": 30, "learning_rate": 1e-2, "eval_every": 1000, "eval_samples": 64},
    "precision": {"variants": ["fp32", "int8-static"], "calibration_samples": 32, "score_samples": 64},
    "benchmark": {"enabled": False},
    "serving": {"load": False},
}


@pytest.fixture(scope="session", autouse=True)
def _private_project_home(tmp_path_factory: pytest.TempPathFactory):
    """No test writes runs, caches or stack state into the checkout: the whole session gets its own home."""
    previous = os.environ.get("TES_HOME")
    os.environ["TES_HOME"] = str(tmp_path_factory.mktemp("tes-home"))
    yield
    if previous is None:
        os.environ.pop("TES_HOME", None)
    else:
        os.environ["TES_HOME"] = previous


@pytest.fixture
def tes_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private project home: runs/, model_repository/ and .tes/ all go under tmp_path."""
    monkeypatch.setenv("TES_HOME", str(tmp_path))
    return tmp_path


@pytest.fixture(scope="module")
def triton_server(tmp_path_factory: pytest.TempPathFactory):
    """A real bundled tritonserver on free ports, stopped (with its children) after the module."""
    from serving import triton

    root = tmp_path_factory.mktemp("triton")
    server = triton.start(root / "model_repository", root / "work")
    try:
        yield server
    finally:
        triton.stop(server.pid)


def serve_tiny_digits(server, folder: Path, name: str = "digits"):
    """An untrained tiny digits-cnn exported to `folder` and loaded into `server` as `name`; (onnx path, recipe)."""
    from export.onnx_export import ExportConfig, export_onnx
    from recipes import build_recipe
    from serving import client, repository
    from serving.repository import ServingConfig

    recipe = build_recipe("digits-cnn", TINY_DIGITS)
    onnx_path = export_onnx(recipe, recipe.build_model(), folder, ExportConfig()).output.onnx
    repository.write_version(server.repository, name, onnx_path, ServingConfig(max_batch_size=16))
    client.load_model(server.http_url, name)
    return onnx_path, recipe
