"""Per-stage caching: a stage whose inputs, code and parameters match an earlier run's reuses its artifacts.

Each of train, export and precision has its own key, a hash of *contents*, never paths:

- the recipe's data (`Recipe.data_fingerprint`) and, for a user's own recipe, its source file;
- the source of the packages that shape the stage's artifacts (`_STAGE_CODE`);
- the parameters that reach the stage (`_STAGE_PARAMS`, less the ones that cannot change what it makes);
- the versions of the libraries that make them (torch, onnx, onnxruntime, openvino, ...);
- the sha256 of the previous stage's artifacts (so a retrained model is re-exported, and so on down).
- for precision, the machine (`machine_fingerprint`): its gates and runtime settings are measured there.

So a change to a precision setting reuses training and export, and a change to training recomputes everything
after it. A hit is only taken when every cached artifact still has the sha256 recorded when it was written; the
Prefect flow also hands the key to Prefect as the task's cache key, so its UI shows a reused stage as Cached.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import inspect
import json
import os
import platform
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from core import paths
from core.files import atomic_write_json
from core.results import Artifact, RunDir
from flows.params import PipelineParams
from recipes import Recipe

if TYPE_CHECKING:
    from flows.run_store import RunStore  # boto3: only for an S3 runs_dir

_PROJECT_ROOT = Path(__file__).resolve().parents[1]
_STAGE_CODE = {
    "train": ("core", "recipes", "training"),
    "export": ("core", "recipes", "export"),
    "precision": ("core", "recipes", "export"),
}
_RECIPE_PARAMS = ("recipe", "stdlib_gpt", "digits_cnn", "recipe_options")
_STAGE_PARAMS = {"train": ("training",), "export": ("export",), "precision": ("precision",)}
# fields that change how a stage runs, not what it makes
_NEUTRAL = {
    "training": ("resume", "rdzv_endpoint", "node_rank", "max_restarts", "timeout_s"),
    "precision": ("build_workers", "task_runner", "dask_address"),
}
_STAGE_LIBRARIES = {
    "train": ("torch",),
    "export": ("torch", "onnx", "onnxscript", "onnxruntime", "transformers"),
    "precision": ("torch", "onnx", "onnxruntime", "openvino", "nncf", "torchao"),
}
STAGES = tuple(_STAGE_CODE)


def code_fingerprint(packages: Iterable[str] = ("core", "recipes", "training", "export")) -> str:
    digest = hashlib.sha256()
    for package in packages:
        for path in sorted((_PROJECT_ROOT / package).rglob("*.py")):
            digest.update(path.relative_to(_PROJECT_ROOT).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def _library_versions(names: Iterable[str]) -> dict[str, str]:
    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


_SPEED_FLAGS = {"avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile"}


def machine_fingerprint() -> dict[str, Any]:
    """What the precision stage's measurements depend on besides its inputs: the speed gates and the runtime
    settings are timed here, and which runtimes a variant can use depends on the CPU's extensions, the GPUs and
    ONNX Runtime's providers. Part of the precision key, so a shared cache never hands one machine's verdicts to
    another kind of machine."""
    cpu, flags = platform.processor(), set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                cpu = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split()) & _SPEED_FLAGS
                break
    import onnxruntime
    import torch

    gpus = (
        [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    )
    return {
        "cpu": cpu,
        "flags": sorted(flags),
        "cores": os.cpu_count(),
        "gpus": gpus,
        "onnxruntime_providers": onnxruntime.get_available_providers(),
    }


def _recipe_source(recipe: Recipe) -> str:
    """The source file of a recipe class that lives outside this project (a user's own), hashed; '' otherwise."""
    try:
        path = Path(inspect.getsourcefile(type(recipe)) or "").resolve()
    except TypeError:
        return ""
    if not path.is_file() or _PROJECT_ROOT in path.parents:
        return ""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def stage_key(stage: str, params: PipelineParams, recipe: Recipe, upstream: Iterable[Artifact] = ()) -> str | None:
    """The cache key of `stage` given the artifacts of the stage before it; None when the recipe cannot fingerprint
    its data (caching is then off)."""
    data = recipe.data_fingerprint()
    if data is None:
        return None
    dumped = params.model_dump(mode="json", include={*_RECIPE_PARAMS, *_STAGE_PARAMS[stage]})
    for section, fields in _NEUTRAL.items():
        for name in fields:
            dumped.get(section, {}).pop(name, None)
    blob: dict[str, Any] = {
        "stage": stage,
        "params": dumped,
        "data": data,
        "recipe_source": _recipe_source(recipe),
        "code": code_fingerprint(_STAGE_CODE[stage]),
        "libraries": _library_versions(_STAGE_LIBRARIES[stage]),
        "upstream": sorted(artifact.sha256 for artifact in upstream),
    }
    if stage == "precision":
        blob["machine"] = machine_fingerprint()
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


def _index_path() -> Path:
    return paths.state_dir() / "cache-index.json"


def _index() -> dict[str, str]:
    path = _index_path()
    return json.loads(path.read_text()) if path.is_file() else {}


def lookup(stage: str, key: str | None, runs: RunStore | None = None) -> tuple[dict, Path] | None:
    """(the stage's recorded result, the run folder that made it) for `key`, if that run recorded the stage as ok
    and every one of its artifacts is still intact; None otherwise. With `runs` (an S3 runs_dir), a key this
    machine's index lacks is looked up in the store, and the run that made it is downloaded."""
    if key is None:
        return None
    made_by = _index().get(key)
    local = Path(made_by) if made_by else None
    if local is not None and runs is not None and runs.root not in local.parents:
        local = None  # a run outside the shared store: other machines could not find its files
    found = _recorded(stage, local) if local is not None else None
    if found is None and runs is not None:
        made_it = runs.cached_run(key, stage)
        found = _recorded(stage, made_it.path) if made_it is not None else None
    return found


def _recorded(stage: str, run_dir: Path) -> tuple[dict, Path] | None:
    manifest_path = run_dir / "manifest.json"
    if not manifest_path.is_file():
        return None
    result = json.loads(manifest_path.read_text()).get("stages", {}).get(stage)
    # a stage this run took from another run's folder is found under that run; one it made before it was resumed
    # ("resumed: ...") is its own
    if not result or result.get("status") != "ok" or result.get("reason", "").startswith("cached"):
        return None
    if not all(Artifact(**artifact).intact() for artifact in result["artifacts"]):
        return None
    return result, run_dir


def remember(key: str | None, run: RunDir, stage: str, runs: RunStore | None = None) -> None:
    """Record that `run` made `stage` with `key` (called as each stage finishes, so the completed stages of a run
    that fails later are reused too); in the S3 store as well with `runs`."""
    if key is not None:
        atomic_write_json(_index_path(), {**_index(), key: str(run.path)})
        if runs is not None:
            runs.remember(key, run, stage)
