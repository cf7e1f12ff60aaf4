"""Typed stage results and the run folder: where every stage writes, and the manifest that links it all.

Every stage returns a `StageResult[Output]`: its status (ok / skipped / failed) with a reason, the artifacts it
wrote with their sha256, the seconds it took, and its own frozen, typed output (a `StageOutput` subclass the
stage defines). Results are serialized only where the run folder records them (`manifest.json`, `summary.json`).
`RunDir` is the one owner of a run folder's layout: stages and tools ask it for paths instead of joining names.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Any, Callable, Generic, Iterator, TypeVar

from pydantic import BaseModel, ConfigDict

from core import paths
from core.errors import TesError
from core.files import atomic_write_json, sha256_file


class Status(str, Enum):
    OK = "ok"
    SKIPPED = "skipped"
    FAILED = "failed"


class Artifact(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    path: str
    sha256: str
    bytes: int

    @classmethod
    def of(cls, path: str | Path) -> "Artifact":
        path = Path(path)
        return cls(path=str(path), sha256=sha256_file(path), bytes=path.stat().st_size)

    def intact(self) -> bool:
        """The file is still there with the sha256 recorded when it was written."""
        path = Path(self.path)
        return path.is_file() and sha256_file(path) == self.sha256


class StageOutput(BaseModel):
    """Base of every stage's typed output: frozen, and unknown fields are refused when read back."""

    model_config = ConfigDict(frozen=True, extra="forbid")


Output = TypeVar("Output", bound=StageOutput)


class StageResult(BaseModel, Generic[Output]):
    model_config = ConfigDict(frozen=True, extra="forbid")

    stage: str
    status: Status
    seconds: float = 0.0
    reason: str = ""
    artifacts: tuple[Artifact, ...] = ()
    output: Output | None = None

    @property
    def ok(self) -> bool:
        return self.status is Status.OK

    @classmethod
    def skipped(cls, stage: str, reason: str) -> "StageResult":
        return cls(stage=stage, status=Status.SKIPPED, reason=reason)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


@contextmanager
def timed() -> Iterator[dict[str, float]]:
    """`with timed() as clock: ...` then `clock["seconds"]` holds the wall time."""
    clock = {"seconds": 0.0}
    start = time.perf_counter()
    try:
        yield clock
    finally:
        clock["seconds"] = time.perf_counter() - start


def new_run_id(prefix: str) -> str:
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{prefix}"


def claim_run_dir(runs_dir: str | Path, prefix: str) -> "RunDir":
    """A new run folder that no other run has: `<runs_dir>/<timestamp>-<prefix>`, or with `-2`, `-3`... when a run
    started in the same second (two workers sharing one runs folder). The folder is created exclusively, so two
    runs can never end up writing into one."""
    runs_dir = Path(runs_dir)
    runs_dir.mkdir(parents=True, exist_ok=True)
    run_id = new_run_id(prefix)
    for attempt in range(1, 1000):
        path = runs_dir / (run_id if attempt == 1 else f"{run_id}-{attempt}")
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return RunDir(path)
    raise TesError(f"could not create a new run folder for {run_id} in {runs_dir}")


# File names inside a run folder. Stages write them through RunDir; tools that read a run (the native
# repository export, the CLI) import them from here rather than spelling them again.
WEIGHTS_FILE = "model.pt"
CHECKPOINT_FILE = "checkpoint.pt"
ONNX_FILE = "model.onnx"
VARIANTS_FILE = "variants.json"


class RunDir:
    """A run's folder: one subfolder per stage, `manifest.json` (every stage's result as it finishes),
    `summary.json` and `report.md` (when the run completed), and the ledger."""

    def __init__(self, path: str | Path, create: bool = True):
        self.path = Path(path)
        if create:
            self.path.mkdir(parents=True, exist_ok=True)
        elif not self.path.is_dir():
            raise TesError(f"run folder {self.path} does not exist; `tes report` with no argument shows the last run")
        self.manifest_path = self.path / "manifest.json"
        self.on_change: Callable[[RunDir], None] | None = None  # called after each manifest write (S3 mirroring)

    @property
    def run_id(self) -> str:
        return self.path.name

    def stage_dir(self, stage: str) -> Path:
        """Where `stage` writes; the stage creates it when it runs (a cached stage leaves no empty folder)."""
        return self.path / stage

    def reuse(self, stage: str, earlier: "RunDir") -> None:
        """Record that `stage` reused the files of an earlier run: readers of this run find them there."""
        folders = self.read_manifest().get("stage_folders", {})
        self.update(stage_folders={**folders, stage: str(earlier.files_of(stage))})

    def files_of(self, stage: str) -> Path:
        """The folder holding `stage`'s files: this run's own, or an earlier run's when the stage was reused."""
        return Path(self.read_manifest().get("stage_folders", {}).get(stage, self.path / stage))

    # --- the files each stage leaves ------------------------------------------------------------------------------
    @property
    def weights(self) -> Path:
        return self.files_of("train") / WEIGHTS_FILE

    @property
    def onnx(self) -> Path:
        return self.files_of("export") / ONNX_FILE

    @property
    def variants(self) -> Path:
        return self.files_of("precision") / VARIANTS_FILE

    def precision_variants(self) -> list[dict]:
        """Every variant's report, as the precision stage recorded it in the manifest (whose paths are this machine's,
        even for a run downloaded from an S3 runs_dir), else as `variants.json` holds it."""
        recorded = self.read_manifest().get("stages", {}).get("precision", {}).get("output") or {}
        if "variants" in recorded:
            return recorded["variants"]
        return json.loads(self.variants.read_text(encoding="utf-8"))

    @property
    def engines(self) -> Path:
        return self.path / "tensorrt"

    @property
    def summary(self) -> Path:
        return self.path / "summary.json"

    @property
    def report(self) -> Path:
        return self.path / "report.md"

    @property
    def ledger_json(self) -> Path:
        return self.path / "ledger.json"

    @property
    def ledger_plot(self) -> Path:
        return self.path / "ledger.png"

    # --- the manifest ---------------------------------------------------------------------------------------------
    def read_manifest(self) -> dict[str, Any]:
        if not self.manifest_path.exists():
            return {"run_id": self.run_id, "stages": {}}
        return json.loads(self.manifest_path.read_text(encoding="utf-8"))

    def update(self, **fields: Any) -> None:
        manifest = self.read_manifest()
        manifest.update(fields)
        atomic_write_json(self.manifest_path, manifest)
        self.changed()

    def record(self, result: StageResult) -> None:
        manifest = self.read_manifest()
        manifest["stages"][result.stage] = result.to_dict()
        atomic_write_json(self.manifest_path, manifest)
        self.changed()

    def changed(self) -> None:
        if self.on_change is not None:
            self.on_change(self)


def last_run_pointer() -> Path:
    return paths.state_dir() / "last-run.json"


def find_run(run: str | Path | None = None) -> RunDir:
    """A finished run's folder: the one given, or the last run of this project home."""
    if run is None:
        pointer = last_run_pointer()
        if not pointer.is_file():
            raise TesError("no run yet: start one with `tes run` or `tes demo`")
        run = json.loads(pointer.read_text())["run_dir"]
    found = RunDir(paths.resolve(run), create=False)
    if not found.summary.is_file():
        raise TesError(f"{found.summary} does not exist: the run did not finish (its manifest.json says why)")
    return found
