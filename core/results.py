"""Typed stage results and the run directory's manifest.

Every stage returns a `StageResult`: its status (ok / skipped / failed) with a reason, the artifacts it wrote
with their sha256, its own outputs, and the seconds it took. The run directory keeps them in `manifest.json`.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Iterator

from core.files import atomic_write_json, sha256_file


class Status(str, Enum):
    OK = "ok"
    SKIPPED = "skipped"
    FAILED = "failed"


@dataclass(frozen=True)
class Artifact:
    path: str
    sha256: str
    bytes: int

    @classmethod
    def of(cls, path: str | Path) -> "Artifact":
        path = Path(path)
        return cls(path=str(path), sha256=sha256_file(path), bytes=path.stat().st_size)


@dataclass
class StageResult:
    stage: str
    status: Status
    seconds: float = 0.0
    reason: str = ""
    artifacts: list[Artifact] = field(default_factory=list)
    outputs: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["status"] = self.status.value
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "StageResult":
        return cls(stage=data["stage"], status=Status(data["status"]), seconds=data["seconds"], reason=data["reason"],
                   artifacts=[Artifact(**artifact) for artifact in data["artifacts"]], outputs=data["outputs"])


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


class RunDir:
    """A run's folder: stage outputs live in subfolders, `manifest.json` links them all."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.manifest_path = self.path / "manifest.json"

    def stage_dir(self, stage: str) -> Path:
        folder = self.path / stage
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def read_manifest(self) -> dict[str, Any]:
        if not self.manifest_path.exists():
            return {"run_id": self.path.name, "stages": {}}
        return json.loads(self.manifest_path.read_text(encoding="utf-8"))

    def update(self, **fields: Any) -> None:
        manifest = self.read_manifest()
        manifest.update(fields)
        atomic_write_json(self.manifest_path, manifest)

    def record(self, result: StageResult) -> None:
        manifest = self.read_manifest()
        manifest["stages"][result.stage] = result.to_dict()
        atomic_write_json(self.manifest_path, manifest)
