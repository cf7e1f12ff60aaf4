"""Re-run caching: a run with the same data, code and configuration reuses the artifacts of the last one.

The key hashes file *contents*, never paths: the recipe's data (`Recipe.data_fingerprint`), the source of every
module that shapes the artifacts (`core`, `recipes`, `training`, `export`), and the parameters that reach those stages.
A hit is only taken when every cached artifact still has the sha256 recorded when it was written.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable

from core import paths
from core.files import atomic_write_json
from core.results import Artifact
from flows.params import PipelineParams
from recipes import Recipe

_SOURCE_PACKAGES = ("core", "recipes", "training", "export")
_PROJECT_ROOT = Path(__file__).resolve().parents[1]


def code_fingerprint() -> str:
    digest = hashlib.sha256()
    for package in _SOURCE_PACKAGES:
        for path in sorted((_PROJECT_ROOT / package).rglob("*.py")):
            digest.update(path.relative_to(_PROJECT_ROOT).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def cache_key(params: PipelineParams, recipe: Recipe) -> str | None:
    """None when the recipe cannot fingerprint its data (caching is then off)."""
    data = recipe.data_fingerprint()
    if data is None:
        return None
    relevant = params.model_dump(
        mode="json", include={"recipe", "stdlib_gpt", "digits_cnn", "recipe_options", "training", "export", "precision"}
    )
    relevant["training"].pop("resume", None)
    blob = json.dumps({"params": relevant, "data": data, "code": code_fingerprint()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _index_path() -> Path:
    return paths.state_dir() / "cache-index.json"


def _index() -> dict[str, str]:
    path = _index_path()
    return json.loads(path.read_text()) if path.is_file() else {}


def lookup(key: str | None, stages_wanted: Iterable[str]) -> dict | None:
    """The results of `stages_wanted` in the run cached under `key`, if it completed and their artifacts are intact."""
    if key is None or key not in _index():
        return None
    manifest_path = Path(_index()[key]) / "manifest.json"
    if not manifest_path.is_file():
        return None
    manifest = json.loads(manifest_path.read_text())
    stages = manifest.get("stages", {})
    wanted = list(stages_wanted)
    if manifest.get("status") != "completed" or any(stages.get(s, {}).get("status") != "ok" for s in wanted):
        return None
    if not all(Artifact(**artifact).intact() for stage in wanted for artifact in stages[stage]["artifacts"]):
        return None
    return {"run_dir": str(manifest_path.parent), "stages": {s: stages[s] for s in wanted}}


def remember(key: str | None, run_dir: Path) -> None:
    if key is not None:
        atomic_write_json(_index_path(), {**_index(), key: str(run_dir)})
