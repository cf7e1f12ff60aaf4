import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from core.errors import TesError
from core.files import atomic_write, atomic_write_json, sha256_file
from core.results import ONNX_FILE, RunDir, StageOutput, StageResult, Status


def test_atomic_write_failure_leaves_old_content_and_no_temp_file(tmp_path: Path):
    target = tmp_path / "weights.bin"
    target.write_bytes(b"old")

    def crash_midway(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        atomic_write(target, crash_midway)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["weights.bin"]


def test_sha256_matches_hashlib(tmp_path: Path):
    import hashlib

    path = tmp_path / "blob"
    path.write_bytes(b"x" * 3_000_000)
    assert sha256_file(path) == hashlib.sha256(b"x" * 3_000_000).hexdigest()


def test_run_dir_manifest_records_each_stage(tmp_path: Path):
    run = RunDir(tmp_path / "run")
    atomic_write_json(run.stage_dir("train") / "metrics.json", {"loss": 1.0})
    run.record(StageResult(stage="train", status=Status.OK, seconds=1.5, output=Steps(steps=3)))
    run.record(StageResult.skipped("tensorrt", "no GPU"))
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["stages"]["train"]["output"] == {"steps": 3}
    assert StageResult[Steps].model_validate(manifest["stages"]["train"]).output == Steps(steps=3)
    assert manifest["stages"]["tensorrt"] == {
        "stage": "tensorrt",
        "status": "skipped",
        "seconds": 0.0,
        "reason": "no GPU",
        "artifacts": [],
        "output": None,
    }


class Steps(StageOutput):
    steps: int


def test_a_stage_output_is_frozen_and_refuses_unknown_fields():
    with pytest.raises(ValidationError):
        Steps(steps=1).steps = 2
    with pytest.raises(ValidationError, match="bogus"):
        Steps.model_validate({"steps": 1, "bogus": 2})


def test_run_dir_owns_the_layout_and_refuses_a_missing_run(tmp_path: Path):
    run = RunDir(tmp_path / "run")
    assert run.onnx == tmp_path / "run" / "export" / ONNX_FILE and run.weights.parent.name == "train"
    with pytest.raises(TesError, match="does not exist"):
        RunDir(tmp_path / "nowhere", create=False)
